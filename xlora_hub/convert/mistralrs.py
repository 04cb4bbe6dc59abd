"""The mistral.rs export: a folder that ``mistralrs`` loads as written (``Which.XLora(xlora_model_id=folder,
order=folder/ordering.json, model_id=base)``), with the same numbers as xlora-hub.

What mistral.rs reads, and so what :func:`export_mistralrs` writes (checked against mistral.rs 0.6.0 and 0.9.5,
``mistralrs-core/src/pipeline/paths.rs``, ``lora/mod.rs``, ``xlora_models/classifier.rs``; see docs/mistralrs.md):

* **Flat expert files.** For a local folder mistral.rs lists only the top level, and gives every file of the folder
  to the first expert in ``order`` whose name occurs in the file's name (a ``.safetensors`` file as its weights,
  anything else parsed as its LoRA config). So each expert is ``<name>_adapter_config.json`` +
  ``<name>_adapter_model.safetensors``, no other file holds an expert's name, and no name holds another
  (:func:`mistralrs_expert_names` renames when one would).
* **One base model id**, equal in ``ordering.json``, ``xlora_config.json`` and the ``model_id`` given to
  mistral.rs: an absolute path for a local base (mistral.rs resolves a relative one against its working directory),
  else the Hub id.
* **``layers``: exactly the Linear LoRA layers mistral.rs builds**, numbered from 0: every ``nn.Linear`` whose last
  name is in the experts' ``target_modules`` (mistral.rs matches target modules by that name only), except the LM
  head. An expert without LoRA on one of them gets zero factors there (exact); a layerwise classifier's rows follow
  the new numbering. LoRA on embeddings, convolutions or the LM head has no place in mistral.rs (it drops the first
  two silently and refuses the third): refused, naming the expert and module, unless ``lossy=True``.
* **One ``target_modules``, ``r`` and ``lora_alpha`` per expert, scale ``lora_alpha / r``.** mistral.rs ignores
  rsLoRA, ``rank_pattern`` and ``alpha_pattern`` and wants the same ``target_modules`` for every expert; each
  expert's per-layer scale (as peft computes it) is folded into ``lora_B`` and its rank padded with zeros where it
  differs, so the files say what mistral.rs computes and it computes what xlora-hub does.
* **The classifier as mistral.rs builds it**: ``xlora_dropout_p: 0.0`` (mistral.rs keeps the classifier's dropout
  on at inference), ``xlora_size`` always written (it defaults to 1), and for depth > 1 a hidden width equal to
  ``hidden_size`` (its last layer takes ``hidden_size`` inputs; a narrower classifier is padded with zero units).
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME
from ..errors import InvalidConfigError, UnsupportedFormatError
from ..hub import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, write_expert_files
from ..refs import loaded_base_folder, stored_base_hub_id
from .common import read_json
from .flat import flat_file_names
from .original import MISTRALRS_ORDERING_NAME, _original_classifier_state, _original_config
from .writing import save_tensors, write_export, write_json

if TYPE_CHECKING:
    from ..config import XLoraConfig
    from ..hub import ResolvedExpert
    from ..model import XLoraModel

logger = logging.getLogger(__name__)

MISTRALRS_XLORA_MODEL_TYPES = frozenset({"llama", "mistral", "mixtral", "gemma", "gemma2", "phi", "phi3", "starcoder2"})
"""``model_type`` values mistral.rs has an X-LoRA model for (``mistralrs-core/src/xlora_models/``)."""

_LORA_KEY = re.compile(
    r"^base_model\.model\.(?P<path>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B)(?:\.weight)?$"
)


# ---------------------------------------------------------------------------------------------- names
def _mistralrs_files(names: Sequence[str]) -> list[str]:
    """Every file name of a mistral.rs export with these expert names."""
    fixed = [CONFIG_NAME, CLASSIFIER_WEIGHTS_NAME, MISTRALRS_ORDERING_NAME]
    return fixed + [filename for name in names for filename in flat_file_names(name)]


def _mistralrs_names_ok(names: Sequence[str]) -> bool:
    """mistral.rs gives each file of the folder to the first expert whose name occurs in the file's name: an
    expert's files must contain its own name and no other, every other file no name at all. Compared without
    case, since ``Math_adapter_model.safetensors`` and ``math_adapter_model.safetensors`` are one file on a
    case-insensitive filesystem (macOS, Windows)."""
    folded = [name.casefold() for name in names]
    if len(set(folded)) != len(folded):
        return False
    owners = {filename.casefold(): name for name, low in zip(names, folded) for filename in flat_file_names(low)}
    for filename in (f.casefold() for f in _mistralrs_files(names)):
        owner = owners.get(filename)
        if [n for n, low in zip(names, folded) if low in filename] != ([owner] if owner else []):
            return False
    return True


def mistralrs_expert_names(names: Sequence[str]) -> list[str]:
    """Expert names safe for mistral.rs (none is part of another or of a file name): the names themselves when they
    are, else ``e<i>_<name>``, else ``xlora_expert_<i>``."""
    width = len(str(len(names) - 1))
    for candidate in (
        list(names),
        [f"e{i:0{width}d}_{n}" for i, n in enumerate(names)],
        [f"xlora_expert_{i:0{width}d}" for i in range(len(names))],
    ):
        if _mistralrs_names_ok(candidate):
            return candidate
    raise UnsupportedFormatError(f"Cannot name experts {list(names)} safely for mistral.rs.")  # pragma: no cover


# ---------------------------------------------------------------------------------------------- base model id
def mistralrs_base_model_id(model: XLoraModel, base_model_id: str | None = None) -> str:
    """The base model id mistral.rs can open: ``base_model_id`` when given (an existing folder made absolute), else
    the mixture's base (a local folder by its absolute path, a Hub repo by its id)."""
    if base_model_id:
        folder = os.path.expanduser(base_model_id)
        return str(Path(folder).resolve()) if os.path.isdir(folder) else base_model_id
    ref = model.xlora_config.base_model
    text = ref.repo_id if ref is not None else ""
    local = loaded_base_folder(model.model)
    if text and os.path.isabs(os.path.expanduser(text)):
        return str(Path(text).expanduser())
    if stored_base_hub_id(text or None, loaded_from=local):
        if ref.revision:
            logger.warning(
                "mistral.rs loads %s at its default branch, not at revision %s the mixture was built on.",
                text,
                ref.revision,
            )
        return text  # a Hub id ("owner/base", "gpt2"), not a folder of the mixture named like one
    if local:
        return local  # "./base_model" (or "base_model") of a local mixture, loaded from its absolute path
    raise InvalidConfigError(
        "The mixture names no base model mistral.rs can open"
        + (f" ({text!r} is a path relative to the mixture)" if text else "")
        + "; pass `base_model_id=` (`--base-model-id`): a Hub repo id or the absolute path of the base model folder."
    )


# ---------------------------------------------------------------------------------------------- checks
def _check_exportable(config: XLoraConfig, model: XLoraModel) -> None:
    """Refuse the settings mistral.rs cannot run; warn when the base is an architecture it has no X-LoRA model for."""
    if config.top_k_lora is not None or config.enable_softmax_topk:
        raise UnsupportedFormatError(
            "mistral.rs does not support `top_k_lora` / `enable_softmax_topk`; set them to None/False to export."
        )
    if config.xlora_depth > 1 and config.xlora_size > config.hidden_size:
        raise UnsupportedFormatError(
            f"mistral.rs builds the classifier's last layer with hidden_size={config.hidden_size} inputs; this "
            f"classifier's hidden layers are wider (xlora_size={config.xlora_size}), which it cannot load. Retrain "
            f"the classifier with xlora_size <= {config.hidden_size}."
        )
    model_type = getattr(getattr(model.model, "config", None), "model_type", None)
    if model_type not in MISTRALRS_XLORA_MODEL_TYPES:
        logger.warning(
            "mistral.rs has X-LoRA models for %s only; this base is model_type=%r, which it may not load.",
            ", ".join(sorted(MISTRALRS_XLORA_MODEL_TYPES)),
            model_type,
        )


def _short(path: str) -> str:
    """A module's last name: the only part of a path mistral.rs matches against ``target_modules``."""
    return path.rsplit(".", 1)[-1]


def _head_paths(model: XLoraModel) -> set[str]:
    """The LM head's module path(s): mistral.rs refuses LoRA there ("unsupported with X-LoRA")."""
    from ..layers import XLoraLayer

    head = model.model.get_output_embeddings() if hasattr(model.model, "get_output_embeddings") else None
    paths = set()
    for path, module in model.model.named_modules():
        inner = module.lora_layer.get_base_layer() if isinstance(module, XLoraLayer) else module
        if _short(path) == "lm_head" or (head is not None and (module is head or inner is head)):
            paths.add(path)
    return paths


def _dropped_layers(model: XLoraModel, heads: set[str]) -> dict[str, str]:
    """Our X-LoRA layers mistral.rs has no LoRA for, with what they are (embedding, convolution, LM head)."""
    from ..layers import XLoraLinear

    dropped = {}
    for layer in model.xlora_layers:
        if layer.module_name in heads:
            dropped[layer.module_name] = "the LM head (mistral.rs refuses LoRA there with X-LoRA)"
        elif not isinstance(layer, XLoraLinear):
            kind = "an embedding" if "Embedding" in type(layer).__name__ else "a convolution"
            dropped[layer.module_name] = f"{kind} (mistral.rs has LoRA on Linear layers only and drops it)"
    return dropped


def built_layers(model: XLoraModel, targets: set[str], heads: set[str]) -> list[str]:
    """The Linear LoRA layers mistral.rs builds, in the model's order: every Linear (ours or a plain one) whose
    last name is in ``targets``, except the LM head."""
    from ..layers import XLoraLayer, XLoraLinear

    ours = {layer.module_name for layer in model.xlora_layers}
    built = []
    for path, module in model.model.named_modules():
        if any(path.startswith(p + ".") for p in ours) or path in heads or _short(path) not in targets:
            continue
        if isinstance(module, XLoraLinear) or (isinstance(module, nn.Linear) and not isinstance(module, XLoraLayer)):
            built.append(path)
    return built


# ---------------------------------------------------------------------------------------------- experts
@dataclass
class _Plan:
    """What the export writes: the layers mistral.rs builds, their targets, and each change said to the user."""

    layers: list[str]
    targets: list[str]
    dropped: dict[str, str]
    changes: list[str] = field(default_factory=list)


def _plan(model: XLoraModel, *, lossy: bool) -> _Plan:
    """The layers to write; refuses (or, ``lossy``, lists) the LoRA mistral.rs would drop, per expert and module."""
    heads = _head_paths(model)
    dropped = _dropped_layers(model, heads)
    changes = [
        f"expert {name!r}: LoRA on {layer.module_name}, {dropped[layer.module_name]}"
        for layer in model.xlora_layers
        if layer.module_name in dropped
        for name in layer.local_experts
    ]
    if changes and not lossy:
        raise UnsupportedFormatError(
            "mistral.rs cannot run these experts as they are: "
            + "; ".join(changes)
            + ". Retrain the experts on Linear projections only, or pass `lossy=True` (`--lossy`) to export "
            "without that LoRA (mistral.rs then computes another function than this mixture)."
        )
    targets = sorted({_short(layer.module_name) for layer in model.xlora_layers if layer.module_name not in dropped})
    if not targets:
        raise UnsupportedFormatError("mistral.rs would run none of this mixture's LoRA layers; nothing to export.")
    return _Plan(built_layers(model, set(targets), heads), targets, dropped, changes)


def _expert_files(model: XLoraModel, expert: ResolvedExpert, scratch: Path) -> tuple[dict[str, Any], dict]:
    """The expert's peft files as xlora-hub saves them (its trained factors when the experts were trained)."""
    folder = scratch / expert.name
    write_expert_files(model, expert, folder, from_model=model.xlora_config.use_trainable_adapters)
    config = read_json(folder / ADAPTER_CONFIG_NAME, what=f"expert {expert.name!r}")
    return config, load_file(str(folder / ADAPTER_WEIGHTS_NAME))


def _mistralrs_expert(
    model: XLoraModel, expert: ResolvedExpert, plan: _Plan, scratch: Path
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """One expert as mistral.rs reads it: factors on exactly ``plan.layers``, one rank, ``lora_alpha = r``.

    mistral.rs applies one scale ``lora_alpha / r`` per expert; it is written as 1 and, per layer, peft's own scale
    (``layer.scaling``: rsLoRA and alpha/rank patterns included, what xlora-hub computes) is folded into
    ``lora_B``, so a ``lora_alpha`` of 0 (valid with ``alpha_pattern``) needs no division. A smaller rank is
    padded with zero rows of A / columns of B. A layer without this expert gets zero factors. All exact.
    """
    config, state = _expert_files(model, expert, scratch)
    factors: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        match = _LORA_KEY.match(key)
        if match is None and any(key.startswith(f"base_model.model.{path}.") for path in plan.dropped):
            continue  # e.g. the embedding's own weight, which peft saves beside its LoRA: left out with it
        if match is None:  # defensive: building a mixture already refuses modules_to_save
            raise UnsupportedFormatError(
                f"Expert {expert.name!r}: tensor {key!r} is not a LoRA factor (modules_to_save or trainable tokens?); "
                "mistral.rs loads LoRA factors only. Retrain the expert without them."
            )
        factors.setdefault(match["path"], {})[match["part"]] = tensor
    ours = {layer.module_name: layer for layer in model.xlora_layers}
    kept = {path: f for path, f in factors.items() if path not in plan.dropped}
    rank = max(int(f["lora_A"].shape[0]) for f in kept.values()) if kept else int(config.get("r", 1))
    out: dict[str, torch.Tensor] = {}
    for path in plan.layers:
        prefix = f"base_model.model.{path}"
        if path in kept:
            a, b = kept[path]["lora_A"], kept[path]["lora_B"]
            scale = float(ours[path].lora_layer.scaling[expert.name])
            factor = scale  # mistral.rs multiplies by lora_alpha / r = 1
            if a.shape[0] < rank:
                a = torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])])
                b = torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], dim=1)
            if abs(factor - 1.0) > 1e-12:
                b = (b.double() * factor).to(b.dtype)
        else:
            base = model.model.get_submodule(path)
            base = base.lora_layer.get_base_layer() if hasattr(base, "lora_layer") else base
            dtype = next(iter(state.values())).dtype
            a = torch.zeros(rank, base.in_features, dtype=dtype)
            b = torch.zeros(base.out_features, rank, dtype=dtype)
        out[f"{prefix}.lora_A.weight"], out[f"{prefix}.lora_B.weight"] = a, b
    config = dict(config)
    config.update(
        r=rank,
        lora_alpha=float(rank),
        target_modules=plan.targets,
        use_rslora=False,
        rank_pattern={},
        alpha_pattern={},
        layers_to_transform=None,
        layers_pattern=None,
        exclude_modules=None,
    )
    return config, out


# ---------------------------------------------------------------------------------------------- classifier
def _padded_classifier(state: Mapping[str, torch.Tensor], depth: int, size: int, hidden: int) -> dict:
    """Hidden layers widened from ``size`` to ``hidden`` units with zero weights and biases (ReLU(0) = 0, so the
    extra units change nothing): mistral.rs builds every hidden layer and the last one ``hidden`` wide."""
    out = dict(state)
    if depth == 1 or size == hidden:
        return out
    for i in range(depth - 1):
        weight, bias = out[f"inner.{i}.weight"], out[f"inner.{i}.bias"]
        rows = weight.new_zeros(hidden - size, weight.shape[1])
        weight = torch.cat([weight, rows])
        if i > 0:
            weight = torch.cat([weight, weight.new_zeros(hidden, hidden - size)], dim=1)
        out[f"inner.{i}.weight"], out[f"inner.{i}.bias"] = weight, torch.cat([bias, bias.new_zeros(hidden - size)])
    last = out["last.weight"]
    out["last.weight"] = torch.cat([last, last.new_zeros(last.shape[0], hidden - size)], dim=1)
    return out


def _layerwise_rows(state: dict, model: XLoraModel, layers: list[str]) -> dict:
    """A layerwise classifier's last layer with one block of rows per layer mistral.rs builds (in its numbering):
    our rows for our layers, zeros for a layer no expert adapts."""
    n = model.n_experts
    index = {name: i for i, name in enumerate(model.layer_names)}
    out = dict(state)
    for key in ("last.weight", "last.bias"):
        rows = state[key]
        blocks = [
            rows[index[p] * n : (index[p] + 1) * n] if p in index else rows.new_zeros(n, *rows.shape[1:])
            for p in layers
        ]
        out[key] = torch.cat(blocks)
    return out


def _classifier(model: XLoraModel, layers: list[str]) -> dict[str, torch.Tensor]:
    """The classifier under mistral.rs' keys (``inner.N`` by Linear layer, ``last``), shaped as it builds it."""
    config = model.xlora_config
    state = {k: v.detach() for k, v in _original_classifier_state(model.classifier).items()}
    state = _padded_classifier(state, config.xlora_depth, config.xlora_size, config.hidden_size)
    return _layerwise_rows(state, model, layers) if config.layerwise_scalings else state


def _xlora_config(model: XLoraModel, order: list[str], base_model_id: str) -> dict[str, Any]:
    """The original layout's config with what mistral.rs needs: no classifier dropout, ``xlora_size`` explicit."""
    config = model.xlora_config
    data = dict(_original_config(config, order, base_model_id))
    data["base_model_id"] = base_model_id
    data["xlora_dropout_p"] = 0.0  # mistral.rs runs the classifier's dropout at inference too
    data["xlora_size"] = config.hidden_size if config.xlora_depth > 1 else config.xlora_size
    return data


# ---------------------------------------------------------------------------------------------- writing
def export_mistralrs(
    model: XLoraModel,
    save_directory: str | os.PathLike[str],
    *,
    base_model_id: str | None = None,
    lossy: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write a folder mistral.rs loads as written: ``Which.XLora(xlora_model_id=<folder>,
    order=<folder>/ordering.json, model_id=<base_model_id>)``.

    Contents: ``xlora_config.json``, ``xlora_classifier.safetensors`` (``inner.N.*`` / ``last.*``), each expert as
    ``<name>_adapter_config.json`` + ``<name>_adapter_model.safetensors``, and ``ordering.json`` (expert order,
    the scaling index of each Linear layer mistral.rs builds, base model id). ``base_model_id`` (default: the
    mixture's base, a local folder by absolute path) is written in both files; pass the same to mistral.rs.
    Experts are renamed when a name occurs in another or in a file name. LoRA that mistral.rs cannot run
    (embeddings, convolutions, the LM head) is refused with an error naming expert and module, unless
    ``lossy=True``: it is then left out, and each change is logged as a warning. A ``save_directory`` that
    already holds files is refused unless ``overwrite=True`` (it is then replaced whole). See docs/mistralrs.md.
    """
    config = model.xlora_config
    _check_exportable(config, model)
    base_id = mistralrs_base_model_id(model, base_model_id)
    plan = _plan(model, lossy=lossy)
    for change in plan.changes:
        logger.warning("mistral.rs export (lossy): left out %s.", change)
    new_names = dict(zip(model.expert_names, mistralrs_expert_names(model.expert_names)))
    if any(k != v for k, v in new_names.items()):
        logger.warning("Experts renamed for mistral.rs (a name occurred in another or in a file name): %s", new_names)
    order = [new_names[n] for n in model.expert_names]

    def write(tmp: Path, final: Path) -> None:
        with tempfile.TemporaryDirectory(prefix="xlora-mistralrs-") as scratch:
            for expert in model.experts:
                adapter_config, tensors = _mistralrs_expert(model, expert, plan, Path(scratch))
                config_name, weights_name = flat_file_names(new_names[expert.name])
                write_json(tmp / config_name, adapter_config)
                save_tensors(tensors, tmp / weights_name)
        write_json(tmp / CONFIG_NAME, _xlora_config(model, order, base_id))
        save_tensors(_classifier(model, plan.layers), tmp / CLASSIFIER_WEIGHTS_NAME)
        ordering = {"order": order, "layers": {name: i for i, name in enumerate(plan.layers)}, "base_model_id": base_id}
        write_json(tmp / MISTRALRS_ORDERING_NAME, ordering)

    return write_export(save_directory, write, overwrite=overwrite)
