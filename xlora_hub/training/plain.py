"""Training the X-LoRA gating classifier (and the experts, when the config makes them trainable).

Two paths, both on the model's own ``forward(labels=...)`` loss:

* :func:`train_classifier`, a plain seeded loop (AdamW, gradient clipping, periodic eval loss, a
  progress bar) for the small runs that need nothing else;
* ``transformers.Trainer`` for everything larger (``accelerate launch`` with DDP, FSDP or DeepSpeed):
  :class:`XLoraTrainer` adds the routing loss and saves the mixture itself at every checkpoint, and
  :class:`SaveMixtureCallback` saves the mixture from a plain ``Trainer``.

Gradients reach the classifier through the real pass only (the scaling pass runs without them).
When the examples say which expert they belong to, an auxiliary cross-entropy on the classifier's
scalings over the answer tokens teaches the routing directly (:func:`routing_loss`), and
:func:`routing_report` measures it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Union

import torch
from huggingface_hub.utils import tqdm
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_NAME

from .data import IGNORE_INDEX, CompletionCollator, TokenizedDataset, answer_mask, tokenize_dataset
from .errors import DataFormatError

if TYPE_CHECKING:
    from .model import XLoraModel

logger = logging.getLogger(__name__)

DataLike = Union[str, "os.PathLike[str]", Iterable[Mapping[str, Any]], TokenizedDataset]
"""A data file path, a ``datasets.Dataset``, a list of dicts, or already tokenised examples."""


# ---------------------------------------------------------------------------------------------- losses
def routing_loss(scalings: torch.Tensor, routing_labels: torch.Tensor, token_mask: torch.Tensor, *, softmax: bool):
    """Cross-entropy of the expert each example belongs to, averaged over the layers and the masked tokens.

    ``scalings`` is ``[batch, seq, n_layers, n_experts]`` (probabilities when the classifier ends in a
    softmax, logits otherwise), ``token_mask`` is ``[batch, seq]`` (see :func:`routing_token_mask`);
    examples whose label is -100 are left out. ``None`` when no example of the batch has both a label
    and a masked token.
    """
    mask = token_mask & (routing_labels != IGNORE_INDEX)[:, None]
    if not bool(mask.any()):
        return None
    log_probs = torch.log(scalings.float().clamp_min(1e-9)) if softmax else torch.log_softmax(scalings.float(), -1)
    labels = routing_labels.clamp_min(0)[:, None, None, None].expand(-1, scalings.shape[1], scalings.shape[2], 1)
    nll = -log_probs.gather(-1, labels).squeeze(-1).mean(-1)  # [batch, seq], averaged over layers
    return nll[mask].mean()


def _classifier_ends_in_softmax(model: XLoraModel) -> bool:
    return bool(model.xlora_config.enable_softmax)


ROUTING_TOKENS = ("answer", "all")


def routing_token_mask(batch: Mapping[str, torch.Tensor], tokens: str) -> torch.Tensor:
    """The tokens the routing loss is taken on: the answer tokens, or every (non-padding) token.

    ``"all"`` teaches the routing on the prompt too, where the experts also act (their keys and values
    of the prompt tokens are what the answer tokens attend to).
    """
    if tokens == "answer":
        return answer_mask(batch["labels"])
    if tokens == "all":
        mask = batch.get("attention_mask")
        return mask.bool() if mask is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)
    raise ValueError(f"routing_loss_tokens must be one of {ROUTING_TOKENS}, got {tokens!r}.")


def _add_routing_loss(model: XLoraModel, inputs, routing_labels, loss, *, weight: float, tokens: str):
    """``loss + weight * routing_loss`` on the latest forward's scalings (``loss`` unchanged without labels)."""
    if routing_labels is None or weight <= 0:
        return loss, None
    aux = routing_loss(
        model.get_latest_scalings(),
        routing_labels,
        routing_token_mask(inputs, tokens),
        softmax=_classifier_ends_in_softmax(model),
    )
    return (loss if aux is None else loss + weight * aux), aux


# ---------------------------------------------------------------------------------------------- plain loop
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


def _seeded_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def _batches(
    dataset: TokenizedDataset, *, batch_size: int, shuffle: bool, generator: torch.Generator | None, collator
) -> Iterator[dict[str, torch.Tensor]]:
    order = torch.randperm(len(dataset), generator=generator).tolist() if shuffle else list(range(len(dataset)))
    for start in range(0, len(order), batch_size):
        yield collator([dataset[i] for i in order[start : start + batch_size]])


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in batch.items()}


@contextlib.contextmanager
def _mode(model: torch.nn.Module, training: bool) -> Iterator[None]:
    previous = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(previous)


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
    collator = _collator(tokenizer)
    total, count = 0.0, 0
    with _mode(model, False), torch.no_grad():
        for batch in _batches(data, batch_size=batch_size, shuffle=False, generator=None, collator=collator):
            batch.pop("routing_labels", None)
            batch = _to_device(batch, model.device)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(model(**batch).loss) * n
            count += n
    return total / max(count, 1)


def _collator(tokenizer: Any, keep_routing_labels: bool = False) -> CompletionCollator:
    """Pads with the tokenizer's pad (or EOS) token; with no tokenizer (pre-tokenised data), with 0."""
    if tokenizer is not None:
        return CompletionCollator.for_tokenizer(tokenizer, keep_routing_labels=keep_routing_labels)
    return CompletionCollator(pad_token_id=0, keep_routing_labels=keep_routing_labels)


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
    label_field: str = "expert",
    text_field: str = "text",
    prompt_field: str = "prompt",
    completion_field: str = "completion",
    progress: bool = True,
) -> TrainResult:
    """Train the classifier (and trainable experts) on causal-LM data with a plain, seeded loop.

    ``dataset`` is a ``.jsonl``/``.txt`` file, a ``datasets.Dataset``, a list of dicts or a
    :class:`~xlora_hub.data.TokenizedDataset`. With ``routing_loss_weight > 0``, examples whose
    ``label_field`` names an expert also train the routing directly (see :func:`routing_loss`), on the
    answer tokens or, with ``routing_loss_tokens="all"``, on every token.
    ``eval_dataset`` is scored every ``eval_every`` steps (default: at the end of each epoch) and at
    the end. The model is left in the mode it was in.
    """
    if epochs < 1 or batch_size < 1:
        raise ValueError(f"epochs and batch_size must be at least 1, got epochs={epochs}, batch_size={batch_size}.")
    if routing_loss_tokens not in ROUTING_TOKENS:
        raise ValueError(f"routing_loss_tokens must be one of {ROUTING_TOKENS}, got {routing_loss_tokens!r}.")
    if eval_every is not None and eval_every < 1:
        raise ValueError(f"eval_every must be at least 1 (steps), got {eval_every}.")
    use_routing = routing_loss_weight > 0
    names = model.expert_names if use_routing else None
    fields = dict(text_field=text_field, prompt_field=prompt_field, completion_field=completion_field)
    train_data = tokenize_dataset(
        dataset, tokenizer, max_length=max_length, label_field=label_field, label_names=names, **fields
    )
    if use_routing and not train_data.has_routing_labels:
        raise DataFormatError(
            f"routing_loss_weight={routing_loss_weight} but no training example has an `{label_field}` field naming "
            f"one of the experts {model.expert_names}; add it or set routing_loss_weight=0."
        )
    eval_data = (
        tokenize_dataset(eval_dataset, tokenizer, max_length=max_length, **fields) if eval_dataset is not None else None
    )
    collator = _collator(tokenizer, keep_routing_labels=use_routing)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("The model has no trainable parameter (is the classifier frozen?).")
    torch.manual_seed(seed)
    generator = _seeded_generator(seed)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps_per_epoch = math.ceil(len(train_data) / batch_size)
    result = TrainResult(steps=0, epochs=epochs)

    def run_eval() -> None:
        if eval_data is not None:
            loss = evaluate_loss(model, eval_data, tokenizer=tokenizer, batch_size=batch_size, max_length=max_length)
            result.eval_losses.append((result.steps, loss))

    device = model.device
    with _mode(model, True), tqdm(total=epochs * steps_per_epoch, desc="X-LoRA training", disable=not progress) as bar:
        for _epoch in range(epochs):
            for batch in _batches(
                train_data, batch_size=batch_size, shuffle=True, generator=generator, collator=collator
            ):
                batch = _to_device(batch, device)
                routing_labels = batch.pop("routing_labels", None)
                loss = model(**batch).loss
                loss, aux = _add_routing_loss(
                    model, batch, routing_labels, loss, weight=routing_loss_weight, tokens=routing_loss_tokens
                )
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if grad_clip is not None and grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_(params, grad_clip)
                optimizer.step()
                result.steps += 1
                result.train_losses.append(float(loss.detach()))
                if aux is not None:
                    result.routing_losses.append(float(aux.detach()))
                bar.update(1)
                bar.set_postfix(loss=f"{result.train_losses[-1]:.4f}")
                if eval_every is not None and result.steps % eval_every == 0:
                    run_eval()
                    if result.eval_losses:
                        bar.set_postfix(loss=f"{result.train_losses[-1]:.4f}", eval=f"{result.eval_losses[-1][1]:.4f}")
            if eval_every is None:
                run_eval()
    if eval_every is not None and (not result.eval_losses or result.eval_losses[-1][0] != result.steps):
        run_eval()
    return result


# ---------------------------------------------------------------------------------------------- routing report
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
    collator = _collator(tokenizer, keep_routing_labels=True)
    sums = {n: torch.zeros(len(names), dtype=torch.float64) for n in names}
    counts = dict.fromkeys(names, 0)
    correct = dict.fromkeys(names, 0)
    with _mode(model, False), torch.no_grad():
        for batch in _batches(data, batch_size=batch_size, shuffle=False, generator=None, collator=collator):
            labels = batch.pop("routing_labels")
            batch = _to_device(batch, model.device)
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


# ---------------------------------------------------------------------------------------------- transformers.Trainer
def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):  # DDP / accelerate wrappers
        model = model.module
    return model


class SaveMixtureCallback(TrainerCallback):
    """Saves the mixture (``model.save_pretrained``) into every checkpoint a plain ``Trainer`` writes.

    ``subfolder`` puts it beside the Trainer's own files (``checkpoint-N/<subfolder>``); by default it
    goes in the checkpoint folder itself. Only the main process writes.
    """

    def __init__(self, *, subfolder: str | None = None) -> None:
        self.subfolder = subfolder

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None or not state.is_world_process_zero:
            return control
        target = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.subfolder:
            target = os.path.join(target, self.subfolder)
        _unwrap(model).save_pretrained(target)
        return control


class XLoraTrainer(Trainer):
    """``transformers.Trainer`` for an :class:`~xlora_hub.XLoraModel`.

    * ``routing_loss_weight``: adds :func:`routing_loss` when the collator gives ``routing_labels``
      (``CompletionCollator(keep_routing_labels=True)``).
    * Checkpoints and ``save_model`` write the mixture (``model.save_pretrained``: config, classifier,
      expert references) plus ``model.safetensors`` with the trainable tensors only, so
      ``resume_from_checkpoint`` works and the frozen base model is never copied (a plain ``Trainer``
      saves the whole state dict, which fails on base models with tied embeddings).
    """

    def __init__(
        self, *args: Any, routing_loss_weight: float = 0.0, routing_loss_tokens: str = "answer", **kwargs: Any
    ) -> None:
        if routing_loss_tokens not in ROUTING_TOKENS:
            raise ValueError(f"routing_loss_tokens must be one of {ROUTING_TOKENS}, got {routing_loss_tokens!r}.")
        super().__init__(*args, **kwargs)
        self.routing_loss_weight = float(routing_loss_weight)
        self.routing_loss_tokens = routing_loss_tokens

    def _set_signature_columns_if_needed(self) -> None:
        # XLoraModel.forward takes the wrapped model's inputs through **kwargs: keep the columns *that* model
        # takes (attention_mask, labels, ...) and the routing label, instead of dropping all but input_ids.
        if self._signature_columns is None:
            wrapped = _unwrap(self.model).model
            columns = [*inspect.signature(wrapped.forward).parameters, "routing_label", "routing_labels"]
            self._signature_columns = list(dict.fromkeys([*columns, "label", "label_ids", *self.label_names]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        routing_labels = inputs.pop("routing_labels", None)
        # The Trainer's own loss (token averaging across devices and gradient accumulation, label smoothing),
        # then the routing loss on top.
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            loss, _ = _add_routing_loss(
                _unwrap(model),
                inputs,
                routing_labels,
                loss,
                weight=self.routing_loss_weight,
                tokens=self.routing_loss_tokens,
            )
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = _unwrap(self.model)
        model.save_pretrained(output_dir)
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, os.path.join(output_dir, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # The checkpoint holds the trainable tensors only: the frozen base weights are expected to be missing.
        frozen = {n for n, p in _unwrap(self.model).named_parameters() if not p.requires_grad}
        missing = [k for k in load_result.missing_keys if k not in frozen]
        if missing:
            logger.warning("Trainable weights missing from the checkpoint: %s", missing)
        if load_result.unexpected_keys:
            logger.warning("Unexpected keys in the checkpoint: %s", load_result.unexpected_keys)


__all__ = [
    "RoutingReport",
    "SaveMixtureCallback",
    "TrainResult",
    "XLoraTrainer",
    "evaluate_loss",
    "mean_answer_scalings",
    "routing_loss",
    "routing_report",
    "train_classifier",
]
