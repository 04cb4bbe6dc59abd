"""The control and logging API, disabled adapters, trainability."""

from __future__ import annotations

import pytest
import torch
from factories import VOCAB, copy_classifier_from_peft, peft_reference, save_expert, tiny_llama

from xlora_hub import InvalidConfigError, XLoraConfig, XLoraModel


@pytest.fixture(scope="module")
def experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("api-experts")
    return [
        save_expert(tiny_llama, root / "e0", target_modules=["q_proj", "v_proj"], r=4, seed=1),
        save_expert(tiny_llama, root / "e1", target_modules=["up_proj", "down_proj"], r=2, seed=2),
        save_expert(tiny_llama, root / "e2", target_modules=["q_proj", "o_proj"], r=3, seed=3),
    ]


def _model(experts, **options):
    config = XLoraConfig(experts={f"e{i}": str(d) for i, d in enumerate(experts)}, **options)
    model = XLoraModel.from_experts(tiny_llama(), config)
    with torch.no_grad():
        for p in model.classifier.parameters():
            p.copy_(torch.randn_like(p))
    return model


IDS = torch.randint(3, VOCAB, (2, 8), generator=torch.Generator().manual_seed(0))


def test_disabled_adapters_are_exactly_the_base_model(experts):
    model = _model(experts)
    base = tiny_llama()(input_ids=IDS).logits
    with torch.no_grad():
        mixed = model(input_ids=IDS).logits
        model.disable_adapter_layers()
        assert not model.adapters_enabled
        disabled = model(input_ids=IDS).logits
        model.enable_adapter_layers()
        with model.disable_adapter():
            in_context = model(input_ids=IDS).logits
        again = model(input_ids=IDS).logits
    assert torch.equal(disabled, base)
    assert torch.equal(in_context, base)
    assert not torch.allclose(mixed, base, atol=1e-4)
    assert torch.equal(again, mixed)


def test_expert_with_zero_b_is_the_base_model(tmp_path):
    zero = save_expert(tiny_llama, tmp_path / "zero", target_modules=["q_proj", "v_proj", "down_proj"], zero_b=True)
    model = _model([zero])
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, tiny_llama()(input_ids=IDS).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "setter, value, peft_field",
    [
        ("set_topk_lora", 1, "top_k_lora"),
        ("set_global_scaling_weight", 0.3, "global_scaling_weight"),
        ("set_scaling_pass_value", None, None),
        ("set_scaling_pass_value", 0.5, None),
    ],
)
def test_setters_change_outputs_like_peft(experts, setter, value, peft_field):
    reference = peft_reference(tiny_llama, experts)
    with torch.no_grad():
        for p in reference.base_model.internal_xlora_classifier.parameters():
            p.copy_(torch.randn_like(p))
    ours = _model(experts)
    copy_classifier_from_peft(ours, reference)
    with torch.no_grad():
        before = ours(input_ids=IDS).logits
        getattr(ours, setter)(value)
        getattr(reference, setter)(value)
        after = ours(input_ids=IDS).logits
        expected = reference(input_ids=IDS).logits
    assert not torch.allclose(before, after, atol=1e-5)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)


def test_setters_validate_their_input(experts):
    model = _model(experts)
    with pytest.raises(InvalidConfigError, match="top_k_lora"):
        model.set_topk_lora(4)
    with pytest.raises(InvalidConfigError, match="softmax_temperature"):
        model.set_softmax_temperature(0)
    assert model.xlora_config.top_k_lora is None
    model.set_global_scaling_weight(2.0)
    assert model.get_global_scaling_weight() == 2.0


def test_softmax_temperature_sharpens_routing(experts):
    model = _model(experts)
    with torch.no_grad():
        model(input_ids=IDS)
        soft = model.get_latest_scalings().max(-1).values.mean()
        model.set_softmax_temperature(0.05)
        model(input_ids=IDS)
        sharp = model.get_latest_scalings().max(-1).values.mean()
    assert sharp > soft


def test_scalings_log_and_buckets(experts):
    model = _model(experts)
    assert model.get_latest_scalings() is None
    with torch.no_grad():
        model(input_ids=IDS)  # not logged
        model.enable_scalings_logging()
        model(input_ids=IDS[:, :5])
        model(input_ids=IDS)
        model(input_ids=IDS[:, :5])
        model.disable_scalings_logging()
        model(input_ids=IDS)  # not logged, log kept
    log = model.get_scalings_log()
    assert [t.shape[1] for t in log] == [5, 8, 5]
    assert all(t.shape == (2, t.shape[1], model.n_layers, 3) for t in log)
    torch.testing.assert_close(log[0].sum(-1), torch.ones(2, 5, model.n_layers))
    log.clear()
    assert len(model.get_scalings_log()) == 3  # a copy
    buckets = model.get_bucketed_scalings_log()
    assert sorted(buckets) == [5, 8]
    assert buckets[5][0] == [0, 2] and buckets[8][0] == [1]
    assert torch.equal(buckets[5][1][1], model.get_scalings_log()[2])
    model.clear_scalings_log()
    assert model.get_scalings_log() == []


def test_only_the_classifier_trains_by_default(experts, capsys):
    model = _model(experts)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("classifier.") for n in trainable)
    model.print_trainable_parameters()
    n_classifier = sum(p.numel() for p in model.classifier.parameters())
    assert f"trainable params: {n_classifier:,d}" in capsys.readouterr().out


def test_trainable_adapters_get_gradients(experts):
    model = _model(experts, use_trainable_adapters=True)
    model.train()
    loss = model(input_ids=IDS, labels=IDS).loss
    loss.backward()
    lora_grads = [p.grad for n, p in model.named_parameters() if "lora_B" in n]
    assert lora_grads and all(g is not None and g.abs().sum() > 0 for g in lora_grads)
    assert model.classifier.last_layer.weight.grad.abs().sum() > 0
    base_params = [p for n, p in model.named_parameters() if "lora_" not in n and not n.startswith("classifier.")]
    assert all(not p.requires_grad for p in base_params)


def test_classifier_dropout_only_in_training(experts):
    model = _model(experts, xlora_depth=2, xlora_size=64, xlora_dropout_p=0.5)
    with torch.no_grad():
        model.eval()
        assert torch.equal(model(input_ids=IDS).logits, model(input_ids=IDS).logits)
        model.train()
        assert not torch.equal(model(input_ids=IDS).logits, model(input_ids=IDS).logits)
