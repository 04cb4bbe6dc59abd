"""Import from peft's and the original xlora/mistral.rs formats, export to both, and the convert CLI."""

from __future__ import annotations

import json
import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factories import peft_reference, save_expert, tiny_llama

from xlora_hub import (
    ExpertNotFoundError,
    InvalidConfigError,
    UnsupportedFormatError,
    XLoraConfig,
    XLoraModel,
)
from xlora_hub.convert import (
    MISTRALRS_ORDERING_NAME,
    detect_format,
    export_mistralrs,
    export_peft,
    import_mixture,
    main,
    mistralrs_expert_names,
    save_peft_classifier,
)

IDS = torch.tensor([[1, 5, 9, 14, 27, 33, 60, 2], [1, 7, 7, 90, 3, 44, 12, 100]])
TARGETS = ["q_proj", "v_proj", "up_proj"]


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("experts")
    return [save_expert(tiny_llama, root / f"e{i}", target_modules=TARGETS, seed=i + 1) for i in range(3)]


def randomise(module: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def ours(expert_dirs, names=("a", "b", "c"), **settings) -> XLoraModel:
    model = XLoraModel.from_experts(
        tiny_llama(), XLoraConfig(experts={n: str(d) for n, d in zip(names, expert_dirs)}, **settings)
    )
    randomise(model.classifier, seed=5)
    return model


# ---------------------------------------------------------------------------------------------- peft
@pytest.mark.parametrize(
    "settings",
    [dict(), dict(layerwise_scalings=True, xlora_depth=2, xlora_size=16, softmax_temperature=0.7)],
)
def test_import_peft_checkpoint_written_by_peft(expert_dirs, tmp_path, settings):
    reference = peft_reference(tiny_llama, expert_dirs, **settings)
    randomise(reference.base_model.internal_xlora_classifier, seed=3)
    reference.save_pretrained(str(tmp_path / "peft"))
    assert detect_format(tmp_path / "peft") == "peft"

    # peft >= 0.20 drops (part of) the classifier when saving: detected, never loaded as random routing
    with pytest.raises(UnsupportedFormatError, match="empty or partial X-LoRA classifier"):
        import_mixture(tmp_path / "peft", base_model=tiny_llama())

    save_peft_classifier(reference, tmp_path / "peft")  # the workaround: write the full classifier, peft's key names
    base = tiny_llama()
    base.config.use_cache = False
    reloaded_by_peft = PeftModel.from_pretrained(base, str(tmp_path / "peft"))
    expected = logits(reference)
    torch.testing.assert_close(logits(reloaded_by_peft), expected, rtol=0, atol=0)

    model = import_mixture(tmp_path / "peft", base_model=tiny_llama())
    assert model.expert_names == ["expert_0", "expert_1", "expert_2"]  # peft's "0", "1", "2" made identifiers
    for key, value in settings.items():
        assert getattr(model.xlora_config, key) == value
    torch.testing.assert_close(logits(model), expected, rtol=1e-5, atol=1e-5)

    # it saves as an ordinary xlora-hub mixture (the experts were local folders: bundled)
    model.save_pretrained(tmp_path / "mix")
    again = XLoraModel.from_pretrained(tmp_path / "mix", base_model=tiny_llama())
    torch.testing.assert_close(logits(again), logits(model), rtol=0, atol=0)


def test_peft_numbered_folders_are_not_experts(expert_dirs, tmp_path):
    reference = peft_reference(tiny_llama, expert_dirs[:2])
    randomise(reference.base_model.internal_xlora_classifier, seed=3)
    reference.save_pretrained(str(tmp_path / "peft"))
    save_peft_classifier(reference, tmp_path / "peft")
    config_path = tmp_path / "peft" / "adapter_config.json"
    data = json.loads(config_path.read_text())
    data["adapters"] = {"0": "0", "1": str(tmp_path / "gone")}  # a numbered copy, and a path that no longer exists
    config_path.write_text(json.dumps(data))
    with pytest.raises(ExpertNotFoundError, match="expert '0' points at '0'.*adapters="):
        import_mixture(tmp_path / "peft", base_model=tiny_llama())
    model = import_mixture(
        tmp_path / "peft", base_model=tiny_llama(), adapters={"math": str(expert_dirs[0]), "code": str(expert_dirs[1])}
    )
    assert model.expert_names == ["math", "code"]
    torch.testing.assert_close(logits(model), logits(reference), rtol=1e-5, atol=1e-5)


def test_export_peft_loads_in_peft(expert_dirs, tmp_path):
    model = ours(expert_dirs, xlora_depth=2, xlora_size=8)
    out = export_peft(model, tmp_path / "peft")
    assert detect_format(out) == "peft"
    assert sorted(p.name for p in out.iterdir()) == ["a", "adapter_config.json", "adapter_model.safetensors", "b", "c"]
    base = tiny_llama()
    base.config.use_cache = False
    loaded = PeftModel.from_pretrained(base, str(out))
    torch.testing.assert_close(logits(loaded), logits(model), rtol=1e-5, atol=1e-5)
    back = import_mixture(out, base_model=tiny_llama())
    assert back.expert_names == ["a", "b", "c"]
    torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------- original xlora
def write_original(folder: Path, expert_dirs, model: XLoraModel, *, adapters_as="dict", python_indices=False, **extra):
    """The published layout (lamm-mit/x-lora, read by mistral.rs): experts in <name>/, inner.N/last keys in bf16."""
    folder.mkdir(parents=True)
    names = [f"adapter_{i + 1}" for i in range(len(expert_dirs))]
    for name, source in zip(names, expert_dirs):
        shutil.copytree(source, folder / name)
    config = model.xlora_config
    data = {
        "hidden_size": config.hidden_size,
        "device": "cuda:0",
        "enable_softmax": config.enable_softmax,
        "enable_softmax_topk": False,
        "layerwise_scalings": config.layerwise_scalings,
        "xlora_depth": config.xlora_depth,
        "xlora_size": config.xlora_size,
        "enable_relu_and_dropout": True,
        "use_bias": True,
        "xlora_dropout_p": config.xlora_dropout_p,
        "stop_token_id": None,
        "use_trainable_adapters": False,
        "softmax_temperature": config.softmax_temperature,
        "top_k_lora": None,
        "scaling_pass_value": 0.0,
        "global_scaling_weight": 1.0,
        "base_model_id": "HuggingFaceH4/zephyr-7b-beta",
        "adapters": {n: f"./{n}/" for n in names} if adapters_as == "dict" else names,
        **extra,
    }
    (folder / "xlora_config.json").write_text(json.dumps(data))
    linears = [m for m in model.classifier.layers if isinstance(m, torch.nn.Linear)]
    state = {}
    for i, linear in enumerate(linears):
        # the python package keeps ReLU/Dropout in its ModuleList (inner.0, inner.3...); mistral.rs counts linears
        prefix = "last" if i == len(linears) - 1 else f"inner.{i * 3 if python_indices else i}"
        state[f"{prefix}.weight"] = linear.weight.detach().to(torch.bfloat16)
        if data["use_bias"]:
            state[f"{prefix}.bias"] = linear.bias.detach().to(torch.bfloat16)
    save_file(state, str(folder / "xlora_classifier.safetensors"))
    return folder


def bf16_rounded(model: XLoraModel) -> XLoraModel:
    with torch.no_grad():
        for param in model.classifier.parameters():
            param.copy_(param.to(torch.bfloat16).float())
    return model


@pytest.mark.parametrize(
    "settings, adapters, python_indices",
    [
        (dict(), "dict", False),
        (dict(layerwise_scalings=True, xlora_depth=2, xlora_size=16), "list", False),
        (dict(xlora_depth=3, xlora_size=8), "dict", True),
    ],
)
def test_import_original_format_gives_the_same_logits(expert_dirs, tmp_path, settings, adapters, python_indices):
    equivalent = bf16_rounded(ours(expert_dirs, **settings))
    folder = write_original(
        tmp_path / "xlora", expert_dirs, equivalent, adapters_as=adapters, python_indices=python_indices
    )
    assert detect_format(folder) == "xlora"
    model = import_mixture(folder, base_model=tiny_llama())
    assert model.expert_names == ["adapter_1", "adapter_2", "adapter_3"]
    assert model.xlora_config.base_model.repo_id == "HuggingFaceH4/zephyr-7b-beta"
    assert model.classifier.layers[0].weight.dtype == torch.float32
    torch.testing.assert_close(logits(model), logits(equivalent), rtol=0, atol=1e-6)


def test_import_original_without_bias(expert_dirs, tmp_path):
    equivalent = ours(expert_dirs)
    with torch.no_grad():
        equivalent.classifier.layers[0].bias.zero_()
    bf16_rounded(equivalent)
    folder = write_original(tmp_path / "xlora", expert_dirs, equivalent, use_bias=False)
    model = import_mixture(folder, base_model=tiny_llama())
    torch.testing.assert_close(logits(model), logits(equivalent), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "extra, error, match",
    [
        (dict(enable_relu_and_dropout=False), UnsupportedFormatError, "without ReLU"),
        (dict(use_mean_pool=True), UnsupportedFormatError, "use_mean_pool"),
        (dict(xlora_depth=4), Exception, "xlora_depth is 4 but"),
        (dict(adapters=["adapter_1", "adapter_2", "missing"]), ExpertNotFoundError, "expert 'missing'"),
        (dict(adapters=["../adapter_1"]), Exception, "escapes"),
    ],
)
def test_original_format_bad_input(expert_dirs, tmp_path, extra, error, match):
    equivalent = ours(expert_dirs, xlora_depth=2, xlora_size=16)
    folder = write_original(tmp_path / "xlora", expert_dirs, equivalent, **extra)
    with pytest.raises(error, match=match):
        import_mixture(folder, base_model=tiny_llama())


def test_original_pickle_classifier_is_refused(expert_dirs, tmp_path):
    folder = write_original(tmp_path / "xlora", expert_dirs, ours(expert_dirs))
    (folder / "xlora_classifier.safetensors").rename(folder / "xlora_classifier.pt")
    with pytest.raises(UnsupportedFormatError, match="pickle"):
        import_mixture(folder, base_model=tiny_llama())


# ---------------------------------------------------------------------------------------------- mistral.rs export
def test_export_mistralrs_folder(expert_dirs, tmp_path):
    model = ours(expert_dirs, names=("math", "math_v2", "code"), layerwise_scalings=True, scaling_pass_value=None)
    out = export_mistralrs(model, tmp_path / "mistralrs", base_model_id="owner/base")
    ordering = json.loads((out / MISTRALRS_ORDERING_NAME).read_text())
    names = ordering["order"]
    assert names == mistralrs_expert_names(["math", "math_v2", "code"]) != ["math", "math_v2", "code"]
    files = [str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()]
    for path in files:  # mistral.rs gives a file to the first adapter whose name occurs in its name (flat files)
        owners = [n for n in names if n in path]
        assert owners == [n for n in names if path in (f"{n}_adapter_config.json", f"{n}_adapter_model.safetensors")]
    assert ordering["layers"] == {name: i for i, name in enumerate(model.layer_names)}
    assert ordering["base_model_id"] == "owner/base"
    config = json.loads((out / "xlora_config.json").read_text())
    assert config["base_model_id"] == "owner/base" and config["enable_relu_and_dropout"] is True
    assert config["adapters"] == {n: n for n in names} and config["scaling_pass_value"] == pytest.approx(1 / 3)
    with safe_open(str(out / "xlora_classifier.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == ["last.bias", "last.weight"]
    back = import_mixture(out, base_model=tiny_llama())  # the same folder read back as the original format
    torch.testing.assert_close(logits(back), logits(model), rtol=0, atol=0)


def test_export_mistralrs_deep_classifier_round_trip(expert_dirs, tmp_path):
    model = ours(expert_dirs, names=("math", "code", "poetry"), xlora_depth=3, xlora_size=32)
    out = export_mistralrs(model, tmp_path / "m", base_model_id="owner/base")
    with safe_open(str(out / "xlora_classifier.safetensors"), framework="pt") as f:
        assert sorted(f.keys()) == [
            "inner.0.bias",
            "inner.0.weight",
            "inner.1.bias",
            "inner.1.weight",
            "last.bias",
            "last.weight",
        ]
    assert json.loads((out / MISTRALRS_ORDERING_NAME).read_text())["order"] == ["math", "code", "poetry"]
    torch.testing.assert_close(logits(import_mixture(out, base_model=tiny_llama())), logits(model), rtol=0, atol=0)


def test_export_mistralrs_refuses_what_mistralrs_cannot_run(expert_dirs, tmp_path):
    with pytest.raises(UnsupportedFormatError, match="top_k_lora"):
        export_mistralrs(ours(expert_dirs, top_k_lora=2), tmp_path / "a", base_model_id="owner/base")
    with pytest.raises(InvalidConfigError, match="base_model_id="):
        export_mistralrs(ours(expert_dirs), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_import_export_detect(expert_dirs, tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "base")
    reference = peft_reference(tiny_llama, expert_dirs[:2])
    randomise(reference.base_model.internal_xlora_classifier, seed=3)
    reference.save_pretrained(str(tmp_path / "peft"))
    save_peft_classifier(reference, tmp_path / "peft")

    assert main(["detect", str(tmp_path / "peft")]) == 0
    assert capsys.readouterr().out.strip() == "peft"
    base = str(tmp_path / "base")
    assert main(["import", str(tmp_path / "peft"), str(tmp_path / "mix"), "--base-model", base]) == 0
    loaded = XLoraModel.from_pretrained(tmp_path / "mix", base_model=tiny_llama())
    torch.testing.assert_close(logits(loaded), logits(reference), rtol=1e-5, atol=1e-5)

    args = ["export", "mistralrs", str(tmp_path / "mix"), str(tmp_path / "rs"), "--base-model", base]
    assert main([*args, "--base-model-id", "owner/base"]) == 0
    assert json.loads((tmp_path / "rs" / MISTRALRS_ORDERING_NAME).read_text())["base_model_id"] == "owner/base"
    assert main(["export", "peft", str(tmp_path / "mix"), str(tmp_path / "pf"), "--base-model", base]) == 0
    assert detect_format(tmp_path / "pf") == "peft"

    # a user error exits 1, like `xlora-hub` (issue 10: it was 2)
    assert main(["import", str(tmp_path / "nowhere"), str(tmp_path / "x")]) == 1
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- from the Hub
def upload(hub, folder: Path) -> str:
    repo_id = f"alice/import-{uuid.uuid4().hex[:8]}"
    hub.server.create_repo(repo_id)
    hub.server.commit_files(
        repo_id, {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    )
    return repo_id


def test_import_from_hub_repos(hub, expert_dirs, tmp_path):
    equivalent = bf16_rounded(ours(expert_dirs, xlora_depth=2, xlora_size=16))
    folder = write_original(tmp_path / "xlora", expert_dirs, equivalent)
    (folder / "adapter_1" / "adapter_model.bin").write_bytes(b"\x80\x04never downloaded")
    original = upload(hub, folder)
    hub.server.clear_requests()
    model = import_mixture(original, base_model=tiny_llama(), cache_dir=tmp_path / "cache")
    assert not [f for f in hub.server.downloaded_files() if not f.endswith((".json", ".safetensors"))]
    torch.testing.assert_close(logits(model), logits(equivalent), rtol=0, atol=1e-6)

    mixture = upload(hub, equivalent.save_pretrained(tmp_path / "mix"))  # an xlora-hub repo goes to load_mixture
    loaded = import_mixture(mixture, base_model=tiny_llama(), cache_dir=tmp_path / "cache")
    torch.testing.assert_close(logits(loaded), logits(equivalent), rtol=0, atol=0)
    with pytest.raises(UnsupportedFormatError, match="neither xlora_config.json nor adapter_config.json"):
        import_mixture(upload(hub, tmp_path / "xlora" / "adapter_1" / "nothing"), cache_dir=tmp_path / "cache")
