"""Flatten a mixture into ONE plain peft LoRA, so any LoRA server (vLLM, SGLang, LoRAX, TGI, mistral.rs) serves it.

X-LoRA routes every token; a plain LoRA cannot. The flattened adapter folds the routing into fixed weights: for each
LoRA-targeted module, the experts' A factors are concatenated along the rank and their B factors likewise (rank = the
sum of the ranks of the experts on that module), each expert's block scaled by a fixed weight times its own
``lora_alpha / r`` (rsLoRA's ``alpha / sqrt(r)`` and rank/alpha patterns included, as peft computed it). The weight
is the expert's mean routing weight on that layer over calibration data (the scalings the real pass applies: top-k,
top-k softmax, temperature and global weight included, averaged over the real tokens; one row shared by every
layer unless ``layerwise_scalings``), or a weighting the user gives. The adapter is exactly the mixture with its
scalings pinned to those weights (:func:`pinned_routing`); against the really routed mixture it is an approximation,
whose fidelity on the calibration data is measured (:func:`measure_fidelity`) and written into the model card.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import numbers
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..data import CompletionCollator, TokenizedDataset, tokenize_dataset
from ..errors import IncompatibleExpertError, InvalidConfigError
from ..hub import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, MODEL_CARD_NAME, clear_connection_errors, hub_api
from ..refs import hub_url, loaded_base_folder, stored_base_hub_id
from ..scalings import process_scalings
from .writing import save_tensors, write_export

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

    from ..layers import XLoraLayer
    from ..model import XLoraModel

CalibrationData = str | os.PathLike[str] | Sequence[str] | Iterable[Mapping[str, Any]] | TokenizedDataset
"""What ``calibration=`` takes: what :func:`xlora_hub.data.tokenize_dataset` takes (a ``.jsonl`` / ``.txt`` file, a
list of example dicts, a ``datasets.Dataset``, a :class:`~xlora_hub.data.TokenizedDataset`), or a list of strings."""

CARD_TAGS = ("lora", "x-lora", "xlora-hub", "flattened-x-lora")


@dataclass(frozen=True)
class CalibrationInfo:
    """What the calibration data was, as the card states it: a name, its size and a digest to check it by."""

    name: str
    examples: int
    tokens: int
    sha256: str


@dataclass(frozen=True)
class Fidelity:
    """The fixed-weight adapter against the really routed mixture, at every real token's next-token prediction."""

    positions: int
    greedy_match: float
    """Fraction of positions where both give the same most likely next token."""
    mean_kl: float
    """Mean KL(mixture || flattened) of the next-token distributions, in nats."""


# ---------------------------------------------------------------------------------------------- weights
def parse_weights(text: str) -> dict[str, float]:
    """``name=w,name=w`` (``--weights``) as a mapping; a malformed entry is an error naming it."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.strip().partition("=")
        try:
            number = float(value)
        except ValueError:
            number = None
        if not sep or not name.strip() or number is None:
            raise InvalidConfigError(
                f"--weights takes NAME=WEIGHT pairs separated by commas (for example 'math=0.7,code=0.3'), "
                f"got {part.strip()!r}."
            )
        out[name.strip()] = number
    return out


def _given_weights(model: XLoraModel, weights: Mapping[str, float]) -> torch.Tensor:
    """``[1, n_experts]`` from a user's ``{expert: weight}`` (experts not named weigh 0)."""
    names = model.expert_names
    unknown = [name for name in weights if name not in names]
    if unknown:
        raise InvalidConfigError(
            f"weights= names {unknown}, which {'is not an expert' if len(unknown) == 1 else 'are not experts'} of "
            f"the mixture; its experts are {names}."
        )
    if not weights:
        raise InvalidConfigError(f"weights= is empty; give a weight to at least one of the experts {names}.")
    row = torch.zeros(1, len(names), dtype=torch.float64)
    for name, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise InvalidConfigError(
                f"weights= gives expert {name!r} the weight {value!r}; it must be a finite number."
            )
        row[0, names.index(name)] = float(value)
    return row


def _tokenized(calibration: CalibrationData, tokenizer: Any, *, max_length: int) -> TokenizedDataset:
    """The calibration data through the training data loader (strings become ``{"text": ...}`` examples)."""
    if isinstance(calibration, Sequence) and not isinstance(calibration, str) and calibration:
        if all(isinstance(item, str) for item in calibration):
            calibration = [{"text": item} for item in calibration]
    return tokenize_dataset(calibration, tokenizer, max_length=max_length, add_eos=False)


def _calibration_info(calibration: CalibrationData, data: TokenizedDataset) -> CalibrationInfo:
    """Name (a file's name, never its path), size and digest (of a file's bytes, else of the token ids)."""
    tokens = sum(len(f["input_ids"]) for f in data.features)
    if isinstance(calibration, (str, os.PathLike)):
        digest = hashlib.sha256(Path(calibration).read_bytes()).hexdigest()
        return CalibrationInfo(Path(calibration).name, len(data), tokens, digest)
    ids = json.dumps([f["input_ids"] for f in data.features], separators=(",", ":"))
    return CalibrationInfo("in-memory examples", len(data), tokens, hashlib.sha256(ids.encode()).hexdigest())


def _batches(model: XLoraModel, data: TokenizedDataset, tokenizer: Any, batch_size: int) -> Iterator[dict]:
    """Right-padded ``input_ids`` / ``attention_mask`` batches on the model's device."""
    collate = (
        CompletionCollator.for_tokenizer(tokenizer) if tokenizer is not None else CompletionCollator(pad_token_id=0)
    )
    for start in range(0, len(data), batch_size):
        batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
        yield {k: batch[k].to(model.device) for k in ("input_ids", "attention_mask")}


@torch.no_grad()
def mean_routing_weights(model: XLoraModel, batches: Iterable[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """Each expert's mean routing weight per layer, ``[n_layers or 1, n_experts]`` (float64): the scalings the real
    pass applies (:func:`xlora_hub.scalings.process_scalings`), averaged over the real tokens (``attention_mask``)."""
    total, count = None, 0.0
    for batch in batches:
        raw = model.compute_scalings(dict(batch))
        scalings = process_scalings(model.xlora_config, raw).to(torch.float64)  # [b, s, L or 1, E]
        mask = batch["attention_mask"].to(scalings.device, torch.float64)[:, :, None, None]
        part = (scalings * mask).sum(dim=(0, 1))
        total = part if total is None else total + part
        count += float(mask.sum())
    if total is None or count == 0:
        raise InvalidConfigError("The calibration data holds no token; pass at least one example.")
    return (total / count).cpu()


@contextlib.contextmanager
def pinned_routing(model: XLoraModel, weights: torch.Tensor) -> Iterator[None]:
    """Inside the block, ``model.model(...)`` (the real pass alone) routes every token with ``weights``
    (``[n_layers or 1, n_experts]``, as the layers read processed scalings): the fixed-weight mixture."""
    weight = model.classifier.last_layer.weight
    pinned = weights.to(device=weight.device, dtype=weight.dtype)[None, None]
    previous = model.routing.scalings
    model.routing.scalings = pinned
    try:
        yield
    finally:
        model.routing.scalings = previous


@torch.no_grad()
def measure_fidelity(
    model: XLoraModel, weights: torch.Tensor, batches: Iterable[Mapping[str, torch.Tensor]]
) -> Fidelity:
    """The fixed-weight mixture (what the flattened adapter computes) against the routed mixture, on every real
    token: the share of equal greedy next tokens and the mean KL(routed || fixed) of the next-token distributions."""
    positions, equal, kl_sum = 0, 0, 0.0
    for batch in batches:
        kwargs = dict(batch, use_cache=False)
        routed = torch.log_softmax(model(**kwargs).logits.to(torch.float64), dim=-1)
        with pinned_routing(model, weights):
            fixed = torch.log_softmax(model.model(**kwargs).logits.to(torch.float64), dim=-1)
        mask = batch["attention_mask"].to(routed.device).bool()
        routed, fixed = routed[mask], fixed[mask]
        positions += int(mask.sum())
        equal += int((routed.argmax(-1) == fixed.argmax(-1)).sum())
        kl_sum += float((routed.exp() * (routed - fixed)).sum())
    return Fidelity(positions=positions, greedy_match=equal / max(positions, 1), mean_kl=kl_sum / max(positions, 1))


# ---------------------------------------------------------------------------------------------- the adapter
def _flat_factors(layer: XLoraLayer, row: torch.Tensor) -> dict[str, torch.Tensor]:
    """One module's concatenated factors under peft's saved names, each expert's block of A scaled by its weight
    times its ``lora_alpha / r`` (the flattened adapter's own scaling is 1)."""
    from peft.tuners import lora

    peft_layer = layer.lora_layer
    experts = layer.local_experts
    scale = [float(row[i]) * float(peft_layer.scaling[n]) for i, n in zip(layer.global_index, experts)]
    if isinstance(peft_layer, lora.Embedding):
        a = [peft_layer.lora_embedding_A[n] for n in experts]
        b = [peft_layer.lora_embedding_B[n] for n in experts]
        names = ("lora_embedding_A", "lora_embedding_B")
    else:
        if isinstance(peft_layer, lora.Conv2d) and peft_layer.lora_A[experts[0]].groups != 1:
            raise IncompatibleExpertError(
                f"Module {layer.module_name!r} is a grouped convolution; its experts cannot be concatenated into one "
                "LoRA. Flatten a mixture whose experts do not target it."
            )
        a = [peft_layer.lora_A[n].weight for n in experts]
        b = [peft_layer.lora_B[n].weight for n in experts]
        names = ("lora_A.weight", "lora_B.weight")
    dtype = a[0].dtype
    flat_a = torch.cat([t.detach().to(torch.float64) * s for t, s in zip(a, scale)], dim=0).to(dtype)
    flat_b = torch.cat([t.detach() for t in b], dim=1)
    prefix = f"base_model.model.{layer.module_name}."
    return {prefix + names[0]: flat_a, prefix + names[1]: flat_b}


def _target_modules(model: XLoraModel, modules: list[str]) -> list[str]:
    """The union of the targeted modules' short names (``q_proj``...) when those name exactly the flattened modules
    in this model, else the full module names (so peft adds no LoRA where the experts had none)."""
    short = sorted({name.rsplit(".", 1)[-1] for name in modules})
    matching = {name for name, _ in model.model.named_modules() if name.rsplit(".", 1)[-1] in short}
    return short if matching == set(modules) else sorted(modules)


def _hub_base(model: XLoraModel) -> str | None:
    """The base model's Hub id, ``None`` for a local base (a path, or a bare name that was a folder of the mixture):
    a local path is never written in the adapter's config nor on its card (nor published)."""
    base = model.xlora_config.base_model
    return stored_base_hub_id(base.repo_id, loaded_from=loaded_base_folder(model.model)) if base else None


def _lora_config(model: XLoraModel, ranks: dict[str, int]) -> Any:
    """peft's ``LoraConfig``: the most common rank as ``r``, ``rank_pattern``/``alpha_pattern`` for the modules
    whose rank differs, ``lora_alpha = r`` everywhere (scaling 1: every weight is in A), no dropout, no rsLoRA."""
    from peft import LoraConfig

    common = Counter(ranks.values()).most_common(1)[0][0]
    pattern = {name: rank for name, rank in ranks.items() if rank != common}
    first = model.peft_model.peft_config[model.expert_names[0]] if model.peft_model is not None else None
    base = model.xlora_config.base_model
    hub_base = _hub_base(model)
    return LoraConfig(
        r=common,
        lora_alpha=common,
        rank_pattern=pattern,
        alpha_pattern=dict(pattern),
        target_modules=_target_modules(model, list(ranks)),
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        fan_in_fan_out=any(getattr(layer.lora_layer, "fan_in_fan_out", False) for layer in model.xlora_layers),
        task_type=getattr(first, "task_type", None) or "CAUSAL_LM",
        base_model_name_or_path=hub_base,  # a local path is never written (nor published)
        revision=base.revision if hub_base else None,
        inference_mode=True,
    )


def flat_state_dict(model: XLoraModel, weights: torch.Tensor) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """The flattened adapter's tensors (peft's saved key names) and each module's rank, for ``weights``
    ``[n_layers or 1, n_experts]``."""
    state: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    for layer in model.xlora_layers:
        if not layer.local_experts:
            continue
        row = weights[layer.layer_index if weights.shape[0] > 1 else 0]
        factors = _flat_factors(layer, row)
        state.update(factors)
        ranks[layer.module_name] = next(iter(factors.values())).shape[0]
    return state, ranks


# ---------------------------------------------------------------------------------------------- the card
def _weights_table(model: XLoraModel, weights: torch.Tensor) -> str:
    names = model.expert_names
    head = "| Layer | " + " | ".join(f"`{n}`" for n in names) + " |\n|---|" + "---|" * len(names)
    if weights.shape[0] == 1:
        rows = ["| every layer | " + " | ".join(f"{float(w):.4f}" for w in weights[0]) + " |"]
    else:
        rows = [  # an expert that has no LoRA on a module contributes nothing there: "-"
            f"| `{layer.module_name}` | "
            + " | ".join(
                f"{float(w):.4f}" if i in layer.global_index else "-" for i, w in enumerate(weights[layer.layer_index])
            )
            + " |"
            for layer in model.xlora_layers
        ]
    return head + "\n" + "\n".join(rows)


def make_flattened_card(
    model: XLoraModel,
    weights: torch.Tensor,
    *,
    weighting: str,
    calibration: CalibrationInfo | None,
    fidelity: Fidelity | None,
    ranks: dict[str, int],
) -> Any:
    """The flattened adapter's ``huggingface_hub.ModelCard``: what it folds, the weighting, the calibration data and
    the measured fidelity against the routed mixture."""
    from huggingface_hub import ModelCard, ModelCardData

    base = model.xlora_config.base_model
    hub_base = _hub_base(model)
    relation = "adapter" if hub_base else None  # the relation describes a base_model; none without one
    data = ModelCardData(base_model=hub_base, base_model_relation=relation, library_name="peft", tags=list(CARD_TAGS))
    base_text = (
        f"[`{hub_base}`]({hub_url(hub_base, revision=base.revision or 'main')})" if hub_base else "its base model"
    )
    local_note = (
        ""
        if hub_base
        else "\nThe mixture was made on a local base model folder, so this adapter names no base model "
        "(`base_model_name_or_path` is empty): load that base model with transformers and pass it as `base_model`.\n"
    )
    if calibration is None:
        calib = "None: the weights were given, so the fidelity against the routed mixture was not measured."
    else:
        calib = (
            f"`{calibration.name}`: {calibration.examples} examples, {calibration.tokens} tokens, "
            f"sha256 `{calibration.sha256}`."
        )
    if fidelity is None:
        measured = "Not measured (no calibration data)."
    else:
        measured = (
            f"On the calibration data ({fidelity.positions} next-token positions), against the routed X-LoRA "
            f"mixture: **{100 * fidelity.greedy_match:.2f}%** of greedy next tokens equal, mean KL of the "
            f"next-token distributions **{fidelity.mean_kl:.4g}** nats (KL(mixture || this adapter))."
        )
    body = f"""
# Flattened X-LoRA mixture

One plain LoRA adapter over {base_text}, made by xlora-hub from an [X-LoRA](https://arxiv.org/abs/2402.07148)
mixture of {model.n_experts} experts ({", ".join(f"`{n}`" for n in model.expert_names)}). The mixture's per-token
routing is folded into fixed weights: on each of its {len(ranks)} modules the experts' LoRA factors are concatenated
(rank = the sum of their ranks, {min(ranks.values())} to {max(ranks.values())}), each expert scaled by its weight.
Any LoRA server can serve it; it approximates the mixture, which routes every token.

## Weighting

{weighting}

{_weights_table(model, weights)}

## Calibration data

{calib}

## Fidelity

{measured}

## Usage

```python
from peft import PeftModel

model = PeftModel.from_pretrained(base_model, "path/or/repo-of-this-adapter")
```
{local_note}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


# ---------------------------------------------------------------------------------------------- the entry points
def flatten_to_lora(
    model: XLoraModel,
    save_directory: str | os.PathLike[str],
    *,
    calibration: CalibrationData | None = None,
    weights: Mapping[str, float] | None = None,
    tokenizer: Any = None,
    max_length: int = 512,
    batch_size: int = 8,
    overwrite: bool = False,
) -> Path:
    """Write the mixture as ONE plain peft LoRA folder (``adapter_config.json``, ``adapter_model.safetensors``,
    ``README.md``) with its routing folded into fixed weights (see the module), and return the folder.

    ``calibration`` (a ``.jsonl`` / ``.txt`` file, a list of strings or of example dicts, as ``train`` takes; text
    needs ``tokenizer``) gives each expert its mean routing weight per layer and is where the fidelity against the
    routed mixture is measured. ``weights`` (``{expert: weight}``, experts not named weigh 0) is the weighting
    instead: taken as the scalings the layers apply (after top-k and the global weight), for every layer. One of
    the two is needed. A folder holding files is replaced only with ``overwrite=True``.
    ``PeftModel.from_pretrained(base, folder)`` loads it with no xlora-hub code.
    """
    if calibration is None and weights is None:
        raise InvalidConfigError(
            "Flattening needs a weighting: pass calibration= (data to measure each expert's mean routing weight on; "
            "`--calibration DATA` on the command line) or weights= ({expert: weight}; `--weights name=w,...`)."
        )
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InvalidConfigError(f"batch_size must be a positive integer, got {batch_size!r}.")
    row = _given_weights(model, weights) if weights is not None else None  # bad names fail before any pass
    info, fidelity = None, None
    was_training = model.training
    model.eval()
    try:
        if calibration is not None:
            data = _tokenized(calibration, tokenizer, max_length=max_length)
            info = _calibration_info(calibration, data)
            table = (
                row if row is not None else mean_routing_weights(model, _batches(model, data, tokenizer, batch_size))
            )
            fidelity = measure_fidelity(model, table, _batches(model, data, tokenizer, batch_size))
        else:
            table = row
    finally:
        model.train(was_training)
    state, ranks = flat_state_dict(model, table)
    if weights is not None:
        weighting = "Given by the user (`weights=`), the same for every layer."
    else:
        where = (
            "per layer" if table.shape[0] > 1 else "shared by every layer (the mixture's scalings are not layerwise)"
        )
        weighting = (
            "Each expert's mean routing weight over the real tokens of the calibration data, as the X-LoRA layers "
            f"apply it (top-k, softmax temperature and global scaling weight included), {where}."
        )
    card = make_flattened_card(model, table, weighting=weighting, calibration=info, fidelity=fidelity, ranks=ranks)
    config = _lora_config(model, ranks)

    def write(tmp: Path, final: Path) -> None:
        config.save_pretrained(str(tmp))
        save_tensors(state, tmp / ADAPTER_WEIGHTS_NAME)
        card.save(str(tmp / MODEL_CARD_NAME))

    return write_export(save_directory, write, overwrite=overwrite)


def push_flattened_lora(
    folder: str | os.PathLike[str],
    repo_id: str,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    commit_message: str | None = None,
    branch: str | None = None,
) -> CommitInfo:
    """Upload a folder :func:`flatten_to_lora` wrote to ``repo_id`` in one commit (the repo made if needed)."""
    from huggingface_hub.utils import validate_repo_id

    validate_repo_id(repo_id)
    folder = Path(folder)
    if not (folder / ADAPTER_CONFIG_NAME).is_file() or not (folder / ADAPTER_WEIGHTS_NAME).is_file():
        raise InvalidConfigError(
            f"{folder} is not a flattened LoRA folder (no {ADAPTER_CONFIG_NAME} and {ADAPTER_WEIGHTS_NAME}); "
            "write one with flatten_to_lora first."
        )
    with clear_connection_errors(f"Pushing the flattened LoRA to {repo_id!r}", token=token, download=False):
        api = hub_api(token)
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
        if branch is not None:
            api.create_branch(repo_id, branch=branch, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            allow_patterns=[ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, MODEL_CARD_NAME],
            commit_message=commit_message or "Upload flattened X-LoRA mixture (one LoRA, xlora-hub)",
            revision=branch,
        )


__all__ = [
    "CalibrationInfo",
    "Fidelity",
    "calibration_tokenizer",
    "flat_state_dict",
    "flatten_to_lora",
    "make_flattened_card",
    "mean_routing_weights",
    "measure_fidelity",
    "parse_weights",
    "pinned_routing",
    "push_flattened_lora",
]


def calibration_tokenizer(
    source: str | os.PathLike[str],
    *,
    tokenizer: str | None = None,
    base_model: str | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> Any:
    """The tokenizer the command lines read calibration data with (``--tokenizer``, else ``source``'s, else
    ``--base-model``'s).

    ``source`` is the mixture or checkpoint (its own tokenizer, then its recorded base's, as
    :func:`xlora_hub.hub.load_tokenizer` looks); a checkpoint converted onto ``--base-model`` may record no base,
    or one that is not where the user has it, so that base model is tried next. None found: an error naming both
    options.
    """
    from ..errors import InvalidMixtureError
    from ..hub import load_tokenizer

    hub = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    if tokenizer:
        return load_tokenizer(tokenizer, **hub)
    fix = "pass --tokenizer (a Hub id or folder with a tokenizer) or --base-model (a base model that has one)."
    try:
        return load_tokenizer(source, revision=revision, **hub)
    except InvalidMixtureError as err:
        if not base_model:
            raise InvalidMixtureError(f"{err} The calibration data needs one: {fix}") from None
    try:
        return load_tokenizer(base_model, **hub)
    except InvalidMixtureError as err:
        raise InvalidMixtureError(f"{err} The calibration data needs one: {fix}") from None
