"""Routing evidence for the model card: what a mixture does on a data set, measured at push.

:func:`compute_evidence` takes the model (like :class:`xlora_hub.generation.Decoder`, it is used through what
it exposes, never imported) and data in the formats ``train`` reads (:mod:`xlora_hub.data`), and returns the
plain :class:`~xlora_hub.hub.card_evidence.RoutingEvidence` the Hub room renders on the card:

* per-expert usage from the processed scalings (what the layers read), mean over the X-LoRA layers, masked
  to the real tokens: the mean weight, the share of tokens where the expert is top-1, the routing entropy;
* the scores of the mixture, of each expert alone and of the base model on the same data: the loss over the
  supervised tokens and, where examples have a completion, exact match of the greedy answer (as
  :mod:`xlora_hub.demo.evaluate` scores it: the decoded answer up to EOS equals the completion);
* a tokens x experts heatmap of a few examples and a per-expert usage bar chart, as PNG bytes (matplotlib,
  the optional ``plots`` extra).

An expert alone is the base model with that expert's LoRA at full weight (routing fixed to one-hot, no
scaling pass); the base model is the mixture with its adapters off (:meth:`XLoraModel.disable_adapter`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .data import IGNORE_INDEX, CompletionCollator, Fields, load_examples, tokenize_example
from .errors import MissingDependencyError
from .hub import RoutingEvidence, SystemScores, expert_system
from .hub.card_evidence import BASE, HEATMAP_NAME, MIXTURE, USAGE_NAME
from .scalings import process_scalings

if TYPE_CHECKING:
    from .model import XLoraModel

__all__ = ["PLOTS_EXTRA", "compute_evidence", "default_tokenizer", "require_plots"]

PLOTS_EXTRA = "plots"
HEATMAP_EXAMPLES = 3


def require_plots() -> None:
    """Check that matplotlib (the ``plots`` extra) is installed, before any work is done."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise MissingDependencyError(
            "The routing evidence pictures need matplotlib, which is not installed: "
            f"`pip install 'xlora-hub[{PLOTS_EXTRA}]'`, or push without pictures (`eval_plots=False`, "
            "`--eval-no-plots`)."
        ) from None


def default_tokenizer(
    model: XLoraModel, *, token: str | bool | None = None, cache_dir: str | os.PathLike[str] | None = None
) -> Any:
    """The tokenizer of the mixture's base model, for evaluation data given without one.

    The base is taken where a load took it: a local base (``./base_model``, or a bare name that was a folder of
    the mixture) from the folder the loaded base came from, never from the working directory; a Hub base at the
    revision the mixture records, with ``token`` and ``cache_dir``.
    """
    from .errors import DataFormatError
    from .hub import load_tokenizer
    from .refs import loaded_base_folder, stored_base_hub_id

    base = model.xlora_config.base_model
    if base is None:
        raise DataFormatError(
            "The evaluation data needs a tokenizer and the mixture records no base model to take it from; pass "
            "`eval_tokenizer=` (`--tokenizer`)."
        )
    loaded = loaded_base_folder(model.model)
    hub_id = stored_base_hub_id(base.repo_id, loaded_from=loaded)
    if hub_id is not None:
        return load_tokenizer(hub_id, revision=base.revision, token=token, cache_dir=cache_dir)
    stored = os.path.expanduser(base.repo_id)
    folder = loaded or (stored if os.path.isabs(stored) and os.path.isdir(stored) else None)
    if folder is None:
        raise DataFormatError(
            f"The evaluation data needs a tokenizer and the mixture's base model {base.repo_id!r} is a local path "
            "the loaded base model did not come from; pass `eval_tokenizer=` (`--tokenizer`)."
        )
    return load_tokenizer(folder, token=token, cache_dir=cache_dir)


def _describe(data: Any, examples: list[dict[str, Any]], name: str | None) -> tuple[str, str]:
    """The data's name and sha256: a file's bytes, or the examples as canonical JSON."""
    if isinstance(data, (str, os.PathLike)):
        digest = hashlib.sha256(Path(data).read_bytes()).hexdigest()
        return name or Path(data).name, digest
    text = "\n".join(json.dumps(e, sort_keys=True, ensure_ascii=False, default=str) for e in examples)
    info = getattr(data, "info", None)
    default = getattr(info, "dataset_name", None) or "an in-memory dataset"
    return name or default, hashlib.sha256(text.encode("utf-8")).hexdigest()


@contextlib.contextmanager
def _fixed_routing(model: XLoraModel, scalings: torch.Tensor | None) -> Iterator[None]:
    """Every X-LoRA layer reads ``scalings`` (``None``: no expert) while the wrapped model runs directly."""
    previous = model.routing.scalings
    model.routing.scalings = scalings
    try:
        yield
    finally:
        model.routing.scalings = previous


def _one_hot(model: XLoraModel, index: int) -> torch.Tensor:
    weight = model.classifier.last_layer.weight
    scalings = torch.zeros(1, 1, 1, model.n_experts, dtype=weight.dtype, device=model.device)
    scalings[..., index] = 1.0
    return scalings


def _batches(features: list[dict[str, Any]], collator: CompletionCollator, size: int, device) -> Iterator[dict]:
    for start in range(0, len(features), size):
        batch = collator(features[start : start + size])
        yield {key: value.to(device) for key, value in batch.items()}


def _loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> tuple[float, int]:
    """Summed next-token cross-entropy over the supervised tokens, and their number."""
    shifted = logits[:, :-1].float().reshape(-1, logits.shape[-1])
    targets = labels[:, 1:].reshape(-1)
    loss = torch.nn.functional.cross_entropy(shifted, targets, ignore_index=IGNORE_INDEX, reduction="sum")
    return float(loss), int((targets != IGNORE_INDEX).sum())


class _Usage:
    """Running sums of the per-token routing weights over the real tokens."""

    def __init__(self, n_experts: int) -> None:
        self.weights = torch.zeros(n_experts, dtype=torch.float64)
        self.top1 = torch.zeros(n_experts, dtype=torch.float64)
        self.entropy = 0.0
        self.tokens = 0

    def add(self, weights: torch.Tensor, mask: torch.Tensor) -> None:
        """``weights`` ``[batch, seq, n_experts]``, ``mask`` ``[batch, seq]`` (1 on real tokens)."""
        real = weights[mask.bool()].double()
        if real.numel() == 0:
            return
        self.weights += real.sum(0)
        self.top1 += torch.bincount(real.argmax(-1), minlength=real.shape[-1]).double()
        p = real / real.sum(-1, keepdim=True).clamp_min(1e-12)
        self.entropy += float(-(p * p.clamp_min(1e-12).log()).sum())
        self.tokens += real.shape[0]


def _token_weights(model: XLoraModel) -> torch.Tensor:
    """The last forward's processed scalings, mean over the layers: ``[batch, seq, n_experts]``."""
    scalings = process_scalings(model.xlora_config, model.get_latest_scalings())
    return scalings.float().mean(dim=2).cpu()


def _prompt_groups(examples: Sequence[Mapping[str, Any]], tokenizer: Any, fields: Fields):
    """Prompts grouped by token length (no padding needed), with their positions in ``examples``."""
    encoded = {i: tokenizer(e[fields.prompt])["input_ids"] for i, e in enumerate(examples) if fields.prompt in e}
    groups: dict[int, list[int]] = {}
    for i, ids in encoded.items():
        groups.setdefault(len(ids), []).append(i)
    for length in sorted(groups):
        yield groups[length], torch.tensor([encoded[i] for i in groups[length]], dtype=torch.long)


def _exact_match(
    generate, examples: Sequence[Mapping[str, Any]], tokenizer: Any, fields: Fields, device, max_new_tokens: int
) -> float | None:
    """Fraction of the prompt/completion examples whose greedy answer (up to EOS) is exactly the completion."""
    n = correct = 0
    options = dict(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for index, input_ids in _prompt_groups(examples, tokenizer, fields):
        input_ids = input_ids.to(device)
        output = generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pad_token_id=pad, **options)
        for row, i in enumerate(index):
            answer = tokenizer.decode(output[row, input_ids.shape[1] :], skip_special_tokens=True)
            correct += int(answer == examples[i][fields.completion])
            n += 1
    return correct / n if n else None


def _heatmap_picks(n: int) -> set[int]:
    """Which examples the heatmap shows: :data:`HEATMAP_EXAMPLES` spread evenly over the data (first, last and
    between), so data grouped by task shows more than its first task."""
    if n <= HEATMAP_EXAMPLES:
        return set(range(n))
    return {round(i * (n - 1) / (HEATMAP_EXAMPLES - 1)) for i in range(HEATMAP_EXAMPLES)}


def _scores(model: XLoraModel, features, examples, tokenizer, fields: Fields, *, batch_size: int):
    """The loss (and exact match) of the mixture, each expert alone and the base model; the usage sums and the
    heatmap rows of a few examples spread over the data."""
    collator = CompletionCollator.for_tokenizer(tokenizer)
    usage = _Usage(model.n_experts)
    heat: list[tuple[int, torch.Tensor]] = []
    shown = _heatmap_picks(len(features))
    seen = 0
    systems: dict[str, Any] = {MIXTURE: None, **{expert_system(n): i for i, n in enumerate(model.expert_names)}}
    systems[BASE] = "base"
    sums = {name: [0.0, 0] for name in systems}
    for batch in _batches(features, collator, batch_size, model.device):
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        for name, which in systems.items():
            logits = _forward(model, which, inputs)
            total, count = _loss_sum(logits, batch["labels"])
            sums[name][0] += total
            sums[name][1] += count
            if which is None:
                weights = _token_weights(model)
                mask = batch["attention_mask"].cpu()
                usage.add(weights, mask)
                for row in range(weights.shape[0]):
                    if seen + row in shown:
                        heat.append((seen + row, weights[row, mask[row].bool()]))
                seen += weights.shape[0]
    completions = [e[fields.completion] for e in examples if fields.prompt in e and fields.completion in e]
    longest = max((len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in completions), default=0)
    scores = []
    for name, which in systems.items():
        total, count = sums[name]
        em = None
        if longest:
            em = _exact_match(
                lambda which=which, **kw: _generate(model, which, kw),
                examples,
                tokenizer,
                fields,
                model.device,
                longest + 1,
            )
        scores.append(SystemScores(system=name, loss=total / max(count, 1), exact_match=em))
    return scores, usage, heat


def _forward(model: XLoraModel, which: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Logits of one system: the mixture (``None``), one expert alone (its index) or the base (``"base"``)."""
    if which is None:
        return model(**inputs).logits
    if which == "base":
        with model.disable_adapter():
            return model(**inputs).logits
    with _fixed_routing(model, _one_hot(model, which)):
        return model.model(**inputs).logits


def _generate(model: XLoraModel, which: Any, kwargs: dict[str, Any]) -> torch.Tensor:
    """Greedy generation of one system (see :func:`_forward`)."""
    if which is None:
        return model.generate(**kwargs)
    if which == "base":
        with model.disable_adapter():
            return model.generate(**kwargs)
    with _fixed_routing(model, _one_hot(model, which)):
        return model.model.generate(**kwargs)


def compute_evidence(
    model: XLoraModel,
    data: str | os.PathLike[str] | Iterable[Mapping[str, Any]],
    *,
    tokenizer: Any,
    max_length: int = 512,
    batch_size: int = 8,
    plots: bool = True,
    dataset_name: str | None = None,
    fields: Fields | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> RoutingEvidence:
    """Routing usage, entropy, scores and (with ``plots``) pictures of ``model`` on ``data`` (see the module).

    ``data``: a ``.jsonl`` / ``.txt`` file, a ``datasets.Dataset`` or a list of dicts, as ``train`` reads them.
    ``dataset_name`` names it on the card (default: the file name, or the dataset's name). ``token`` and
    ``cache_dir`` are used to fetch the base model's tokenizer when ``tokenizer`` is ``None``.
    """
    if plots:
        require_plots()
    if tokenizer is None:
        tokenizer = default_tokenizer(model, token=token, cache_dir=cache_dir)
    fields = fields or Fields()
    examples = load_examples(data)
    name, digest = _describe(data, examples, dataset_name)
    source = str(data) if isinstance(data, (str, os.PathLike)) else "eval dataset"
    features = [
        tokenize_example(e, tokenizer, max_length=max_length, fields=fields, where=f"{source}, example {i}")
        for i, e in enumerate(examples)
    ]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            scores, usage, heat = _scores(model, features, examples, tokenizer, fields, batch_size=batch_size)
    finally:
        model.train(was_training)
    n = max(usage.tokens, 1)
    names = list(model.expert_names)
    images = _pictures(names, heat, features, tokenizer, usage) if plots else {}
    return RoutingEvidence(
        dataset_name=name,
        n_examples=len(examples),
        sha256=digest,
        n_tokens=usage.tokens,
        expert_names=names,
        mean_weights=[float(v) / n for v in usage.weights],
        top1_shares=[float(v) / n for v in usage.top1],
        entropy=usage.entropy / n,
        scores=scores,
        images=images,
    )


def _png(figure: Any) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


def _pictures(
    names: list[str], heat: list[tuple[int, torch.Tensor]], features, tokenizer, usage: _Usage
) -> dict[str, bytes]:
    """The heatmap of a few examples spread over the data and the usage bar chart, as PNG bytes by file name."""
    from matplotlib.figure import Figure

    n = max(usage.tokens, 1)
    rows = len(heat)
    figure = Figure(figsize=(10, 1.0 + 0.45 * max(len(names), 2) * rows), dpi=100, layout="constrained")
    for k, (index, weights) in enumerate(heat):
        ax = figure.add_subplot(rows, 1, k + 1)
        image = ax.imshow(weights.T.numpy(), aspect="auto", cmap="viridis", vmin=0.0, interpolation="nearest")
        figure.colorbar(image, ax=ax, label="weight", fraction=0.03)
        tokens = [repr(tokenizer.decode([t]))[1:-1] for t in features[index]["input_ids"][: weights.shape[0]]]
        step = max(1, math.ceil(len(tokens) / 60))
        ax.set_xticks(range(0, len(tokens), step), tokens[::step], rotation=90, fontsize=7)
        ax.set_yticks(range(len(names)), names)
        ax.set_title(f"example {index}: routing weight per token (mean over layers)", fontsize=9)
    heatmap = _png(figure)
    figure = Figure(figsize=(max(4, 1.2 * len(names) + 2), 3.2), dpi=100, layout="constrained")
    ax = figure.add_subplot(1, 1, 1)
    x = torch.arange(len(names)).numpy()
    ax.bar(x - 0.2, (usage.weights / n).numpy(), width=0.4, label="mean routing weight")
    ax.bar(x + 0.2, (usage.top1 / n).numpy(), width=0.4, label="top-1 share of tokens")
    ax.set_xticks(x, names)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=8)
    ax.set_title(f"Expert usage over {usage.tokens} tokens", fontsize=10)
    return {HEATMAP_NAME: heatmap, USAGE_NAME: _png(figure)}
