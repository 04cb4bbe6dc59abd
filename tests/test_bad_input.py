"""Invalid configs and unusable experts: clear errors that name the culprit, and nothing half-built."""

from __future__ import annotations

import pytest
import torch
from factories import save_expert, tiny_llama

from xlora_hub import (
    ExpertNotFoundError,
    ExpertRef,
    IncompatibleExpertError,
    InvalidConfigError,
    InvalidMixtureError,
    UnsupportedFormatError,
    XLoraConfig,
    XLoraModel,
)

TWO = {"a": "./x", "b": "./y"}


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"experts": {}}, "at least one expert"),
        ({"experts": TWO, "xlora_depth": 0}, "`xlora_depth` must be at least 1"),
        ({"experts": TWO, "xlora_depth": -2}, "`xlora_depth` must be at least 1"),
        ({"experts": TWO, "top_k_lora": 0}, r"`top_k_lora` must be between 1 and the number of experts \(2\)"),
        ({"experts": TWO, "top_k_lora": 3}, r"`top_k_lora` must be between 1 and the number of experts \(2\)"),
        ({"experts": TWO, "enable_softmax_topk": True}, "`enable_softmax_topk=True` needs `top_k_lora`"),
        ({"experts": TWO, "softmax_temperature": 0}, "`softmax_temperature` must be > 0"),
        ({"experts": TWO, "softmax_temperature": -1.0}, "`softmax_temperature` must be > 0"),
        ({"experts": [{"name": "a", "path": "./x"}, {"name": "a", "path": "./y"}]}, "Duplicate expert name 'a'"),
        ({"experts": {"not valid": "./x"}}, "'not valid' is not a valid identifier"),
        ({"experts": TWO, "xlora_dropout_p": 1.5}, "xlora_dropout_p"),
        ({"experts": TWO, "enable_softmax": "yes"}, "`enable_softmax` must be true or false"),
        ({"experts": TWO, "hidden_size": -3}, "`hidden_size` must be a positive integer"),
        ({"experts": {"a": "not a repo!"}}, "neither an existing local folder nor a valid Hub repo id"),
    ],
)
def test_invalid_config(kwargs, message):
    with pytest.raises(InvalidConfigError, match=message):
        XLoraConfig(**kwargs)


def test_expert_ref_parsing():
    ref = ExpertRef.parse("org/lora-math@v1.0:adapters/math")
    assert (ref.repo_id, ref.revision, ref.subfolder) == ("org/lora-math", "v1.0", "adapters/math")
    assert str(ref) == "org/lora-math@v1.0:adapters/math"
    assert not ref.is_pinned
    assert ExpertRef.parse("org/x@" + "a" * 40).is_pinned
    assert ExpertRef.parse("./experts/math").path == "./experts/math"
    with pytest.raises(InvalidConfigError, match="empty revision"):
        ExpertRef.parse("org/x@")


def test_config_json_round_trip_and_version(tmp_path):
    config = XLoraConfig(experts={"a": "org/a@main", "b": "./b"}, top_k_lora=1, layer_names=["x", "y"])
    config.save(tmp_path / "c.json")
    assert XLoraConfig.load(tmp_path / "c.json") == config
    data = config.to_dict()
    assert data["n_layers"] == 2 and data["n_experts"] == 2 and data["format_version"] == 2
    with pytest.raises(UnsupportedFormatError, match="format_version 99 is not supported"):
        XLoraConfig.from_dict({**data, "format_version": 99})
    with pytest.raises(InvalidConfigError, match="missing `format_version`"):
        XLoraConfig.from_dict({k: v for k, v in data.items() if k != "format_version"})
    with pytest.raises(InvalidConfigError, match=r"unknown field\(s\) \['surprise'\]"):
        XLoraConfig.from_dict({**data, "surprise": 1})
    with pytest.raises(InvalidConfigError, match="`xlora_depth` must be an integer"):
        XLoraConfig.from_dict({**data, "xlora_depth": "3"})
    with pytest.raises(InvalidConfigError, match="missing required field `experts`"):
        XLoraConfig.from_dict({k: v for k, v in data.items() if k not in ("experts", "n_experts")})


def _assert_untouched(model: torch.nn.Module, before: dict) -> None:
    after = model.state_dict()
    assert list(after) == list(before), "the base model was modified"
    assert all(torch.equal(after[k], before[k]) for k in before)
    assert not any("lora" in type(m).__name__.lower() for m in model.modules())


@pytest.fixture(scope="module")
def good_expert(tmp_path_factory):
    return save_expert(tiny_llama, tmp_path_factory.mktemp("good") / "good", target_modules=["q_proj"])


def test_dora_expert_is_refused(tmp_path, good_expert):
    dora = save_expert(tiny_llama, tmp_path / "dora", target_modules=["q_proj"], use_dora=True)
    base = tiny_llama()
    before = base.state_dict()
    with pytest.raises(IncompatibleExpertError, match="Expert 'fancy' is a DoRA adapter"):
        XLoraModel.from_experts(base, XLoraConfig(experts={"good": str(good_expert), "fancy": str(dora)}))
    _assert_untouched(base, before)


def test_missing_expert_path(tmp_path, good_expert):
    base = tiny_llama()
    before = base.state_dict()
    missing = tmp_path / "nowhere"
    with pytest.raises(ExpertNotFoundError, match="Expert 'gone': local folder .*nowhere.* does not exist"):
        XLoraModel.from_experts(base, XLoraConfig(experts={"good": str(good_expert), "gone": str(missing)}))
    _assert_untouched(base, before)


def test_expert_for_another_hidden_size(tmp_path, good_expert):
    wide = save_expert(lambda: tiny_llama(hidden_size=48), tmp_path / "wide", target_modules=["q_proj"])
    base = tiny_llama()
    before = base.state_dict()
    with pytest.raises(IncompatibleExpertError, match="Expert 'wide' does not fit this base model.*hidden size"):
        XLoraModel.from_experts(base, XLoraConfig(experts={"good": str(good_expert), "wide": str(wide)}))
    _assert_untouched(base, before)


def test_expert_for_another_architecture(tmp_path, good_expert):
    from factories import tiny_gpt2

    other = save_expert(tiny_gpt2, tmp_path / "gpt2", target_modules=["c_attn"])
    base = tiny_llama()
    with pytest.raises(IncompatibleExpertError, match="Expert 'other' targets module .*c_attn.*another architecture"):
        XLoraModel.from_experts(base, XLoraConfig(experts={"good": str(good_expert), "other": str(other)}))


def test_pickle_only_expert_is_refused(tmp_path, good_expert):
    folder = save_expert(tiny_llama, tmp_path / "pickled", target_modules=["q_proj"])
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model.bin")
    with pytest.raises(IncompatibleExpertError, match="only has a pickle adapter_model.bin"):
        XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={"good": str(good_expert), "old": str(folder)}))


def test_truncated_expert_weights(tmp_path, good_expert):
    folder = save_expert(tiny_llama, tmp_path / "cut", target_modules=["q_proj"])
    path = folder / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:50])
    with pytest.raises(IncompatibleExpertError, match="Expert 'cut'.*not a readable safetensors file"):
        XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={"good": str(good_expert), "cut": str(folder)}))


def test_mixture_config_for_another_hidden_size(good_expert):
    config = XLoraConfig(experts={"good": str(good_expert)}, hidden_size=64)
    base = tiny_llama()
    before = base.state_dict()
    with pytest.raises(InvalidMixtureError, match="hidden size 64 but the base model"):
        XLoraModel.from_experts(base, config)
    _assert_untouched(base, before)


def test_layer_names_that_do_not_match_leave_the_base_model_as_it_was(good_expert):
    config = XLoraConfig(experts={"good": str(good_expert)}, layer_names=["model.layers.0.self_attn.k_proj"])
    base = tiny_llama()
    before = base.state_dict()
    with pytest.raises(InvalidMixtureError, match="do not match the layers built on this base model"):
        XLoraModel.from_experts(base, config)
    _assert_untouched(base, before)
