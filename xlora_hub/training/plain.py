"""The plain training loop: :func:`train_classifier`, for the small runs that need nothing else.

A seeded loop (AdamW, gradient clipping, periodic eval loss, a progress bar) on the model's own
``forward(labels=...)`` loss, plus the routing loss when the examples name their experts. Its steps
run through the shared skeleton in :mod:`xlora_hub.training.loop`.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch

from ..data import IGNORE_INDEX, CompletionCollator, Fields, TokenizedDataset, tokenize_dataset
from ..errors import DataFormatError
from .loop import Batch, ordered_batches, run_steps, shuffled_batches, train_mode, trainable_parameters
from .losses import add_routing_loss, check_routing_tokens

if TYPE_CHECKING:
    from ..model import XLoraModel

DataLike = Union[str, "os.PathLike[str]", Iterable[Mapping[str, Any]], TokenizedDataset]
"""A data file path, a ``datasets.Dataset``, a list of dicts, or already tokenised examples."""

LEGACY_FIELD_KEYWORDS = {
    "text_field": "text",
    "prompt_field": "prompt",
    "completion_field": "completion",
    "label_field": "label",
}
"""The four field keywords ``train_classifier`` took before ``fields=`` (still accepted, deprecated)."""


@dataclass
class TrainResult:
    """What a :func:`train_classifier` run did: the loss of every step and the eval losses."""

    steps: int
    epochs: int
    train_losses: list[float] = field(default_factory=list)
    routing_losses: list[float] = field(default_factory=list)
    eval_losses: list[tuple[int, float]] = field(default_factory=list)

    @property
    def final_train_loss(self) -> float:
        """Mean training loss over the last 10% of steps (at least one step)."""
        tail = self.train_losses[-max(1, len(self.train_losses) // 10) :]
        return sum(tail) / len(tail)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """Every tensor of ``batch`` on ``device``."""
    return {k: v.to(device) for k, v in batch.items()}


def make_collator(tokenizer: Any, keep_routing_labels: bool = False) -> CompletionCollator:
    """Pads with the tokenizer's pad (or EOS) token; with no tokenizer (pre-tokenised data), with 0."""
    if tokenizer is not None:
        return CompletionCollator.for_tokenizer(tokenizer, keep_routing_labels=keep_routing_labels)
    return CompletionCollator(pad_token_id=0, keep_routing_labels=keep_routing_labels)


def evaluate_loss(
    model: XLoraModel,
    dataset: DataLike,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_length: int = 512,
) -> float:
    """Mean LM loss per answer token over ``dataset`` (eval mode, no gradients)."""
    data = tokenize_dataset(dataset, tokenizer, max_length=max_length)
    collator = make_collator(tokenizer)
    total, count = 0.0, 0
    with train_mode(model, False), torch.no_grad():
        for batch in ordered_batches(data, batch_size=batch_size, collator=collator):
            batch.pop("routing_labels", None)
            batch = to_device(batch, model.device)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**batch).loss) * n
            count += n
    return total / max(count, 1)


def resolve_fields(fields: Fields | None, legacy: dict[str, str]) -> Fields:
    """``fields``, or the :class:`~xlora_hub.data.Fields` the deprecated ``*_field=`` keywords spell."""
    unknown = sorted(set(legacy) - set(LEGACY_FIELD_KEYWORDS))
    if unknown:
        raise TypeError(f"train_classifier() got unexpected keyword arguments {unknown}.")
    if not legacy:
        return fields if fields is not None else Fields()
    if fields is not None:
        raise ValueError(f"Pass the field names either as fields=Fields(...) or as {sorted(legacy)}, not both.")
    warnings.warn(
        f"train_classifier({', '.join(f'{k}=' for k in sorted(legacy))}) is deprecated; pass "
        "fields=xlora_hub.data.Fields(text=..., prompt=..., completion=..., label=...).",
        DeprecationWarning,
        stacklevel=3,
    )
    return Fields(**{LEGACY_FIELD_KEYWORDS[k]: v for k, v in legacy.items()})


def _check_options(*, epochs: int, batch_size: int, routing_loss_tokens: str, eval_every: int | None) -> None:
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be at least 1, got epochs={epochs}, batch_size={batch_size}.")
    check_routing_tokens(routing_loss_tokens)
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be at least 1 (steps), got {eval_every}.")


def _training_data(
    model: XLoraModel, dataset: DataLike, tokenizer: Any, *, fields: Fields, max_length: int, routing_weight: float
) -> TokenizedDataset:
    """The tokenised training set, with routing labels when the routing loss is on (which then needs some)."""
    names = model.expert_names if routing_weight > 0 else None
    data = tokenize_dataset(dataset, tokenizer, max_length=max_length, fields=fields, label_names=names)
    if routing_weight > 0 and not data.has_routing_labels:
        raise DataFormatError(
            f"routing_loss_weight={routing_weight} but no training example has an `{fields.label}` field naming "
            f"one of the experts {model.expert_names}; add it or set routing_loss_weight=0."
        )
    return data


class _StepHooks:
    """The plain loop's own part of each step: the routing loss, the record of losses, the eval schedule."""

    def __init__(
        self,
        model: XLoraModel,
        result: TrainResult,
        *,
        eval_data: TokenizedDataset | None,
        eval_options: dict[str, Any],
        eval_every: int | None,
        steps_per_epoch: int,
        routing_weight: float,
        routing_tokens: str,
    ) -> None:
        self.model, self.result = model, result
        self.eval_data, self.eval_options, self.eval_every = eval_data, eval_options, eval_every
        self.steps_per_epoch = steps_per_epoch
        self.routing_weight, self.routing_tokens = routing_weight, routing_tokens

    def run_eval(self) -> None:
        if self.eval_data is not None:
            loss = evaluate_loss(self.model, self.eval_data, **self.eval_options)
            self.result.eval_losses.append((self.result.steps, loss))

    def loss(self, batch: Batch) -> torch.Tensor:
        """The LM loss plus the weighted routing loss (recorded) of one batch."""
        batch = to_device(batch, self.model.device)
        routing_labels = batch.pop("routing_labels", None)
        loss, aux = add_routing_loss(
            self.model,
            batch,
            routing_labels,
            self.model(**batch).loss,
            weight=self.routing_weight,
            tokens=self.routing_tokens,
        )
        if aux is not None:
            self.result.routing_losses.append(float(aux.detach()))
        return loss

    def on_step(self, step: int, loss: float) -> dict[str, str] | None:
        """Record the step; eval every ``eval_every`` steps (or at each epoch's end without it)."""
        self.result.steps = step
        self.result.train_losses.append(loss)
        if self.eval_every is not None and step % self.eval_every == 0:
            self.run_eval()
            return {"eval": f"{self.result.eval_losses[-1][1]:.4f}"} if self.result.eval_losses else None
        if self.eval_every is None and step % self.steps_per_epoch == 0:  # the end of an epoch
            self.run_eval()
        return None


def train_classifier(
    model: XLoraModel,
    dataset: DataLike,
    *,
    tokenizer: Any = None,
    epochs: int = 1,
    lr: float = 1e-3,
    batch_size: int = 8,
    max_length: int = 512,
    grad_clip: float | None = 1.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    eval_dataset: DataLike | None = None,
    eval_every: int | None = None,
    routing_loss_weight: float = 0.0,
    routing_loss_tokens: str = "answer",
    fields: Fields | None = None,
    progress: bool = True,
    **legacy_fields: str,
) -> TrainResult:
    """Train the classifier (and trainable experts) on causal-LM data with a plain, seeded loop.

    ``dataset`` is a ``.jsonl``/``.txt`` file, a ``datasets.Dataset``, a list of dicts or a
    :class:`~xlora_hub.data.TokenizedDataset`; ``fields`` names the fields examples are read from
    (:class:`~xlora_hub.data.Fields`; the old ``text_field=``/``prompt_field=``/``completion_field=``/
    ``label_field=`` keywords still work, deprecated). With ``routing_loss_weight > 0``, examples whose
    ``fields.label`` names an expert also train the routing directly (see
    :func:`~xlora_hub.training.routing_loss`), on the answer tokens or, with ``routing_loss_tokens="all"``,
    on every token. ``eval_dataset`` is scored every ``eval_every`` steps (default: at the end of each
    epoch) and at the end. The model is left in the mode it was in.
    """
    fields = resolve_fields(fields, legacy_fields)
    _check_options(epochs=epochs, batch_size=batch_size, routing_loss_tokens=routing_loss_tokens, eval_every=eval_every)
    use_routing = routing_loss_weight > 0
    data = _training_data(
        model, dataset, tokenizer, fields=fields, max_length=max_length, routing_weight=routing_loss_weight
    )
    eval_data = (
        tokenize_dataset(eval_dataset, tokenizer, max_length=max_length, fields=fields)
        if eval_dataset is not None
        else None
    )
    collator = make_collator(tokenizer, keep_routing_labels=use_routing)
    params = trainable_parameters(model)
    if not params:
        raise ValueError("The model has no trainable parameter (is the classifier frozen?).")
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(int(seed))
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(data) / batch_size)
    result = TrainResult(steps=0, epochs=epochs)
    hooks = _StepHooks(
        model,
        result,
        eval_data=eval_data,
        eval_options=dict(tokenizer=tokenizer, batch_size=batch_size, max_length=max_length),
        eval_every=eval_every,
        steps_per_epoch=steps_per_epoch,
        routing_weight=routing_loss_weight,
        routing_tokens=routing_loss_tokens,
    )
    batches = shuffled_batches(data, batch_size=batch_size, collator=collator, generator=generator, epochs=epochs)
    run_steps(
        model,
        batches,
        optimizer=optimizer,
        params=params,
        total=epochs * steps_per_epoch,
        loss_fn=hooks.loss,
        grad_clip=grad_clip,
        on_step=hooks.on_step,
        desc="X-LoRA training",
        progress=progress,
    )
    if eval_every is not None and (not result.eval_losses or result.eval_losses[-1][0] != result.steps):
        hooks.run_eval()
    return result


__all__ = ["DataLike", "TrainResult", "evaluate_loss", "make_collator", "to_device", "train_classifier"]
