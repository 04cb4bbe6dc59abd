"""Architectures peft's X-LoRA cannot run (GPT-2 Conv1D, BERT classification, OPT fc1/fc2 at batch > 1).

Where peft's X-LoRA cannot be the reference, the classifier is forced to put all weight on one
expert (a large bias) and the output is compared with that expert alone as a plain peft model.
"""

from __future__ import annotations

import pytest
import torch
from factories import VOCAB, save_expert, tiny_bert_classifier, tiny_gpt2, tiny_opt
from peft import PeftModel

from xlora_hub import XLoraConfig, XLoraModel


def force_expert(model: XLoraModel, index: int) -> None:
    """All routing weight on one expert: zero weights, a large bias on that expert."""
    last = model.classifier.last_layer
    with torch.no_grad():
        last.weight.zero_()
        bias = torch.full((last.bias.numel() // model.n_experts, model.n_experts), -60.0)
        bias[:, index] = 60.0
        last.bias.copy_(bias.flatten())


ARCHS = {
    "gpt2": (tiny_gpt2, [["c_attn", "c_fc"], ["c_proj", "c_attn"]]),
    "bert": (tiny_bert_classifier, [["query", "value"], ["key", "dense"]]),
    "opt-fc": (tiny_opt, [["fc1", "fc2"], ["fc1", "q_proj"]]),
}


@pytest.fixture(scope="module", params=list(ARCHS))
def arch(request, tmp_path_factory):
    factory, targets = ARCHS[request.param]
    root = tmp_path_factory.mktemp(request.param)
    dirs = [save_expert(factory, root / f"e{i}", target_modules=t, r=3 + i, seed=10 + i) for i, t in enumerate(targets)]
    return request.param, factory, dirs


def _inputs(name):
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 10))
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    if name == "bert":
        mask = torch.ones_like(ids)
        mask[2, -4:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.mark.parametrize("layerwise", [False, True])
def test_forced_routing_equals_the_single_expert(arch, layerwise):
    name, factory, dirs = arch
    config = XLoraConfig(experts={"first": str(dirs[0]), "second": str(dirs[1])}, layerwise_scalings=layerwise)
    model = XLoraModel.from_experts(factory(), config)
    inputs = _inputs(name)
    base = factory()(**inputs).logits
    for index, expert_dir in enumerate(dirs):
        force_expert(model, index)
        with torch.no_grad():
            ours = model(**inputs).logits
            single = PeftModel.from_pretrained(factory(), str(expert_dir)).eval()(**inputs).logits
        assert (single - base).abs().max() > 1e-3
        torch.testing.assert_close(ours, single, atol=1e-5, rtol=0)


def test_forward_and_train(arch):
    name, factory, dirs = arch
    config = XLoraConfig(experts={"first": str(dirs[0]), "second": str(dirs[1])}, xlora_depth=2, xlora_size=16)
    model = XLoraModel.from_experts(factory(), config)
    model.train()
    inputs = _inputs(name)
    labels = torch.tensor([0, 2, 1]) if name == "bert" else inputs["input_ids"]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("classifier.") for n in trainable)
    losses = []
    for _ in range(25):
        loss = model(**inputs, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        assert model.classifier.last_layer.weight.grad.abs().sum() > 0
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
