"""The classifier learns to route: a toy task where the right expert is knowable from the input.

Domain k's sequences use their own small range of tokens, and the target after every token is
what expert k alone predicts there. Only the classifier trains, so the LM loss can fall only by
routing domain k's tokens to expert k.
"""

from __future__ import annotations

import pytest
import torch
from factories import save_expert, tiny_llama
from peft import PeftModel

from xlora_hub import XLoraConfig, XLoraModel

N_DOMAINS = 3
TOKENS_PER_DOMAIN = 8
SEQ = 10
STEPS = 100


def base_model():
    """A base with a wider init, so next-token distributions are peaked and the experts disagree clearly."""
    return tiny_llama(initializer_range=0.25)


def _domain(k: int, n: int, teacher: torch.nn.Module, generator: torch.Generator):
    low = 8 + k * TOKENS_PER_DOMAIN
    ids = torch.randint(low, low + TOKENS_PER_DOMAIN, (n, SEQ), generator=generator)
    with torch.no_grad():
        predicted = teacher(input_ids=ids).logits.argmax(-1)
    labels = torch.full_like(ids, -100)
    labels[:, 1:] = predicted[:, :-1]  # transformers shifts labels: position t is scored on labels[t + 1]
    return ids, labels, torch.full((n,), k)


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    root = tmp_path_factory.mktemp("routing")
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    dirs = [
        save_expert(base_model, root / f"e{k}", target_modules=targets, r=8, seed=100 + k, scale=0.3) for k in range(3)
    ]
    generator = torch.Generator().manual_seed(0)
    train, held_out = [], []
    for k, expert_dir in enumerate(dirs):
        teacher = PeftModel.from_pretrained(base_model(), str(expert_dir)).eval()
        train.append(_domain(k, 32, teacher, generator))
        held_out.append(_domain(k, 16, teacher, generator))
    return dirs, [torch.cat(parts) for parts in zip(*train)], [torch.cat(parts) for parts in zip(*held_out)]


def _evaluate(model: XLoraModel, data) -> tuple[float, float]:
    """(LM loss, routing accuracy: the expert with the largest mean scaling is the domain's)."""
    ids, labels, truth = data
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss.item()
        routed = model.get_latest_scalings().mean(dim=(1, 2)).argmax(-1)
    return loss, (routed == truth).float().mean().item()


def test_classifier_learns_to_route(task):
    dirs, (ids, labels, _), held_out = task
    torch.manual_seed(0)
    config = XLoraConfig(experts={f"expert_{k}": str(d) for k, d in enumerate(dirs)})
    model = XLoraModel.from_experts(base_model(), config)
    loss_before, routing_before = _evaluate(model, held_out)
    optimizer = torch.optim.Adam(model.classifier.parameters(), lr=3e-2)
    generator = torch.Generator().manual_seed(1)
    for _ in range(STEPS):
        model.train()
        batch = torch.randint(0, len(ids), (16,), generator=generator)
        loss = model(input_ids=ids[batch], labels=labels[batch]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    loss_after, routing_after = _evaluate(model, held_out)
    print(
        f"\nrouting accuracy {routing_before:.0%} -> {routing_after:.0%} (chance {1 / N_DOMAINS:.0%}); "
        f"held-out LM loss {loss_before:.3f} -> {loss_after:.3f}"
    )
    assert routing_after >= 0.7
    assert loss_after < loss_before - 0.5
