"""The one training-loop skeleton: seeded batches, the optimizer step, a progress bar, a per-step hook.

:func:`~xlora_hub.training.train_classifier` (shuffled epochs, the routing loss, periodic eval) and the
demo build (seeded batches drawn with replacement, a learning-rate schedule) both run their steps
through :func:`run_steps`, so the step itself (forward, loss, backward, clip, optimizer step) is written
once. The order of its operations is part of the demo's recorded weights digest: a change here changes
the demo build's bits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from huggingface_hub.utils import tqdm

Batch = dict[str, torch.Tensor]
LossFn = Callable[[Batch], torch.Tensor]
StepHook = Callable[[int, float], "Mapping[str, str] | None"]


def trainable_parameters(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that take gradients, in the model's order (the order the gradient norm sums them in)."""
    return [p for p in model.parameters() if p.requires_grad]


def ordered_batches(
    dataset: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    collator: Callable[..., Batch],
    order: list[int] | None = None,
) -> Iterator[Batch]:
    """Consecutive batches of ``dataset`` (in ``order`` when given; the last batch may be smaller)."""
    order = list(range(len(dataset))) if order is None else order
    for start in range(0, len(order), batch_size):
        yield collator([dataset[i] for i in order[start : start + batch_size]])


def shuffled_batches(
    dataset: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    collator: Callable[..., Batch],
    generator: torch.Generator,
    epochs: int = 1,
) -> Iterator[Batch]:
    """``epochs`` passes over ``dataset``, each in a fresh permutation drawn from ``generator`` when it starts."""
    for _ in range(epochs):
        order = torch.randperm(len(dataset), generator=generator).tolist()
        yield from ordered_batches(dataset, batch_size=batch_size, collator=collator, order=order)


def sampled_batches(
    dataset: Sequence[dict[str, Any]],
    *,
    batch_size: int,
    collator: Callable[..., Batch],
    generator: torch.Generator,
    steps: int,
) -> Iterator[Batch]:
    """``steps`` batches of examples drawn with replacement from ``generator`` (no epochs)."""
    for _ in range(steps):
        index = torch.randint(len(dataset), (batch_size,), generator=generator).tolist()
        yield collator([dataset[i] for i in index])


@contextlib.contextmanager
def train_mode(model: torch.nn.Module, training: bool = True) -> Iterator[None]:
    """``model.train(training)`` for the block, then the mode it was in before."""
    previous = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(previous)


def run_steps(
    model: torch.nn.Module,
    batches: Iterable[Batch],
    *,
    optimizer: torch.optim.Optimizer,
    params: Sequence[torch.nn.Parameter],
    total: int,
    loss_fn: LossFn | None = None,
    grad_clip: float | None = 1.0,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    on_step: StepHook | None = None,
    desc: str = "training",
    progress: bool = True,
) -> list[float]:
    """Train on every batch in training mode (the model's mode is restored after); return each step's loss.

    One step: ``loss_fn(batch)`` (default: the model's own ``forward(**batch).loss``), zero the gradients,
    backward, clip the gradient norm of ``params`` to ``grad_clip`` (skipped when ``None`` or 0), optimizer
    step, then ``scheduler`` step. ``on_step(step, loss)`` runs after each step (``step`` counts from 1)
    and may return more fields for the progress bar (an eval loss, say).
    """
    losses: list[float] = []
    with train_mode(model), tqdm(total=total, desc=desc, disable=not progress) as bar:
        for batch in batches:
            loss = loss_fn(batch) if loss_fn is not None else model(**batch).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip is not None and grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4f}")
            extra = on_step(len(losses), losses[-1]) if on_step is not None else None
            if extra:
                bar.set_postfix(loss=f"{losses[-1]:.4f}", **extra)
    return losses


__all__ = [
    "Batch",
    "LossFn",
    "StepHook",
    "ordered_batches",
    "run_steps",
    "sampled_batches",
    "shuffled_batches",
    "train_mode",
    "trainable_parameters",
]
