"""Measuring the routing: per expert, the mean scalings over the answer tokens and the routing accuracy."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from ..data import IGNORE_INDEX, answer_mask, tokenize_dataset
from ..errors import DataFormatError
from .loop import ordered_batches, train_mode
from .plain import DataLike, make_collator, to_device

if TYPE_CHECKING:
    from ..model import XLoraModel


@dataclass
class RoutingReport:
    """Per-label mean scalings over the answer tokens, and how often the top expert is the labelled one."""

    expert_names: list[str]
    mean_scalings: dict[str, list[float]]
    counts: dict[str, int]
    correct: dict[str, int]

    @property
    def accuracy(self) -> float:
        total = sum(self.counts.values())
        return sum(self.correct.values()) / total if total else float("nan")

    def label_accuracy(self, label: str) -> float:
        return self.correct[label] / self.counts[label] if self.counts.get(label) else float("nan")

    def format(self) -> str:
        width = max(8, *(len(n) for n in self.expert_names))
        header = (
            f"{'label':<{width}} {'n':>5} " + " ".join(f"{n:>{width}}" for n in self.expert_names) + "  routing acc"
        )
        lines = [header, "-" * len(header)]
        for label, means in self.mean_scalings.items():
            cells = " ".join(f"{m:>{width}.3f}" for m in means)
            lines.append(
                f"{label:<{width}} {self.counts[label]:>5} {cells}  {100 * self.label_accuracy(label):>10.1f}%"
            )
        lines.append(f"overall routing accuracy: {100 * self.accuracy:.1f}%")
        return "\n".join(lines)


def routing_report(
    model: XLoraModel,
    dataset: DataLike,
    *,
    tokenizer: Any = None,
    label_field: str = "expert",
    batch_size: int = 16,
    max_length: int = 512,
) -> RoutingReport:
    """Mean scalings (over answer tokens and layers) per labelled expert, and the routing accuracy.

    An example counts as correctly routed when the expert with the largest mean scaling over its
    answer tokens is the one its ``label_field`` names. Examples without a label are skipped.
    """
    names = model.expert_names
    data = tokenize_dataset(dataset, tokenizer, max_length=max_length, label_field=label_field, label_names=names)
    collator = make_collator(tokenizer, keep_routing_labels=True)
    sums = {n: torch.zeros(len(names), dtype=torch.float64) for n in names}
    counts = dict.fromkeys(names, 0)
    correct = dict.fromkeys(names, 0)
    with train_mode(model, False), torch.no_grad():
        for batch in ordered_batches(data, batch_size=batch_size, collator=collator):
            labels = batch.pop("routing_labels")
            batch = to_device(batch, model.device)
            model(**batch)
            per_example = mean_answer_scalings(model.get_latest_scalings(), answer_mask(batch["labels"]))
            for label, means in zip(labels.tolist(), per_example.cpu()):
                if label == IGNORE_INDEX:
                    continue
                name = names[label]
                sums[name] += means.double()
                counts[name] += 1
                correct[name] += int(int(means.argmax()) == label)
    present = [n for n in names if counts[n]]
    if not present:
        raise DataFormatError(f"No example has an `{label_field}` field naming one of the experts {names}.")
    return RoutingReport(
        expert_names=list(names),
        mean_scalings={n: (sums[n] / counts[n]).tolist() for n in present},
        counts={n: counts[n] for n in present},
        correct={n: correct[n] for n in present},
    )


def mean_answer_scalings(scalings: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """``[batch, n_experts]``: each example's scalings averaged over its masked tokens and the layers."""
    per_token = scalings.float().mean(dim=2)  # [batch, seq, n_experts]
    weights = token_mask.to(per_token.dtype)[..., None]
    return (per_token * weights).sum(1) / weights.sum(1).clamp_min(1.0)


__all__ = ["RoutingReport", "mean_answer_scalings", "routing_report"]
