"""The stacked computation of each X-LoRA layer against peft's per-expert loop, layer by layer."""

from __future__ import annotations

import types

import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft import XLoraConfig as PeftXLoraConfig
from peft.tuners.xlora.layer import XLoraConv2dLayer, XLoraEmbeddingLayer, XLoraLinearLayer
from torch import nn

from xlora_hub.layers import RoutingState, XLoraConv2d, XLoraEmbedding, XLoraLinear

EXPERTS = ["a", "b", "c"]


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(12, 10)
        self.emb = nn.Embedding(20, 12)
        self.conv = nn.Conv2d(3, 5, kernel_size=3, padding=1)


def _peft_net(seed=0):
    """One net with three experts of different ranks; expert 'c' skips the Linear layer."""
    torch.manual_seed(seed)
    specs = {
        "a": LoraConfig(r=2, lora_alpha=4, target_modules=["proj", "emb", "conv"]),
        "b": LoraConfig(r=5, lora_alpha=3, target_modules=["proj", "emb", "conv"]),
        "c": LoraConfig(r=3, lora_alpha=9, target_modules=["emb", "conv"], use_rslora=True),
    }
    model = get_peft_model(Net(), specs["a"], adapter_name="a")
    for name in ("b", "c"):
        model.add_adapter(name, specs[name])
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p) * 0.3)
    model.base_model.set_adapter(EXPERTS)
    return model.base_model.model.eval()


def _peft_layer(cls, target, gsw, top_k=None, softmax_topk=False):
    config = PeftXLoraConfig(
        hidden_size=12, adapters={}, global_scaling_weight=gsw, top_k_lora=top_k, enable_softmax_topk=softmax_topk
    )
    owner = types.SimpleNamespace(disabled=False)
    return cls(model=owner, target=target, target_forward=target.forward, layer_number=0, config=config)


def _ours(cls, target, scalings, gsw):
    routing = RoutingState(scalings=scalings * gsw)
    return cls(target, layer_index=0, expert_names=EXPERTS, routing=routing, module_name="x")


@pytest.mark.parametrize("gsw", [1.0, 0.4])
def test_linear_matches_peft_loop(gsw):
    net = _peft_net()
    x = torch.randn(2, 7, 12)
    scalings = torch.softmax(torch.randn(2, 7, 1, 3), dim=-1)
    expected = _peft_layer(XLoraLinearLayer, net.proj, gsw).forward(x, scalings=scalings)
    layer = _ours(XLoraLinear, net.proj, scalings, gsw)
    assert layer.local_experts == ["a", "b"]  # 'c' does not adapt this layer
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=0)
    # flattened tokens (OPT feeds fc1/fc2 [batch*seq, hidden])
    torch.testing.assert_close(layer(x.reshape(14, 12)), expected.reshape(14, 10), atol=1e-5, rtol=0)


def test_embedding_matches_peft_loop():
    net = _peft_net(1)
    ids = torch.randint(0, 20, (2, 6))
    scalings = torch.softmax(torch.randn(2, 6, 1, 3), dim=-1)
    expected = _peft_layer(XLoraEmbeddingLayer, net.emb, 0.8).forward(ids, scalings=scalings)
    actual = _ours(XLoraEmbedding, net.emb, scalings, 0.8)(ids)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


def test_conv2d_matches_peft_loop_per_sample():
    net = _peft_net(2)
    images = torch.randn(3, 3, 8, 8)
    scalings = torch.softmax(torch.randn(3, 1, 1, 3), dim=-1)
    ours = _ours(XLoraConv2d, net.conv, scalings, 1.0)(images)
    peft_layer = _peft_layer(XLoraConv2dLayer, net.conv, 1.0)
    # peft's Conv2d broadcasting only works one sample at a time
    expected = torch.cat([peft_layer.forward(images[i : i + 1], scalings=scalings[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_stacked_weights_follow_in_place_updates():
    net = _peft_net(3)
    x = torch.randn(1, 4, 12)
    scalings = torch.softmax(torch.randn(1, 4, 1, 3), dim=-1)
    layer = _ours(XLoraLinear, net.proj, scalings, 1.0)
    before = layer(x)
    with torch.no_grad():
        net.proj.lora_B["a"].weight.mul_(3.0)
    after = layer(x)
    expected = _peft_layer(XLoraLinearLayer, net.proj, 1.0).forward(x, scalings=scalings)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, expected, atol=1e-5, rtol=0)


def test_linear_without_grad_adds_into_the_base_output_without_copying_it():
    """Without gradients (generation, eval) the experts' product is added into the base layer's own output: peft's
    values, and no copy of that output (out-of-place addmm made one per layer, the real pass's largest overhead)."""
    net = _peft_net(4)
    x = torch.randn(2, 7, 12)
    scalings = torch.softmax(torch.randn(2, 7, 1, 3), dim=-1)
    expected = _peft_layer(XLoraLinearLayer, net.proj, 1.0).forward(x, scalings=scalings)
    layer = _ours(XLoraLinear, net.proj, scalings, 1.0)
    with torch.no_grad():
        layer.prepare_stack()  # the stacked factors are built (copied) once, before the profiled call
        copies, outputs = {}, {}
        for name, module in (("base layer", layer.base_layer), ("X-LoRA layer", layer)):
            with torch.profiler.profile() as prof:
                outputs[name] = module(x)
            copies[name] = sum(event.count for event in prof.key_averages() if event.key == "aten::copy_")
        # the last position alone in the same pass (an lm_head under logits_to_keep): its own row multiplier
        last = layer(x[:, -1:])
    assert copies["X-LoRA layer"] == copies["base layer"]  # nn.Linear's addmm copies its bias in, once
    torch.testing.assert_close(outputs["X-LoRA layer"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(last, expected[:, -1:], atol=1e-5, rtol=0)


def test_linear_base_layer_hooks_still_run():
    """The base Linear is computed without its module call only when nothing is hooked on it: a forward hook on
    it, a pre-hook, or a global hook still runs, in both passes (experts on and off)."""
    net = _peft_net(5)
    x = torch.randn(1, 3, 12)
    scalings = torch.softmax(torch.randn(1, 3, 1, 3), dim=-1)
    layer = _ours(XLoraLinear, net.proj, scalings, 1.0)
    with torch.no_grad():
        plain = layer(x)
        handles = [
            layer.base_layer.register_forward_hook(lambda m, a, out: out + 1.0),
            layer.base_layer.register_forward_pre_hook(lambda m, a: (a[0] * 2.0,)),
        ]
        hooked = layer(x)
        layer.routing.scalings = None
        hooked_base = layer(x)
        for handle in handles:
            handle.remove()
        layer.routing.scalings = scalings
        seen = []
        handle = nn.modules.module.register_module_forward_hook(lambda m, a, out: seen.append(type(m)))
        try:
            layer(x)
        finally:
            handle.remove()
    expected = _peft_layer(XLoraLinearLayer, net.proj, 1.0).forward(x, scalings=scalings)
    torch.testing.assert_close(plain, expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(hooked_base, net.proj.base_layer(2.0 * x) + 1.0, atol=1e-6, rtol=0)
    torch.testing.assert_close(hooked - hooked_base, plain - net.proj.base_layer(x), atol=1e-5, rtol=0)
    assert nn.Linear in seen  # the global hook saw the base layer's call


def test_training_mode_dropout_is_per_expert_and_off_in_eval():
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, target_modules=["proj"], lora_dropout=0.5), adapter_name="a")
    model.add_adapter("b", LoraConfig(r=4, target_modules=["proj"], lora_dropout=0.5))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn_like(p))
    scalings = torch.full((1, 5, 1, 2), 0.5)
    layer = XLoraLinear(
        model.base_model.model.proj,
        layer_index=0,
        expert_names=["a", "b"],
        routing=RoutingState(scalings=scalings),
        module_name="proj",
    )
    x = torch.randn(1, 5, 12)
    layer.eval()
    assert torch.equal(layer(x), layer(x))
    layer.train()
    assert not torch.equal(layer(x), layer(x))
