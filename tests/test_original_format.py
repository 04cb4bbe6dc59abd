"""The original ``xlora`` package's format, against checkpoints the original package itself wrote (issue 16).

The fixtures under ``fixtures/original_xlora/`` were written by EricLBuehler/xlora at 8217992 (0.1.0) with
``make_fixtures.py`` (the commit and versions are in its ``manifest.json``), with the original's logits on fixed
input ids. These tests need only those files, not the original package: each checkpoint imports to the
recorded logits, and its export (``export_xlora`` / ``--to xlora``) holds the same files, tensor keys and values.
``check_roundtrip.py`` runs the original package itself on the exports.
"""

from __future__ import annotations

import functools
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
import transformers as tf
from safetensors import safe_open
from safetensors.torch import load_file

from xlora_hub import InvalidConfigError, UnsupportedFormatError, XLoraConfig, XLoraModel
from xlora_hub.cli import main as cli_main
from xlora_hub.convert import export_mistralrs, export_xlora, import_mixture
from xlora_hub.convert import main as convert_main
from xlora_hub.convert.softmax_topk import original_logits, softmax_topk_change

FIXTURES = Path(__file__).parent / "fixtures" / "original_xlora"
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CASES = [name for name, settings in MANIFEST["cases"].items() if not settings.get("enable_softmax_topk")]
TOPK = "d2_softmax_topk"


def base() -> tf.PreTrainedModel:
    return tf.LlamaForCausalLM.from_pretrained(FIXTURES / "base").eval()


def recorded(name: str) -> dict[str, torch.Tensor]:
    return load_file(str(FIXTURES / name / "logits.safetensors"))


def logits(model: XLoraModel, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


@functools.cache
def imported(name: str) -> XLoraModel:
    """The fixture imported once per test session (the tests only read it)."""
    accept = bool(MANIFEST["cases"][name].get("enable_softmax_topk"))
    return import_mixture(FIXTURES / name / "checkpoint", base_model=base(), accept_softmax_topk_change=accept)


def files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def assert_same_folder(ours: Path, theirs: Path) -> None:
    """The same files; JSON files equal as data; safetensors files with the same keys and exactly equal values."""
    assert files(ours) == files(theirs)
    for rel in files(theirs):
        if rel.endswith(".json"):
            assert json.loads((ours / rel).read_text()) == json.loads((theirs / rel).read_text()), rel
        else:
            mine, original = load_file(str(ours / rel)), load_file(str(theirs / rel))
            assert sorted(mine) == sorted(original), rel
            for key, value in original.items():
                assert mine[key].dtype == value.dtype and torch.equal(mine[key], value), f"{rel}: {key}"


# ---------------------------------------------------------------------------------------------- import
def test_fixtures_are_what_the_original_wrote():
    assert MANIFEST["xlora_commit"].startswith("8217992")
    assert {s["xlora_depth"] for s in MANIFEST["cases"].values()} == {1, 2, 3}
    with safe_open(str(FIXTURES / "d3_bias_flat" / "checkpoint" / "xlora_classifier.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["inner.0.bias", "inner.0.weight", "inner.3.bias", "inner.3.weight"] + [
            "last.bias",
            "last.weight",
        ]  # numbered by module position (ReLU and Dropout counted)


@pytest.mark.parametrize("name", CASES)
def test_import_gives_the_originals_logits(name):
    expected = recorded(name)
    model = imported(name)
    assert model.expert_names == list(MANIFEST["experts"])
    assert model.xlora_config.xlora_depth == MANIFEST["cases"][name]["xlora_depth"]
    torch.testing.assert_close(logits(model, expected["input_ids"]), expected["logits"], rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", CASES)
def test_export_equals_the_originals_checkpoint(name, tmp_path):
    out = export_xlora(imported(name), tmp_path / "xlora")
    assert_same_folder(out, FIXTURES / name / "checkpoint")


def test_cli_convert_to_xlora_at_depth_3(tmp_path, capsys):
    name = "d3_nobias_layerwise"
    args = [
        "convert",
        str(FIXTURES / name / "checkpoint"),
        str(tmp_path / "mix"),
        "--base-model",
        str(FIXTURES / "base"),
    ]
    assert cli_main([*args, "--to", "xlora-hub"]) == 0
    back = ["convert", str(tmp_path / "mix"), str(tmp_path / "xlora"), "--to", "xlora", "--base-model"]
    assert cli_main([*back, str(FIXTURES / "base"), "--base-model-id", MANIFEST["base"]["base_model_id"]]) == 0
    assert "to xlora:" in capsys.readouterr().out
    assert_same_folder(tmp_path / "xlora", FIXTURES / name / "checkpoint")
    module_args = [
        "export",
        "xlora",
        str(tmp_path / "mix"),
        str(tmp_path / "m"),
        "--base-model",
        str(FIXTURES / "base"),
    ]
    assert convert_main(module_args) == 0  # python -m xlora_hub.convert export xlora ...
    assert_same_folder(tmp_path / "m", FIXTURES / name / "checkpoint")
    again = import_mixture(tmp_path / "xlora", base_model=base())
    expected = recorded(name)
    torch.testing.assert_close(logits(again, expected["input_ids"]), expected["logits"], rtol=0, atol=1e-6)


def test_mistralrs_export_keeps_its_naming_and_both_namings_import(tmp_path):
    name = "d3_bias_flat"
    model, expected = imported(name), recorded(name)
    rs = export_mistralrs(model, tmp_path / "rs", base_model_id="owner/base")
    with safe_open(str(rs / "xlora_classifier.safetensors"), "pt") as f:
        assert {k.rsplit(".", 1)[0] for k in f.keys()} == {"inner.0", "inner.1", "last"}  # by Linear layer
    for folder in (rs, export_xlora(model, tmp_path / "xlora")):
        again = import_mixture(folder, base_model=base())
        torch.testing.assert_close(logits(again, expected["input_ids"]), expected["logits"], rtol=0, atol=1e-6)


def test_export_xlora_bad_input(tmp_path):
    with pytest.raises(InvalidConfigError, match="non-zero biases"):
        export_xlora(imported("d2_bias_flat"), tmp_path / "a", use_bias=False)
    experts = {n: str(FIXTURES / "d1_bias_flat" / "checkpoint" / n) for n in MANIFEST["experts"]}
    base_dir = tmp_path / "base"
    shutil.copytree(FIXTURES / "base", base_dir)
    local = XLoraModel.from_experts(base(), XLoraConfig(experts=experts, base_model=str(base_dir)))
    with pytest.raises(InvalidConfigError, match="local folder .* pass `base_model_id=`"):
        export_xlora(local, tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    first = files(export_xlora(local, tmp_path / "c", base_model_id="owner/base"))
    with pytest.raises(InvalidConfigError, match=r"'.*c' already exists and is not empty.*--overwrite"):
        export_xlora(local, tmp_path / "c", base_model_id="other/base")
    assert files(tmp_path / "c") == first
    assert json.loads((tmp_path / "c" / "xlora_config.json").read_text())["base_model_id"] == "owner/base"


def test_export_xlora_refuses_a_bare_base_name_that_is_a_folder_of_the_mixture(tmp_path, monkeypatch):
    experts = {n: str(FIXTURES / "d1_bias_flat" / "checkpoint" / n) for n in MANIFEST["experts"]}
    mixture = tmp_path / "mix"
    XLoraModel.from_experts(base(), XLoraConfig(experts=experts)).save_pretrained(mixture, bundle_experts=True)
    shutil.copytree(FIXTURES / "base", mixture / "base_model")
    config = json.loads((mixture / "xlora_config.json").read_text())
    config["base_model"] = {"repo_id": "base_model"}  # a valid Hub id too, but here a folder of the mixture
    (mixture / "xlora_config.json").write_text(json.dumps(config))
    monkeypatch.chdir(tmp_path)
    loaded = XLoraModel.from_pretrained(mixture)
    with pytest.raises(
        InvalidConfigError, match=r"local folder 'base_model'.*pass `base_model_id=` \(CLI: --base-model-id\)"
    ):
        export_xlora(loaded, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    out = export_xlora(loaded, tmp_path / "out", base_model_id="owner/base")
    assert json.loads((out / "xlora_config.json").read_text())["base_model_id"] == "owner/base"


# ---------------------------------------------------------------------------------------------- top-k softmax
def test_softmax_topk_import_is_refused_unless_accepted(tmp_path, capsys):
    with pytest.raises(UnsupportedFormatError, match="whole batch at once.*accept_softmax_topk_change=True"):
        import_mixture(FIXTURES / TOPK / "checkpoint", base_model=base())
    args = ["convert", str(FIXTURES / TOPK / "checkpoint"), str(tmp_path / "mix"), "--to", "xlora-hub"]
    args += ["--base-model", str(FIXTURES / "base")]
    assert cli_main(args) == 1
    assert "--accept-softmax-topk-change" in capsys.readouterr().err
    assert cli_main([*args, "--accept-softmax-topk-change"]) == 0


def test_softmax_topk_import_warns_with_the_change_on_a_sample(caplog):
    with caplog.at_level(logging.WARNING, logger="xlora_hub"):
        model = import_mixture(FIXTURES / TOPK / "checkpoint", base_model=base(), accept_softmax_topk_change=True)
    [message] = [r.getMessage() for r in caplog.records if "enable_softmax_topk" in r.getMessage()]
    change = softmax_topk_change(model)
    assert change > 1e-3 and f"change by up to {change:.3g}" in message and "per-token" in message
    expected = recorded(TOPK)
    # the batch-wide function the warning measures against is the original's: it gives the original's logits
    torch.testing.assert_close(original_logits(model, expected["input_ids"]), expected["logits"], rtol=0, atol=1e-6)
    assert (logits(model, expected["input_ids"]) - expected["logits"]).abs().max() > 1e-3


def test_softmax_topk_export_needs_the_same_acceptance(tmp_path):
    with pytest.raises(UnsupportedFormatError, match="enable_softmax_topk"):
        export_xlora(imported(TOPK), tmp_path / "a")
    out = export_xlora(imported(TOPK), tmp_path / "b", accept_softmax_topk_change=True)
    assert_same_folder(out, FIXTURES / TOPK / "checkpoint")


# ---------------------------------------------------------------------------------------------- defaults
def test_missing_enable_relu_and_dropout_takes_the_writers_default(tmp_path):
    name = "d2_bias_flat"
    folder = tmp_path / "ckpt"
    shutil.copytree(FIXTURES / name / "checkpoint", folder)
    config = json.loads((folder / "xlora_config.json").read_text())
    del config["enable_relu_and_dropout"]
    (folder / "xlora_config.json").write_text(json.dumps(config))
    expected = recorded(name)  # the original package: missing means true
    model = import_mixture(folder, base_model=base())
    torch.testing.assert_close(logits(model, expected["input_ids"]), expected["logits"], rtol=0, atol=1e-6)
    (folder / "ordering.json").write_text(json.dumps({"order": list(MANIFEST["experts"])}))  # written for mistral.rs
    with pytest.raises(UnsupportedFormatError, match=r"without ReLU .*missing: mistral\.rs's default"):
        import_mixture(folder, base_model=base())
