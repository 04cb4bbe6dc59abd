"""Checking an expert before anything is built: its adapter config, its tensors' header, and the base model.

Every check that can fail (format, DoRA, target modules, shapes) runs on the files' headers before the base
model is touched, so a bad expert never leaves a half-built model behind. Target matching is peft's own.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from safetensors import safe_open
from torch import nn

from ..config import BaseModelRef
from ..errors import IncompatibleExpertError, InvalidConfigError, short_repr
from ..jsonfile import read_json_object
from ..refs import is_stored_hub_id
from .experts import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, ResolvedExpert

__all__ = [
    "FLOAT_DTYPES",
    "adapter_tensor_header",
    "adapter_tensor_shapes",
    "check_expert_matches_model",
    "check_factor_dtypes",
    "read_adapter_config",
    "warn_on_base_mismatch",
]

logger = logging.getLogger(__name__)

FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
"""safetensors dtypes a LoRA factor may have (peft casts between them; an integer or bool factor is a wrong file)."""


def read_adapter_config(expert: ResolvedExpert) -> dict[str, Any]:
    """The expert's ``adapter_config.json``, checked to be a plain LoRA adapter with sane values.

    Read with the one bounded JSON reader, then every value peft would use is checked here, so a bad value is
    an error naming the expert and the field rather than a bare ``KeyError``/``TypeError`` from peft.
    """
    path = expert.local_dir / ADAPTER_CONFIG_NAME
    fix = "Re-save the adapter with peft (`model.save_pretrained(dir)`)."
    try:
        config = read_json_object(path, what=f"Expert {expert.name!r}: {ADAPTER_CONFIG_NAME}", fix=fix)
    except InvalidConfigError as err:
        raise IncompatibleExpertError(str(err)) from None
    _check_peft_type(expert.name, config)
    if config.get("use_dora"):
        raise IncompatibleExpertError(
            f"Expert {expert.name!r} is a DoRA adapter (use_dora=true in {ADAPTER_CONFIG_NAME}); X-LoRA mixes plain "
            "LoRA experts only. Retrain it with `use_dora=False`."
        )
    if config.get("lora_bias"):
        raise IncompatibleExpertError(
            f"Expert {expert.name!r} uses lora_bias=true; X-LoRA mixes LoRA experts without a bias on B."
        )
    _check_lora_values(expert.name, config)
    return config


def _check_peft_type(name: str, config: dict[str, Any]) -> None:
    """peft reads ``peft_type`` as an exact key of its registry: missing or ``"lora"`` fails inside peft."""
    peft_type = config.get("peft_type")
    if peft_type is None:
        raise IncompatibleExpertError(
            f'Expert {name!r}: {ADAPTER_CONFIG_NAME} has no `peft_type`; a peft LoRA adapter has "peft_type": "LORA". '
            "Add it, or re-save the adapter with peft."
        )
    if not isinstance(peft_type, str):
        raise IncompatibleExpertError(
            f"Expert {name!r}: `peft_type` in {ADAPTER_CONFIG_NAME} must be a string, got {short_repr(peft_type)}."
        )
    if peft_type.upper() != "LORA":
        raise IncompatibleExpertError(
            f"Expert {name!r} is a {short_repr(peft_type, limit=40)} adapter; X-LoRA mixes LoRA adapters only."
        )
    if peft_type != "LORA":
        raise IncompatibleExpertError(
            f'Expert {name!r}: `peft_type` is {peft_type!r} in {ADAPTER_CONFIG_NAME}; peft only reads "LORA" '
            '(upper case). Write "peft_type": "LORA".'
        )


def _is_number(value: Any) -> bool:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_lora_values(name: str, config: dict[str, Any]) -> None:
    """``r``, ``lora_alpha``, their patterns, ``target_modules`` and ``modules_to_save``, as peft will use them."""
    where = f"in {ADAPTER_CONFIG_NAME}"
    r = config.get("r", 8)
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise IncompatibleExpertError(
            f"Expert {name!r}: `r` {where} must be a positive integer (the LoRA rank), got {short_repr(r)}. "
            "Set it to the rank the adapter was trained with (the first dimension of its lora_A tensors)."
        )
    alpha = config.get("lora_alpha", 8)
    if not _is_number(alpha):
        raise IncompatibleExpertError(
            f"Expert {name!r}: `lora_alpha` {where} must be a finite number, got {short_repr(alpha)}."
        )
    for field_name, check, kind in (
        ("rank_pattern", lambda v: not isinstance(v, bool) and isinstance(v, int) and v >= 1, "positive integers"),
        ("alpha_pattern", _is_number, "finite numbers"),
    ):
        pattern = config.get(field_name)
        if pattern in (None, {}):
            continue
        if not isinstance(pattern, dict) or not all(isinstance(k, str) and check(v) for k, v in pattern.items()):
            raise IncompatibleExpertError(
                f"Expert {name!r}: `{field_name}` {where} must map module names to {kind}, got {short_repr(pattern)}."
            )
    targets = config.get("target_modules")
    if targets is None or targets == [] or targets == "":
        raise IncompatibleExpertError(
            f"Expert {name!r}: {ADAPTER_CONFIG_NAME} has no `target_modules`, so it adapts no layer. X-LoRA mixes "
            "LoRA adapters of modules (target_modules); re-save the adapter with peft."
        )
    if isinstance(targets, str):
        try:
            re.compile(targets)
        except re.error as err:
            raise IncompatibleExpertError(
                f"Expert {name!r}: `target_modules` {short_repr(targets)} {where} is not a valid regex ({err})."
            ) from None
    elif not isinstance(targets, list) or not all(isinstance(t, str) and t for t in targets):
        raise IncompatibleExpertError(
            f"Expert {name!r}: `target_modules` {where} must be a list of module names or a regex, "
            f"got {short_repr(targets)}."
        )
    if config.get("modules_to_save"):
        raise IncompatibleExpertError(
            f"Expert {name!r} has modules_to_save {short_repr(config['modules_to_save'])} {where}: whole modules "
            "trained with the adapter, which X-LoRA cannot mix (it mixes LoRA factors only). Retrain the expert "
            "without modules_to_save, or remove that field if those modules were not trained."
        )


def adapter_tensor_shapes(expert: ResolvedExpert) -> dict[str, list[int]]:
    """Tensor name -> shape from the safetensors header (no tensor is read)."""
    return {key: shape for key, (shape, _) in adapter_tensor_header(expert).items()}


def adapter_tensor_header(expert: ResolvedExpert) -> dict[str, tuple[list[int], str]]:
    """Tensor name -> (shape, safetensors dtype) from the local file's header (no tensor is read)."""
    path = expert.local_dir / ADAPTER_WEIGHTS_NAME
    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: (list(f.get_slice(key).get_shape()), str(f.get_slice(key).get_dtype())) for key in f.keys()}
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt headers
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: {path} is not a readable safetensors file ({err}). Download it again "
            "(`force_download=True`)."
        ) from None


def _module_io(module: nn.Module) -> tuple[str, int, int] | None:
    """(kind, in, out) of a module a LoRA expert can target, as the expert's A/B shapes see it."""
    if isinstance(module, nn.Linear):
        return "linear", module.in_features, module.out_features
    if isinstance(module, nn.Embedding):
        return "embedding", module.num_embeddings, module.embedding_dim
    if isinstance(module, nn.Conv2d):
        return "conv2d", module.in_channels, module.out_channels
    weight = getattr(module, "weight", None)
    if type(module).__name__ == "Conv1D" and weight is not None:  # GPT-2 style: weight is [in, out]
        return "linear", weight.shape[0], weight.shape[1]
    return None


_LORA_MARKERS = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_embedding_A", "eA"),
    (".lora_embedding_B", "eB"),
)


def _split_lora_key(stem: str) -> tuple[str, str] | None:
    """``model.layers.0.q_proj.lora_A.weight`` -> (``model.layers.0.q_proj``, ``"A"``); None for other tensors."""
    for marker, axis in _LORA_MARKERS:
        if stem.endswith(marker):
            return stem[: -len(marker)], axis
    return None


_BASE_COPY = ".base_layer.weight"
"""peft's ``save_embedding_layers`` copy of a targeted embedding / lm_head weight: accepted when its shape fits."""


def _lora_modules(
    expert: ResolvedExpert, shapes: dict[str, list[int]], modules_of_model: dict[str, nn.Module]
) -> dict[str, dict[str, list[int]]]:
    """Module name (as the expert names it, peft's prefix stripped) -> {axis: shape} of its LoRA tensors.

    Any tensor that is not a LoRA factor (or peft's copy of a targeted layer's weight, of that layer's
    shape) is refused: peft would load it as something else or drop it.
    """
    modules: dict[str, dict[str, list[int]]] = {}
    others = []
    for key, shape in shapes.items():
        stem = key[len("base_model.model.") :] if key.startswith("base_model.model.") else key
        split = _split_lora_key(stem)
        if split is None:
            if stem.endswith(_BASE_COPY) and _is_base_copy(stem[: -len(_BASE_COPY)], shape, modules_of_model):
                continue
            others.append(key)
            continue
        module_name, axis = split
        modules.setdefault(module_name, {})[axis] = shape
    if others:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: {ADAPTER_WEIGHTS_NAME} holds tensors that are not LoRA factors "
            f"({short_repr(sorted(others)[:5])}{' ...' if len(others) > 5 else ''}); X-LoRA loads lora_A/lora_B "
            "only (no modules_to_save, no bias). Re-save the adapter without them."
        )
    return modules


def _is_base_copy(module_name: str, shape: list[int], modules: dict[str, nn.Module]) -> bool:
    """Whether a ``base_layer.weight`` tensor is a same-shape copy of a base model module's weight."""
    resolved = _resolve_module_name(module_name, modules)
    weight = getattr(modules[resolved], "weight", None) if resolved is not None else None
    return isinstance(weight, torch.Tensor) and list(weight.shape) == list(shape)


def _peft_lora_config(expert: ResolvedExpert, adapter: dict[str, Any]) -> Any:
    """peft's own LoraConfig of the expert, so target matching is exactly peft's."""
    from peft import PeftConfig

    try:
        return PeftConfig.from_peft_type(**adapter)
    except Exception as err:  # peft's config classes raise ValueError/TypeError for bad combinations
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: peft cannot read its {ADAPTER_CONFIG_NAME} ({short_repr(str(err), limit=300)})."
        ) from None


def _expected_rank(adapter: dict[str, Any], module_name: str) -> int:
    """The rank peft gives ``module_name``: its ``rank_pattern`` entry, else ``r`` (peft's own lookup)."""
    from peft.utils.other import get_pattern_key

    pattern = adapter.get("rank_pattern") or {}
    key = get_pattern_key(list(pattern), module_name)
    return int(pattern.get(key, adapter.get("r", 8)))


def _resolve_module_name(module_name: str, modules: dict[str, nn.Module]) -> str | None:
    """The base model's name for a module the expert names (peft strips/adds the top prefix for some models)."""
    if module_name in modules:
        return module_name
    matches = [n for n in modules if n.endswith("." + module_name) or module_name.endswith("." + n)]
    return matches[0] if len(matches) == 1 else None


def check_factor_dtypes(name: str, header: Mapping[str, tuple[list[int], str]]) -> None:
    """Refuse an expert whose weight file holds a tensor of a non-float dtype (it is not a set of LoRA factors)."""
    bad = sorted((key, dtype) for key, (_, dtype) in header.items() if dtype not in FLOAT_DTYPES)
    if bad:
        raise IncompatibleExpertError(
            f"Expert {name!r}: {ADAPTER_WEIGHTS_NAME} holds {len(bad)} tensor(s) of a non-float dtype "
            f"({short_repr(bad[:3])}); LoRA factors are F32, F16, BF16 or F64. Re-save the trained adapter with peft."
        )


def check_expert_matches_model(
    expert: ResolvedExpert, model: nn.Module, *, header: Mapping[str, tuple[list[int], str]] | None = None
) -> set[str]:
    """Check the expert against its own tensors and the base model, from the file header, before peft sees it.

    The tensors must be float LoRA factors of modules the base model has, each with both A and B, of the rank
    ``r`` (or ``rank_pattern``) says and the sizes of the module; the modules ``target_modules`` selects
    (peft's own matching) must be exactly the modules with tensors, and adaptable by LoRA. ``header`` is the
    weight file's header read remotely (:func:`xlora_hub.hub.pins.remote_tensor_header`), so a Hub expert is
    checked before its weights are downloaded; without it the local file's header is read. Returns the base
    model's names of the modules the expert adapts (they become X-LoRA layers).
    """
    adapter = read_adapter_config(expert)
    header = adapter_tensor_header(expert) if header is None else header
    check_factor_dtypes(expert.name, header)
    shapes = {key: list(shape) for key, (shape, _) in header.items()}
    if not shapes:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: {ADAPTER_WEIGHTS_NAME} holds no tensors, so the expert would do nothing. "
            "Re-save the trained adapter with peft."
        )
    modules = dict(model.named_modules())
    by_module: dict[str, dict[str, list[int]]] = {}
    for module_name, factors in _lora_modules(expert, shapes, modules).items():
        resolved = _resolve_module_name(module_name, modules)
        if resolved is None:
            raise IncompatibleExpertError(
                f"Expert {expert.name!r} targets module {module_name!r}, which this base model "
                f"({type(model).__name__}) does not have: it was trained on another architecture."
            )
        _check_factors(expert, adapter, module_name, modules[resolved], factors)
        by_module[resolved] = factors
    _check_targets(expert, adapter, model, modules, set(by_module))
    return set(by_module)


def _check_targets(
    expert: ResolvedExpert, adapter: dict[str, Any], model: nn.Module, modules: dict[str, nn.Module], trained: set[str]
) -> None:
    """The modules ``target_modules`` selects (peft's matcher) are adaptable and exactly the ``trained`` ones."""
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_config = _peft_lora_config(expert, adapter)
    # peft's own matcher; an excluded module comes back as a falsy marker
    targeted = [name for name in modules if name and check_target_module_exists(peft_config, name)]
    targets = short_repr(adapter.get("target_modules"))
    if not targeted:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: `target_modules` {targets} in {ADAPTER_CONFIG_NAME} matches no module of this "
            f"base model ({type(model).__name__}). Fix target_modules to name the modules its tensors adapt."
        )
    cannot = [n for n in targeted if _module_io(modules[n]) is None]
    if cannot:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: `target_modules` {targets} selects {cannot[0]!r} "
            f"({type(modules[cannot[0]]).__name__}) and {len(cannot) - 1} more module(s) LoRA cannot adapt; a regex "
            "that matches too much? Narrow target_modules to the modules its tensors adapt."
        )
    untrained = [n for n in targeted if n not in trained]
    if untrained:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: `target_modules` {targets} selects {len(untrained)} module(s) with no tensors "
            f"in {ADAPTER_WEIGHTS_NAME} ({short_repr(untrained[:3])}...); peft would give them untrained factors. "
            "Fix target_modules, or re-save the complete adapter."
        )
    outside = sorted(trained - set(targeted))
    if outside:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: {ADAPTER_WEIGHTS_NAME} holds tensors for module(s) outside `target_modules` "
            f"{targets}: {short_repr(outside[:5])}; peft would drop them without a word. Add them to target_modules "
            "or re-save the adapter."
        )


def warn_on_base_mismatch(experts: Iterable[ResolvedExpert], base: BaseModelRef | None) -> None:
    """Log a warning for each expert whose adapter config names another Hub base model than the mixture's.

    Its shapes fit (they were checked), so it loads; the warning only says it may not be what was intended.
    Local folders on either side are not compared: their paths say nothing about the model.
    """
    if base is None or not is_stored_hub_id(base.repo_id):
        return
    for expert in experts:
        trained_on = read_adapter_config(expert).get("base_model_name_or_path")
        if trained_on and is_stored_hub_id(trained_on) and trained_on != base.repo_id:
            logger.warning(
                "Expert %r was trained on %r but the mixture's base model is %r; its shapes fit, check it is intended.",
                expert.name,
                trained_on,
                base.repo_id,
            )


def _check_factors(
    expert: ResolvedExpert, adapter: dict[str, Any], module_name: str, module: nn.Module, factors: dict[str, list[int]]
) -> None:
    """One module's factors: both A and B, the configured rank, and the module's input/output sizes."""
    io = _module_io(module)
    if io is None:
        from ..quantization import supported_layers_text

        cls = type(module)
        raise IncompatibleExpertError(
            f"Expert {expert.name!r} targets {module_name!r}, a {cls.__module__}.{cls.__qualname__}, which "
            f"X-LoRA cannot mix. Supported: {supported_layers_text()}. A base quantized another way: load it "
            "with one of those quantizations, or unquantized."
        )
    pair = ("eA", "eB") if "eA" in factors or "eB" in factors else ("A", "B")
    names = {"A": "lora_A", "B": "lora_B", "eA": "lora_embedding_A", "eB": "lora_embedding_B"}
    missing = [names[axis] for axis in pair if axis not in factors]
    if missing or len(factors) != 2:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: module {module_name!r} has {sorted(names[a] for a in factors)} but no "
            f"{missing or 'matching pair'} in {ADAPTER_WEIGHTS_NAME}; the file is incomplete (an expert with only "
            "lora_A does nothing). Re-save the trained adapter with peft."
        )
    a_shape, b_shape = factors[pair[0]], factors[pair[1]]
    if len(a_shape) < 2 or len(b_shape) < 2:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: the factors of {module_name!r} have shapes {a_shape} and {b_shape}; LoRA "
            "factors are matrices."
        )
    rank = _expected_rank(adapter, module_name)
    if a_shape[0] != rank or b_shape[1] != rank:
        raise IncompatibleExpertError(
            f"Expert {expert.name!r}: `r` (or `rank_pattern`) in {ADAPTER_CONFIG_NAME} gives {module_name!r} rank "
            f"{rank}, but its tensors have shapes {a_shape} ({names[pair[0]]}) and {b_shape} ({names[pair[1]]}). "
            f"Set `r` to the tensors' rank ({a_shape[0]}), or re-save the adapter with peft."
        )
    _, fan_in, fan_out = io
    for axis, shape, expected, actual, side in (
        (pair[0], a_shape, fan_in, a_shape[1], "input"),
        (pair[1], b_shape, fan_out, b_shape[0], "output"),
    ):
        if expected != actual:
            raise IncompatibleExpertError(
                f"Expert {expert.name!r} does not fit this base model: {module_name}.{names[axis]} has shape {shape} "
                f"but module {module_name!r} has {side} size {expected}. "
                "It was trained on a model with another architecture or hidden size."
            )
