"""The mistral.rs export's files as mistral.rs reads them (no mistralrs needed; it runs them in
test_mistralrs_interop.py): flat names, one base model id, the layers it builds, scales it computes, refusals."""

from __future__ import annotations

import json
import logging
import os
import sys
import uuid
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factories import save_expert, tiny_llama

from xlora_hub import UnsupportedFormatError, XLoraConfig, XLoraModel
from xlora_hub.cli import main as cli_main
from xlora_hub.config import BaseModelRef
from xlora_hub.convert import MISTRALRS_ORDERING_NAME, export_mistralrs, import_mixture, mistralrs_expert_names
from xlora_hub.convert import main as convert_main

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
IDS = torch.tensor([[1, 5, 9, 14, 27, 33, 60, 2]])


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("mrs-experts")
    tiny_llama().save_pretrained(root / "base")
    return {
        "base": root / "base",
        "plain": save_expert(tiny_llama, root / "plain", target_modules=ALL, seed=1),
        "rslora": save_expert(tiny_llama, root / "rslora", target_modules=ALL, r=4, alpha=6, seed=2, use_rslora=True),
        "patterns": save_expert(
            tiny_llama,
            root / "patterns",
            target_modules=["q_proj", "v_proj", "down_proj"],
            r=4,
            seed=3,
            rank_pattern={"v_proj": 2},
            alpha_pattern={"down_proj": 3},
        ),
        "first_layer": save_expert(
            tiny_llama, root / "first", target_modules=["q_proj"], seed=4, layers_to_transform=[0]
        ),
        "embed": save_expert(tiny_llama, root / "embed", target_modules=["q_proj", "embed_tokens"], seed=5),
        "embed_only": save_expert(tiny_llama, root / "embed_only", target_modules=["embed_tokens"], seed=7),
        "head": save_expert(tiny_llama, root / "head", target_modules=["v_proj", "lm_head"], seed=6),
        "alpha_zero": save_expert(
            tiny_llama,
            root / "alpha0",
            target_modules=["q_proj", "v_proj"],
            alpha=0,
            alpha_pattern={"q_proj": 8},
            seed=8,
        ),
    }


def mixture(experts, names, **settings) -> XLoraModel:
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(experts["base"]).eval()
    model = XLoraModel.from_experts(base, XLoraConfig(experts={n: str(experts[n]) for n in names}, **settings))
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for param in model.classifier.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return model


def read(folder: Path, name: str) -> dict:
    return json.loads((folder / name).read_text())


def test_export_is_flat_with_one_absolute_base_id_and_the_classifier_mistralrs_builds(experts, tmp_path):
    model = mixture(experts, ["plain", "rslora"], xlora_depth=2, xlora_size=8, xlora_dropout_p=0.2)
    out = export_mistralrs(model, tmp_path / "rs")
    names = ["plain", "rslora"]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["xlora_config.json", "xlora_classifier.safetensors", MISTRALRS_ORDERING_NAME]
        + [f"{n}_adapter_{f}" for n in names for f in ("config.json", "model.safetensors")]
    )
    config, ordering = read(out, "xlora_config.json"), read(out, MISTRALRS_ORDERING_NAME)
    base = str(experts["base"].resolve())
    assert config["base_model_id"] == ordering["base_model_id"] == base  # absolute: mistral.rs reads it from any cwd
    assert config["xlora_dropout_p"] == 0.0  # mistral.rs runs the classifier's dropout at inference
    assert config["xlora_size"] == 32 == config["hidden_size"] and config["enable_relu_and_dropout"] is True
    assert ordering["order"] == names
    # depth 2: mistral.rs builds inner.0 (hidden -> xlora_size) and last with hidden_size inputs: padded units
    classifier = load_file(str(out / "xlora_classifier.safetensors"))
    assert classifier["inner.0.weight"].shape == (32, 32) and classifier["last.weight"].shape == (2, 32)
    hidden = torch.randn(5, 32, generator=torch.Generator().manual_seed(0))
    ours = model.classifier.layers.eval()(hidden)
    theirs = torch.relu(hidden @ classifier["inner.0.weight"].T + classifier["inner.0.bias"])
    theirs = theirs @ classifier["last.weight"].T + classifier["last.bias"]
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    back = import_mixture(out, base_model=tiny_llama())  # the flat files read back
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=0, atol=1e-6)


def test_base_model_id_is_a_path_mistralrs_can_open_or_the_given_one(experts, tmp_path, monkeypatch, caplog):
    model = mixture(experts, ["plain"])
    monkeypatch.chdir(experts["base"].parent)
    out = export_mistralrs(model, tmp_path / "a", base_model_id="base")  # a folder of the cwd: made absolute
    assert read(out, MISTRALRS_ORDERING_NAME)["base_model_id"] == str(experts["base"].resolve())
    out = export_mistralrs(model, tmp_path / "b", base_model_id="owner/base")
    assert read(out, "xlora_config.json")["base_model_id"] == read(out, MISTRALRS_ORDERING_NAME)["base_model_id"]
    assert read(out, MISTRALRS_ORDERING_NAME)["base_model_id"] == "owner/base"
    model.xlora_config = model.xlora_config.replace(base_model=BaseModelRef(repo_id="./base_model"))
    out = export_mistralrs(model, tmp_path / "c")  # relative to its mixture: the folder it was loaded from
    assert read(out, MISTRALRS_ORDERING_NAME)["base_model_id"] == str(experts["base"].resolve())
    model.xlora_config = model.xlora_config.replace(base_model=BaseModelRef(repo_id="owner/base", revision="abc123"))
    out = export_mistralrs(model, tmp_path / "d")  # a Hub base: its id, and a word on the revision
    assert read(out, MISTRALRS_ORDERING_NAME)["base_model_id"] == "owner/base"
    assert "not at revision abc123 the mixture was built on" in caplog.text


def test_names_mistralrs_would_mix_up_are_renamed():
    assert mistralrs_expert_names(["math", "code"]) == ["math", "code"]
    for names in (["math", "math_v2"], ["lora", "x"], ["order", "b"], ["model", "b"]):
        renamed = mistralrs_expert_names(names)
        assert renamed != names
        files = ["xlora_config.json", "xlora_classifier.safetensors", "ordering.json"]
        files += [f"{n}_adapter_{f}" for n in renamed for f in ("config.json", "model.safetensors")]
        for file in files:  # mistral.rs gives each file to the first expert whose name occurs in its name
            assert [n for n in renamed if n in file] == [n for n in renamed if file.startswith(f"{n}_adapter_")]


def test_names_differing_only_by_case_are_renamed_to_distinct_files_on_any_filesystem():
    for names in (["Math", "math"], ["code", "CODE_v2"], ["Lora", "x"]):
        renamed = mistralrs_expert_names(names)
        assert renamed != names
        files = ["xlora_config.json", "xlora_classifier.safetensors", "ordering.json"]
        files += [f"{n}_adapter_{f}" for n in renamed for f in ("config.json", "model.safetensors")]
        assert len({f.casefold() for f in files}) == len(files)  # one file each on a case-insensitive filesystem
        for file in (f.casefold() for f in files):
            owners = [n for n in renamed if n.casefold() in file]
            assert owners == [n for n in renamed if file.startswith(f"{n.casefold()}_adapter_")]


def test_a_base_model_id_under_the_home_folder_is_expanded(experts, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(experts["base"].parent))
    out = export_mistralrs(mixture(experts, ["plain"]), tmp_path / "rs", base_model_id="~/base")
    assert read(out, MISTRALRS_ORDERING_NAME)["base_model_id"] == str(experts["base"].resolve())


def test_rslora_patterns_and_other_targets_are_folded_into_what_mistralrs_computes(experts, tmp_path):
    names = ["plain", "rslora", "patterns", "first_layer"]
    model = mixture(experts, names, layerwise_scalings=True)
    out = export_mistralrs(model, tmp_path / "rs")
    ordering = read(out, MISTRALRS_ORDERING_NAME)
    # mistral.rs builds LoRA on every Linear named in target_modules (here all seven projections, both layers)
    built = [
        f"model.layers.{i}.{part}.{m}"
        for i in range(2)
        for part, ms in (("self_attn", ALL[:4]), ("mlp", ALL[4:]))
        for m in ms
    ]
    assert ordering["layers"] == {name: i for i, name in enumerate(built)}
    layers = {layer.module_name: layer for layer in model.xlora_layers}
    for name in names:
        config = read(out, f"{name}_adapter_config.json")
        assert sorted(config["target_modules"]) == sorted(ALL) and not config["use_rslora"]
        assert not config["rank_pattern"] and not config["alpha_pattern"]
        tensors = load_file(str(out / f"{name}_adapter_model.safetensors"))
        scale = config["lora_alpha"] / config["r"]  # the one scale mistral.rs computes per expert
        for path in built:
            a = tensors[f"base_model.model.{path}.lora_A.weight"]
            b = tensors[f"base_model.model.{path}.lora_B.weight"]
            assert a.shape[0] == b.shape[1] == config["r"]
            lora = layers[path].lora_layer if path in layers else None
            if lora is not None and name in lora.lora_A:
                want = lora.lora_B[name].weight @ lora.lora_A[name].weight * lora.scaling[name]
            else:
                want = torch.zeros(b.shape[0], a.shape[1])
            torch.testing.assert_close(b @ a * scale, want.detach(), rtol=1e-5, atol=1e-6, msg=f"{name} {path}")
    classifier = load_file(str(out / "xlora_classifier.safetensors"))
    assert classifier["last.weight"].shape[0] == len(built) * len(names)  # one block of rows per built layer
    back = import_mixture(out, base_model=tiny_llama())
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_lora_alpha_zero_with_an_alpha_pattern_exports_with_peft_scales_folded_into_b(experts, tmp_path):
    model = mixture(experts, ["plain", "alpha_zero"])
    out = export_mistralrs(model, tmp_path / "rs")
    config = read(out, "alpha_zero_adapter_config.json")
    assert config["lora_alpha"] == config["r"] and not config["alpha_pattern"]  # mistral.rs's scale is 1
    tensors = load_file(str(out / "alpha_zero_adapter_model.safetensors"))
    for layer in model.xlora_layers:
        lora = layer.lora_layer
        a = tensors[f"base_model.model.{layer.module_name}.lora_A.weight"]
        b = tensors[f"base_model.model.{layer.module_name}.lora_B.weight"]
        if "alpha_zero" in lora.lora_A:
            want = lora.lora_B["alpha_zero"].weight @ lora.lora_A["alpha_zero"].weight * lora.scaling["alpha_zero"]
        else:
            want = torch.zeros(b.shape[0], a.shape[1])
        torch.testing.assert_close(b @ a, want.detach(), rtol=1e-5, atol=1e-6)
    scales = {float(layer.lora_layer.scaling.get("alpha_zero", -1)) for layer in model.xlora_layers}
    assert 0.0 in scales and 2.0 in scales  # v_proj's lora_alpha 0, q_proj's pattern 8 over r 4
    back = import_mixture(out, base_model=tiny_llama())
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)


def test_lora_mistralrs_cannot_run_is_refused_naming_expert_and_module(experts, tmp_path):
    with pytest.raises(UnsupportedFormatError) as err:
        export_mistralrs(mixture(experts, ["plain", "embed"]), tmp_path / "a")
    assert "expert 'embed': LoRA on model.embed_tokens, an embedding" in str(err.value)
    assert "lossy=True" in str(err.value) and "--lossy" in str(err.value)
    with pytest.raises(UnsupportedFormatError, match=r"expert 'head': LoRA on lm_head, the LM head"):
        export_mistralrs(mixture(experts, ["head"]), tmp_path / "b")
    with pytest.raises(UnsupportedFormatError, match=r"mistral.rs would run none of this mixture's LoRA layers"):
        export_mistralrs(mixture(experts, ["embed_only"]), tmp_path / "d", lossy=True)
    with pytest.raises(UnsupportedFormatError, match=r"xlora_size=64\), which it cannot load"):
        export_mistralrs(mixture(experts, ["plain"], xlora_depth=2, xlora_size=64), tmp_path / "c")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_lossy_export_leaves_that_lora_out_and_says_so(experts, tmp_path, caplog):
    model = mixture(experts, ["plain", "embed"], layerwise_scalings=True)
    caplog.set_level(logging.WARNING, logger="xlora_hub")
    out = export_mistralrs(model, tmp_path / "rs", lossy=True)
    said = [r.getMessage() for r in caplog.records if "lossy" in r.getMessage()]
    assert said == ["mistral.rs export (lossy): left out expert 'embed': LoRA on model.embed_tokens, an embedding "
                    "(mistral.rs has LoRA on Linear layers only and drops it)."]  # fmt: skip
    ordering = read(out, MISTRALRS_ORDERING_NAME)
    assert "model.embed_tokens" not in ordering["layers"] and sorted(ordering["layers"].values()) == list(range(14))
    with safe_open(str(out / "embed_adapter_model.safetensors"), framework="pt") as f:
        assert not [k for k in f.keys() if "embed_tokens" in k]
    assert "embed_tokens" not in read(out, "embed_adapter_config.json")["target_modules"]
    classifier = load_file(str(out / "xlora_classifier.safetensors"))
    ours = model.classifier.last_layer.weight.detach().reshape(model.n_layers, 2, -1)
    index = {name: i for i, name in enumerate(model.layer_names)}
    theirs = classifier["last.weight"].reshape(14, 2, -1)
    for name, i in ordering["layers"].items():  # each built layer keeps its own routing rows
        torch.testing.assert_close(theirs[i], ours[index[name]], rtol=0, atol=0)


def test_cli_lossy_flag(experts, tmp_path, capsys):
    mix = tmp_path / "mix"
    mixture(experts, ["plain", "embed"]).save_pretrained(mix)
    assert cli_main(["convert", str(mix), str(tmp_path / "rs"), "--to", "mistralrs"]) == 1
    err = capsys.readouterr().err
    assert "expert 'embed': LoRA on model.embed_tokens" in err and "--lossy" in err and not (tmp_path / "rs").exists()
    assert cli_main(["convert", str(mix), str(tmp_path / "rs"), "--to", "mistralrs", "--lossy"]) == 0
    assert "left out expert 'embed': LoRA on model.embed_tokens" in capsys.readouterr().err
    assert cli_main(["convert", str(mix), str(tmp_path / "pf"), "--to", "peft", "--lossy"]) == 2
    assert "--lossy only applies with --to mistralrs" in capsys.readouterr().err
    assert convert_main(["export", "mistralrs", str(mix), str(tmp_path / "rs2")]) == 1  # python -m xlora_hub.convert
    assert "expert 'embed': LoRA on model.embed_tokens" in capsys.readouterr().err
    assert convert_main(["export", "mistralrs", str(mix), str(tmp_path / "rs2"), "--lossy"]) == 0
    assert (
        read(tmp_path / "rs2", MISTRALRS_ORDERING_NAME)["layers"]
        == read(tmp_path / "rs", MISTRALRS_ORDERING_NAME)["layers"]
    )


def test_export_pushed_to_the_hub_imports_back(experts, hub, tmp_path):
    from huggingface_hub import HfApi

    model = mixture(experts, ["plain", "patterns"])
    out = export_mistralrs(model, tmp_path / "rs")
    repo_id = f"alice/mistralrs-{uuid.uuid4().hex[:8]}"
    api = HfApi(endpoint=hub.url, token=hub.token)
    api.create_repo(repo_id)
    api.upload_folder(repo_id=repo_id, folder_path=str(out))
    back = import_mixture(repo_id, base_model=tiny_llama(), token=hub.token, cache_dir=tmp_path / "cache")
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=IDS).logits, model(input_ids=IDS).logits, rtol=1e-5, atol=1e-5)
