"""``XLoraModel.routing_options``: temporary routing settings, validated together, restored on exit; and the
softmax temperature kept in one place (the model's config, which the classifier reads)."""

from __future__ import annotations

import math

import pytest
import torch
from factories import VOCAB, save_expert, tiny_llama

from xlora_hub import InvalidConfigError, XLoraConfig, XLoraModel

IDS = torch.randint(3, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing-options")
    experts = {
        "e0": str(save_expert(tiny_llama, root / "e0", target_modules=["q_proj", "v_proj"], r=4, seed=1)),
        "e1": str(save_expert(tiny_llama, root / "e1", target_modules=["up_proj", "down_proj"], r=2, seed=2)),
        "e2": str(save_expert(tiny_llama, root / "e2", target_modules=["q_proj", "o_proj"], r=3, seed=3)),
    }
    model = XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts=experts))
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(4)))
    return model


def _settings(model) -> tuple:
    config = model.xlora_config
    return config.top_k_lora, config.global_scaling_weight, config.softmax_temperature


def test_options_apply_inside_the_block_and_are_restored(model):
    before = _settings(model)
    with torch.no_grad():
        dense = model(input_ids=IDS).logits
        with model.routing_options(top_k_lora=1, global_scaling_weight=0.5, softmax_temperature=0.2) as config:
            assert _settings(model) == (1, 0.5, 0.2) == (config.top_k_lora, 0.5, config.softmax_temperature)
            assert model.classifier.softmax_temperature == 0.2
            inside = model(input_ids=IDS).logits
            model.set_topk_lora(1)  # the same value set by hand: still restored on exit
        after = model(input_ids=IDS).logits
    assert _settings(model) == before and model.classifier.softmax_temperature == 1.0
    assert not torch.allclose(inside, dense, atol=1e-4)
    assert torch.equal(after, dense)


def test_options_match_the_setters(model):
    with torch.no_grad(), model.routing_options(top_k_lora=2, softmax_temperature=0.3):
        inside = model(input_ids=IDS).logits
    model.set_topk_lora(2)
    model.set_softmax_temperature(0.3)
    try:
        with torch.no_grad():
            by_setters = model(input_ids=IDS).logits
    finally:
        model.set_topk_lora(None)
        model.set_softmax_temperature(1.0)
    assert torch.equal(inside, by_setters)


def test_only_the_options_given_change(model):
    model.set_topk_lora(2)
    try:
        with model.routing_options(global_scaling_weight=2.0):
            assert _settings(model) == (2, 2.0, 1.0)
            model.set_softmax_temperature(0.5)  # not an option of this block: it stays after it
        assert _settings(model) == (2, 1.0, 0.5)
        with model.routing_options(top_k_lora=None):  # None is a value (dense), not "not given"
            assert model.xlora_config.top_k_lora is None
        assert model.xlora_config.top_k_lora == 2
    finally:
        model.set_topk_lora(None)
        model.set_softmax_temperature(1.0)


def test_settings_are_restored_when_the_block_raises(model):
    before = _settings(model)
    with pytest.raises(RuntimeError, match="boom"), model.routing_options(top_k_lora=1, softmax_temperature=0.1):
        raise RuntimeError("boom")
    assert _settings(model) == before and model.classifier.softmax_temperature == 1.0


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (dict(top_k_lora=1, global_scaling_weight=math.nan), "`global_scaling_weight` must be a finite number"),
        (dict(top_k_lora=2, softmax_temperature=math.nan), "`softmax_temperature` must be a finite number"),
        (dict(global_scaling_weight=0.5, softmax_temperature=0), "`softmax_temperature` must be > 0"),
        (dict(softmax_temperature=0.5, top_k_lora=4), "`top_k_lora` must be between 1 and the number of experts"),
        (dict(top_k_lora=0), "`top_k_lora` must be between 1"),
    ],
)
def test_a_bad_value_changes_nothing(model, options, message):
    """Validated together before anything is applied: a good value next to a bad one is not left set."""
    before = _settings(model)
    with pytest.raises(InvalidConfigError, match=message), model.routing_options(**options):
        pytest.fail("the block must not run")
    assert _settings(model) == before and model.classifier.softmax_temperature == 1.0


def test_the_temperature_lives_in_one_place(model):
    """The classifier reads the model's config: a config replaced from outside changes its softmax too."""
    assert model.classifier.config is model.xlora_config
    with torch.no_grad():
        model.set_softmax_temperature(0.05)
        sharp_by_setter = model(input_ids=IDS)
    model.set_softmax_temperature(1.0)
    model.xlora_config = model.xlora_config.replace(softmax_temperature=0.05)
    try:
        assert model.classifier.softmax_temperature == 0.05
        with torch.no_grad():
            sharp_by_config = model(input_ids=IDS)
    finally:
        model.set_softmax_temperature(1.0)
    torch.testing.assert_close(sharp_by_config.logits, sharp_by_setter.logits, atol=0, rtol=0)
    assert model.classifier.softmax_temperature == 1.0
