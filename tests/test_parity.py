"""Numerical parity with peft's XLoraModel: same experts, same classifier weights, same logits (1e-5)."""

from __future__ import annotations

import pytest
import torch
from factories import VOCAB, copy_classifier_from_peft, peft_reference, save_expert, tiny_llama, tiny_opt

from xlora_hub import XLoraConfig, XLoraModel

ATOL = 1e-5

OPTIONS = [
    pytest.param({}, id="dense-softmax"),
    pytest.param({"softmax_temperature": 0.3}, id="temperature-0.3"),
    pytest.param({"softmax_temperature": 2.5}, id="temperature-2.5"),
    pytest.param({"top_k_lora": 2}, id="topk-2"),
    pytest.param({"top_k_lora": 1}, id="topk-1"),
    pytest.param({"top_k_lora": 2, "enable_softmax_topk": True, "enable_softmax": False}, id="topk-softmax"),
    pytest.param({"top_k_lora": 2, "enable_softmax_topk": True}, id="topk-softmax-both"),
    pytest.param({"layerwise_scalings": True}, id="layerwise"),
    pytest.param({"layerwise_scalings": True, "top_k_lora": 2}, id="layerwise-topk"),
    pytest.param({"xlora_depth": 1}, id="depth-1"),
    pytest.param({"xlora_depth": 3, "xlora_size": 16}, id="depth-3"),
    pytest.param({"xlora_depth": 3, "xlora_size": 16, "xlora_dropout_p": 0.0}, id="depth-3-nodropout"),
    pytest.param({"global_scaling_weight": 0.6}, id="global-weight"),
    pytest.param({"scaling_pass_value": 0.0}, id="scaling-pass-0"),
    pytest.param({"scaling_pass_value": None}, id="scaling-pass-none"),
    pytest.param({"scaling_pass_value": 0.25, "top_k_lora": 2}, id="scaling-pass-0.25-topk"),
]


@pytest.fixture(scope="module")
def llama_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("llama-experts")
    return [
        save_expert(tiny_llama, root / "e0", target_modules=["q_proj", "v_proj"], r=4, alpha=8, seed=1),
        save_expert(tiny_llama, root / "e1", target_modules=["o_proj", "up_proj", "down_proj"], r=2, alpha=4, seed=2),
        save_expert(
            tiny_llama,
            root / "e2",
            target_modules=["q_proj", "k_proj", "gate_proj", "embed_tokens"],
            r=8,
            alpha=4,
            seed=3,
        ),
    ]


@pytest.fixture(scope="module")
def opt_experts(tmp_path_factory):
    root = tmp_path_factory.mktemp("opt-experts")
    return [
        save_expert(tiny_opt, root / "e0", target_modules=["q_proj", "v_proj"], r=4, seed=4),
        save_expert(tiny_opt, root / "e1", target_modules=["k_proj", "out_proj"], r=2, alpha=16, seed=5),
        save_expert(tiny_opt, root / "e2", target_modules=["q_proj", "embed_tokens"], r=6, seed=6),
    ]


def _pair(factory, expert_dirs, options):
    """peft's model and ours over the same experts, with peft's classifier copied into ours in memory."""
    peft_options = dict(options)
    scaling_pass_value = peft_options.pop("scaling_pass_value", 0.0)
    reference = peft_reference(factory, expert_dirs, **peft_options)
    # peft's config rejects None at construction; its setter is the documented way.
    reference.set_scaling_pass_value(scaling_pass_value)
    # Make the classifier non-trivial so routing differs per token.
    with torch.no_grad():
        for p in reference.base_model.internal_xlora_classifier.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    config = XLoraConfig(experts={f"expert_{i}": str(d) for i, d in enumerate(expert_dirs)}, **options)
    ours = XLoraModel.from_experts(factory(), config)
    copy_classifier_from_peft(ours, reference)
    return reference, ours


@pytest.mark.parametrize("options", OPTIONS)
@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_logits_and_scalings_match_peft(arch, options, llama_experts, opt_experts):
    factory, experts = (tiny_llama, llama_experts) if arch == "llama" else (tiny_opt, opt_experts)
    reference, ours = _pair(factory, experts, options)
    torch.manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (2, 11))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :3] = 0
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).logits
        actual = ours(input_ids=input_ids, attention_mask=attention_mask).logits
        base = factory()(input_ids=input_ids, attention_mask=attention_mask).logits
    # the experts really change the output, so agreeing with peft is not agreeing with the base model
    assert (expected - base).abs().max() > 1e-3
    torch.testing.assert_close(actual, expected, atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.get_latest_scalings(), reference.get_latest_scalings(), atol=ATOL, rtol=0)
    assert ours.get_latest_scalings().shape == (2, 11, ours.n_layers, 3)


def test_layer_order_is_peft_order(llama_experts):
    reference, ours = _pair(tiny_llama, llama_experts, {})
    from peft.tuners.lora import LoraLayer

    peft_order = [n for n, m in reference.base_model.lora_model.model.named_modules() if isinstance(m, LoraLayer)]
    assert ours.layer_names == peft_order
    assert ours.xlora_config.layer_names == peft_order
    assert ours.n_layers == reference.base_model.internal_xlora_classifier.n_layers


def test_inputs_embeds_match_input_ids(llama_experts):
    _, ours = _pair(tiny_llama, llama_experts, {"layerwise_scalings": True})
    input_ids = torch.randint(3, VOCAB, (2, 7))
    # experts on embed_tokens adapt the lookup itself, so compare on a mixture without them
    config = XLoraConfig(experts={"a": str(llama_experts[0]), "b": str(llama_experts[1])})
    model = XLoraModel.from_experts(tiny_llama(), config)
    with torch.no_grad():
        embeds = model.model.get_input_embeddings()(input_ids)
        by_ids = model(input_ids=input_ids).logits
        by_embeds = model(inputs_embeds=embeds).logits
    torch.testing.assert_close(by_embeds, by_ids, atol=ATOL, rtol=0)


def test_labels_give_the_transformers_loss(llama_experts):
    _, ours = _pair(tiny_llama, llama_experts, {})
    input_ids = torch.randint(3, VOCAB, (2, 9))
    with torch.no_grad():
        out = ours(input_ids=input_ids, labels=input_ids)
    shifted = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), input_ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, shifted, atol=1e-5, rtol=0)
