"""Mixture folders: save/load round trips, the files' contents, inspect, and bad input (no Hub server needed)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from peft.tuners.lora import LoraLayer
from safetensors import safe_open
from safetensors.torch import save_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factories import save_expert, tiny_bert_classifier, tiny_llama

from xlora_hub import (
    ExpertNotFoundError,
    IncompatibleExpertError,
    InvalidConfigError,
    InvalidMixtureError,
    UnsupportedFormatError,
    XLoraConfig,
    XLoraModel,
    inspect_mixture,
    load_mixture,
)

IDS = torch.tensor([[1, 5, 9, 14, 27, 33, 60, 2], [1, 7, 7, 90, 3, 44, 12, 100]])
TARGETS = ["q_proj", "v_proj", "down_proj"]


@pytest.fixture(scope="module")
def expert_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("experts")
    return {
        "math": save_expert(tiny_llama, root / "math", target_modules=TARGETS, seed=1),
        "code": save_expert(tiny_llama, root / "code", target_modules=TARGETS, seed=2, r=2),
        "chat": save_expert(tiny_llama, root / "chat", target_modules=["q_proj", "o_proj"], seed=3),
    }


def make_mixture(experts: dict[str, Path], base=None, seed: int = 7, **settings) -> XLoraModel:
    """A mixture with a seeded, non-trivial classifier (so routing differs between tokens)."""
    model = XLoraModel.from_experts(
        base if base is not None else tiny_llama(),
        XLoraConfig(experts={k: str(v) for k, v in experts.items()}, **settings),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.classifier.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return model


def logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def assert_untouched(base) -> None:
    """A failed load leaves the caller's base model as it was: no LoRA layer anywhere, same weights."""
    assert not any(isinstance(m, LoraLayer) for m in base.modules())
    fresh = tiny_llama()
    for (name, p), (_, q) in zip(base.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(p, q), name


# ---------------------------------------------------------------------------------------------- round trips
def test_save_load_round_trip_same_logits_and_tokens(expert_dirs, tmp_path):
    model = make_mixture(expert_dirs)
    expected = logits(model)
    out = model.save_pretrained(tmp_path / "mix")
    assert out == tmp_path / "mix"
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert files == sorted(
        ["README.md", "xlora_config.json", "xlora_classifier.safetensors"]
        + [f"experts/{n}/{f}" for n in expert_dirs for f in ("adapter_config.json", "adapter_model.safetensors")]
    )
    text = (out / "xlora_config.json").read_text()
    assert str(tmp_path) not in text  # never an absolute path
    data = json.loads(text)
    assert data["format_version"] == 2
    assert [e["name"] for e in data["experts"]] == ["math", "code", "chat"]
    assert all(e["path"] == f"experts/{e['name']}" for e in data["experts"])
    assert data["layer_names"] == model.layer_names and data["n_layers"] == model.n_layers == 8
    assert data["n_experts"] == 3 and data["hidden_size"] == 32

    loaded = XLoraModel.from_pretrained(out, base_model=tiny_llama())
    assert loaded.expert_names == ["math", "code", "chat"]
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    generate = dict(input_ids=IDS[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(loaded.generate(**generate), model.generate(**generate))


@pytest.mark.parametrize(
    "settings",
    [
        dict(layerwise_scalings=True, xlora_depth=2, xlora_size=16, softmax_temperature=0.5),
        dict(xlora_depth=3, xlora_size=8, xlora_dropout_p=0.0, top_k_lora=2, enable_softmax_topk=True),
        dict(enable_softmax=False, scaling_pass_value=None, global_scaling_weight=0.7),
    ],
)
def test_round_trip_keeps_every_setting(expert_dirs, tmp_path, settings):
    model = make_mixture(expert_dirs, **settings)
    model.save_pretrained(tmp_path / "mix")
    loaded = load_mixture(tmp_path / "mix", base_model=tiny_llama())
    for key, value in settings.items():
        assert getattr(loaded.xlora_config, key) == value
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_base_model_loaded_from_the_config_reference(expert_dirs, tmp_path):
    import transformers

    tiny_llama().save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = make_mixture(expert_dirs, base=base)
    assert model.xlora_config.base_model.repo_id == str(tmp_path / "base")
    model.save_pretrained(tmp_path / "mix")
    loaded = XLoraModel.from_pretrained(tmp_path / "mix")  # no base_model: taken from the config
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    double = XLoraModel.from_pretrained(tmp_path / "mix", torch_dtype=torch.float64, device="cpu")
    assert double.dtype == torch.float64 and double.classifier.last_layer.weight.dtype == torch.float64
    torch.testing.assert_close(logits(double).float(), logits(model), rtol=1e-4, atol=1e-4)


def test_base_model_loaded_from_a_relative_folder_is_recorded_absolute(expert_dirs, tmp_path, monkeypatch):
    import transformers

    monkeypatch.chdir(tmp_path)
    tiny_llama().save_pretrained("base")
    model = make_mixture(expert_dirs, base=transformers.AutoModelForCausalLM.from_pretrained("base"))
    assert model.xlora_config.base_model.repo_id == str((tmp_path / "base").resolve())
    model.save_pretrained("mix")
    monkeypatch.chdir(expert_dirs["math"])  # anywhere else
    torch.testing.assert_close(logits(XLoraModel.from_pretrained(tmp_path / "mix")), logits(model), rtol=0, atol=0)


def test_relative_base_model_path_is_taken_inside_the_mixture(expert_dirs, tmp_path, monkeypatch):
    # A self-contained folder (the base model inside it, named "./base_model") loads from any directory.
    from xlora_hub import BaseModelRef

    model = make_mixture(expert_dirs)
    model.xlora_config = model.xlora_config.replace(base_model=BaseModelRef(repo_id="./base_model"))
    folder = model.save_pretrained(tmp_path / "mix")
    tiny_llama().save_pretrained(tmp_path / "mix" / "base_model")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    loaded = XLoraModel.from_pretrained(folder)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    moved = shutil.move(str(folder), str(tmp_path / "moved"))
    torch.testing.assert_close(logits(XLoraModel.from_pretrained(moved)), logits(model), rtol=0, atol=0)
    shutil.rmtree(Path(moved) / "base_model")
    with pytest.raises(InvalidMixtureError, match=r"relative path './base_model'.*does not exist.*base_model="):
        XLoraModel.from_pretrained(moved)
    config_path = Path(moved) / "xlora_config.json"
    config = json.loads(config_path.read_text())
    config["base_model"]["repo_id"] = "../outside"
    config_path.write_text(json.dumps(config))
    with pytest.raises(InvalidMixtureError, match="escapes the mixture"):
        XLoraModel.from_pretrained(moved)


def test_base_model_class_comes_from_its_architectures(tmp_path):
    import transformers

    tiny_bert_classifier().save_pretrained(tmp_path / "bert")
    experts = {
        n: save_expert(tiny_bert_classifier, tmp_path / n, target_modules=["query", "value"], seed=s)
        for n, s in (("a", 1), ("b", 2))
    }
    base = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "bert")
    model = make_mixture(experts, base=base)
    model.save_pretrained(tmp_path / "mix")
    loaded = XLoraModel.from_pretrained(tmp_path / "mix")
    assert type(loaded.model).__name__ == "BertForSequenceClassification"
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_saving_again_over_an_existing_mixture(expert_dirs, tmp_path):
    first = make_mixture(expert_dirs, seed=1)
    first.save_pretrained(tmp_path / "mix")
    second = make_mixture(expert_dirs, seed=2)
    second.save_pretrained(tmp_path / "mix")
    loaded = load_mixture(tmp_path / "mix", base_model=tiny_llama())
    torch.testing.assert_close(logits(loaded), logits(second), rtol=0, atol=0)
    # a mixture loaded from a folder saves back into the same folder (its experts are copied onto themselves)
    loaded.save_pretrained(tmp_path / "mix")
    again = load_mixture(tmp_path / "mix", base_model=tiny_llama())
    torch.testing.assert_close(logits(again), logits(second), rtol=0, atol=0)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left behind


def test_trained_experts_are_saved_with_the_mixture(expert_dirs, tmp_path):
    model = make_mixture(expert_dirs, use_trainable_adapters=True)
    lora_params = [p for n, p in model.named_parameters() if "lora_" in n]
    assert lora_params and all(p.requires_grad for p in lora_params)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.train()
    for _ in range(3):
        optimizer.zero_grad()
        model(input_ids=IDS, labels=IDS).loss.backward()
        optimizer.step()
    model.eval()
    trained = logits(model)
    model.save_pretrained(tmp_path / "mix")
    data = json.loads((tmp_path / "mix" / "xlora_config.json").read_text())
    assert all(e["path"] == f"experts/{e['name']}" for e in data["experts"])
    loaded = load_mixture(tmp_path / "mix", base_model=tiny_llama())
    torch.testing.assert_close(logits(loaded), trained, rtol=0, atol=1e-6)
    # the original experts with the same classifier give other outputs: the trained weights were saved
    original = make_mixture(expert_dirs)
    original.classifier.load_state_dict(loaded.classifier.state_dict())
    assert (logits(original) - trained).abs().max() > 1e-3


def test_trained_expert_files_have_peft_keys_and_the_model_keeps_its_wrappers(expert_dirs, tmp_path):
    """Trained experts are exported with peft's own get_peft_model_state_dict: the same keys, shapes and config
    peft wrote for the original adapters; the X-LoRA layers are back in place after the export."""
    model = make_mixture(expert_dirs, use_trainable_adapters=True)
    out = model.save_pretrained(tmp_path / "mix")
    for name, original in expert_dirs.items():
        with safe_open(str(original / "adapter_model.safetensors"), framework="pt") as f:
            expected = {key: f.get_slice(key).get_shape() for key in f.keys()}
        with safe_open(str(out / "experts" / name / "adapter_model.safetensors"), framework="pt") as f:
            saved = {key: f.get_slice(key).get_shape() for key in f.keys()}
        assert saved == expected, name
    assert all(model.model.get_submodule(layer.module_name) is layer for layer in model.xlora_layers)
    assert not [n for n, m in model.model.named_modules() if isinstance(m, LoraLayer)]  # wrappers, not peft layers
    torch.testing.assert_close(logits(load_mixture(out, base_model=tiny_llama())), logits(model), rtol=0, atol=1e-6)


def test_classifier_metadata_and_model_card(expert_dirs, tmp_path):
    model = make_mixture(expert_dirs, layerwise_scalings=True)
    out = model.save_pretrained(tmp_path / "mix")
    with safe_open(str(out / "xlora_classifier.safetensors"), framework="pt") as f:
        meta = f.metadata()
        assert sorted(f.keys()) == ["layers.0.bias", "layers.0.weight"]
        assert f.get_slice("layers.0.weight").get_shape() == [3 * 8, 32]
    assert meta["n_layers"] == "8" and meta["n_experts"] == "3" and meta["hidden_size"] == "32"
    assert meta["xlora_format_version"] == "2" and json.loads(meta["expert_names"]) == ["math", "code", "chat"]
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "xlora-hub"
    assert {"x-lora", "lora", "mixture-of-experts"} <= set(card.data.tags)
    for name in expert_dirs:
        assert f"| `{name}` | bundled: [`experts/{name}`](experts/{name})" in card.text
    assert "layerwise_scalings" in card.text and 'XLoraModel.from_pretrained("' in card.text


def test_inspect_local_mixture_reads_no_weights(expert_dirs, tmp_path):
    model = make_mixture(expert_dirs, xlora_depth=2, xlora_size=16)
    out = model.save_pretrained(tmp_path / "mix")
    summary = inspect_mixture(out)
    assert summary.n_experts == 3 and summary.n_layers == 8 and summary.hidden_size == 32
    assert summary.format_version == 2 and summary.commit is None
    assert [e.name for e in summary.experts] == ["math", "code", "chat"]
    assert all(e.kind == "bundled" and e.pinned for e in summary.experts)
    sizes = {e.name: e.size_bytes for e in summary.experts}
    assert sizes == {n: (out / "experts" / n / "adapter_model.safetensors").stat().st_size for n in expert_dirs}
    assert summary.classifier_parameters == sum(p.numel() for p in model.classifier.parameters())
    assert summary.classifier_size_bytes == (out / "xlora_classifier.safetensors").stat().st_size
    assert summary.settings["xlora_depth"] == 2 and "layer_names" not in summary.settings
    assert "math" in str(summary) and "bundled" in str(summary)


# ---------------------------------------------------------------------------------------------- bad input
@pytest.fixture(scope="module")
def pristine(expert_dirs, tmp_path_factory) -> Path:
    return make_mixture(expert_dirs).save_pretrained(tmp_path_factory.mktemp("pristine") / "mix")


@pytest.fixture
def saved(pristine, tmp_path) -> Path:
    """A fresh copy of a saved mixture, for one test to break."""
    return Path(shutil.copytree(pristine, tmp_path / "mix"))


def edit_config(folder: Path, change) -> None:
    path = folder / "xlora_config.json"
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def load_fails(folder: Path, error: type[Exception], match: str):
    base = tiny_llama()
    with pytest.raises(error, match=match):
        load_mixture(folder, base_model=base)
    assert_untouched(base)


def test_unknown_format_version(saved):
    edit_config(saved, lambda d: d.update(format_version=99))
    load_fails(saved, UnsupportedFormatError, "format_version 99 is not supported")


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda d: d.update(xlora_depth="2"), "`xlora_depth` must be an integer"),
        (lambda d: d.update(enable_softmax="yes"), "`enable_softmax` must be true or false"),
        (lambda d: d.pop("experts"), "missing required field `experts`"),
        (lambda d: d.pop("format_version"), "missing `format_version`"),
        (lambda d: d.pop("layer_names"), "missing `hidden_size` or `layer_names`"),
        (lambda d: d.update(surprise=1), r"unknown field\(s\) \['surprise'\]"),
        (lambda d: d.update(n_experts=5), "`n_experts` is 5 but 3 experts are listed"),
        (lambda d: d["experts"][0].update(name="not valid"), "not a valid identifier"),
    ],
)
def test_config_with_wrong_types_or_missing_fields(saved, change, match):
    edit_config(saved, change)
    load_fails(saved, InvalidConfigError, match)


def test_config_that_is_not_json(saved):
    (saved / "xlora_config.json").write_text("{not json")
    load_fails(saved, InvalidConfigError, "not valid JSON")


@pytest.mark.parametrize(
    "expert",
    [
        {"name": "math", "path": "../outside"},
        {"name": "math", "path": "experts/../../outside"},
        {"name": "math", "path": "/etc"},
        {"name": "math", "path": "experts/math", "subfolder": "../../.."},
        {"name": "math", "repo_id": "alice/lora", "subfolder": "../x"},
    ],
)
def test_paths_that_escape_the_mixture(saved, expert):
    edit_config(saved, lambda d: d["experts"].__setitem__(0, expert))
    load_fails(saved, InvalidMixtureError, "escapes the mixture")


def test_classifier_shapes_that_do_not_match_the_config(saved):
    save_file(
        {"layers.0.weight": torch.zeros(4, 32), "layers.0.bias": torch.zeros(4)},
        str(saved / "xlora_classifier.safetensors"),
    )
    load_fails(saved, InvalidMixtureError, r"layers.0.weight has shape \[4, 32\], expected \[3, 32\]")


def test_classifier_metadata_from_another_mixture(saved):
    path = saved / "xlora_classifier.safetensors"
    with safe_open(str(path), framework="pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
        meta = dict(f.metadata())
    save_file(state, str(path), metadata={**meta, "n_layers": "12"})
    load_fails(saved, InvalidMixtureError, "saved for n_layers=12")


@pytest.mark.parametrize("name", ["xlora_classifier.safetensors", "experts/code/adapter_model.safetensors"])
def test_truncated_safetensors_file(saved, name):
    path = saved / name
    path.write_bytes(path.read_bytes()[:-40])
    error = InvalidMixtureError if name.startswith("xlora") else IncompatibleExpertError
    load_fails(saved, error, "not a readable safetensors file")


def test_layer_names_that_do_not_match_the_base_model(saved):
    edit_config(saved, lambda d: d["layer_names"].reverse())
    load_fails(saved, InvalidMixtureError, "same layers in another order")
    edit_config(saved, lambda d: d["layer_names"].__setitem__(0, "model.layers.9.self_attn.q_proj"))
    load_fails(saved, InvalidMixtureError, "missing .'model.layers.9.self_attn.q_proj'.")


def test_expert_with_only_a_pickle_file_is_refused(saved):
    folder = saved / "experts" / "code"
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    load_fails(saved, IncompatibleExpertError, "only has a pickle adapter_model.bin")


def test_missing_bundled_expert_names_it(saved):
    shutil.rmtree(saved / "experts" / "chat")
    load_fails(saved, ExpertNotFoundError, "Expert 'chat'")


def test_base_model_of_another_size(saved):
    base = tiny_llama(hidden_size=48, intermediate_size=96)
    with pytest.raises((IncompatibleExpertError, InvalidMixtureError), match="hidden size|does not fit"):
        load_mixture(saved, base_model=base)
    assert not any(isinstance(m, LoraLayer) for m in base.modules())


def test_no_base_model_recorded_and_none_given(saved):
    with pytest.raises(InvalidMixtureError, match="names no base model; pass `base_model=`"):
        load_mixture(saved)


def test_missing_folder_file_and_foreign_format(saved, tmp_path):
    with pytest.raises(InvalidMixtureError, match="does not exist"):
        load_mixture(tmp_path / "nowhere", base_model=tiny_llama())
    with pytest.raises(InvalidMixtureError, match="does not exist"):
        load_mixture("./nowhere/at/all", base_model=tiny_llama())
    with pytest.raises(InvalidMixtureError, match="is a file"):
        load_mixture(str(saved / "README.md"), base_model=tiny_llama())
    with pytest.raises(InvalidMixtureError, match="has no xlora_config.json"):
        load_mixture(saved / "experts", base_model=tiny_llama())
    with pytest.raises(InvalidMixtureError, match="`revision` applies to Hub repos only"):
        load_mixture(saved, base_model=tiny_llama(), revision="main")
    edit_config(saved, lambda d: d.clear() or d.update(hidden_size=32, adapters=["a"], base_model_id="x/y"))
    with pytest.raises(UnsupportedFormatError, match="xlora_hub.convert.import_mixture"):
        load_mixture(saved, base_model=tiny_llama())


def test_missing_classifier_file(saved):
    (saved / "xlora_classifier.safetensors").unlink()
    load_fails(saved, InvalidMixtureError, "xlora_classifier.safetensors is missing")


def test_save_to_a_file_path_is_refused(expert_dirs, tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError):
        make_mixture(expert_dirs).save_pretrained(tmp_path / "file")
