"""The original ``xlora`` package / mistral.rs layout, in and out (for example ``lamm-mit/x-lora``).

``xlora_config.json`` without ``format_version`` (``adapters`` as a list or a dict, ``base_model_id``,
``use_bias``, ``enable_relu_and_dropout``...), classifier keys ``inner.*`` / ``last.*`` (often bfloat16), experts
in ``<name>/`` subfolders (or flat, as :mod:`.mistralrs` writes them). The layout writers here
(:func:`_original_config`, :func:`_original_classifier_state`) are shared with the mistral.rs export.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME
from ..errors import InvalidConfigError, InvalidMixtureError, UnsupportedFormatError
from .common import ForeignCheckpoint, foreign_config, load_classifier_tensors, read_json, shared_settings
from .detect import checkpoint_experts

if TYPE_CHECKING:
    from ..config import XLoraConfig

logger = logging.getLogger(__name__)

MISTRALRS_ORDERING_NAME = "ordering.json"
"""The mistral.rs ordering file (``order``, ``layers``, ``base_model_id``): written by
:func:`~xlora_hub.convert.mistralrs.export_mistralrs`, and what tells a mistral.rs folder from the original's."""

_ORIGINAL_KEY = re.compile(r"^(?:inner\.(\d+)|last)\.(weight|bias)$")

ORIGIN_XLORA = "xlora"
"""A file written by the original ``xlora`` package (EricLBuehler/xlora 0.1.0, ``xLoRAConfig``)."""
ORIGIN_MISTRALRS = "mistralrs"
"""A file written for mistral.rs (its folder holds ``ordering.json``; mistral.rs' ``XLoraConfig`` serde defaults)."""

_COMMON_DEFAULTS: dict[str, Any] = {
    "enable_softmax": True,
    "enable_softmax_topk": False,
    "layerwise_scalings": False,
    "xlora_depth": 1,
    "xlora_size": 2048,
    "use_bias": True,
    "xlora_dropout_p": 0.2,
    "use_trainable_adapters": False,
    "softmax_temperature": 1.0,
    "top_k_lora": None,
    "scaling_pass_value": 0.0,
    "global_scaling_weight": 1.0,
}
FIELD_DEFAULTS: dict[str, dict[str, Any]] = {
    ORIGIN_XLORA: {**_COMMON_DEFAULTS, "enable_relu_and_dropout": True},
    ORIGIN_MISTRALRS: {**_COMMON_DEFAULTS, "enable_relu_and_dropout": False},
}
"""The defaults of the fields a file may omit, by the format that wrote it: the original package's
``xLoRAConfig`` (xlora_config.py at 8217992) and mistral.rs' ``XLoraConfig`` (``mistralrs-core/src/xlora_models/
config.rs``). They differ in ``enable_relu_and_dropout`` only."""

_ORIGINAL_MODULES_PER_INNER = 3
"""The original package's ``inner`` ModuleList holds Linear, ReLU, Dropout per inner layer (its state-dict keys
count all three: ``inner.0``, ``inner.3``...); mistral.rs counts the Linear layers only (``inner.0``, ``inner.1``)."""


def origin_name(origin: str) -> str:
    """The format as people name it, for messages."""
    return "mistral.rs" if origin == ORIGIN_MISTRALRS else "the original xlora package"


# ---------------------------------------------------------------------------------------------- reading
def _classifier_layers(state: dict[str, torch.Tensor], *, what: str) -> list[dict[str, torch.Tensor]]:
    """The ``inner.N.*`` / ``last.*`` tensors as linear layers in order (``{"weight": ..., "bias": ...}``)."""
    inner: dict[int, dict[str, torch.Tensor]] = {}
    last: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        match = _ORIGINAL_KEY.match(key)
        if match is None:
            raise UnsupportedFormatError(
                f"{what}: unexpected classifier tensor {key!r} (expected inner.N.* and last.*)."
            )
        (inner.setdefault(int(match.group(1)), {}) if match.group(1) is not None else last)[match.group(2)] = value
    if "weight" not in last:
        raise InvalidMixtureError(f"{what}: {CLASSIFIER_WEIGHTS_NAME} has no `last.weight`.")
    layers = [inner[i] for i in sorted(inner)] + [last]
    if any("weight" not in layer for layer in layers):
        raise InvalidMixtureError(f"{what}: an inner classifier layer has a bias but no weight.")
    return layers


def checkpoint_origin(folder: Path) -> str:
    """Who wrote an ``xlora_config.json`` without ``format_version``, which decides the defaults of missing fields:
    ``"mistralrs"`` when the folder holds mistral.rs' ordering file (``ordering.json``, which mistral.rs needs and
    :func:`export_mistralrs` writes), else ``"xlora"`` (the original package, whose ``save_pretrained`` writes
    every field but no ordering file)."""
    return ORIGIN_MISTRALRS if (folder / MISTRALRS_ORDERING_NAME).is_file() else ORIGIN_XLORA


def with_defaults(raw: Mapping[str, Any], origin: str) -> dict[str, Any]:
    """The config with its missing fields at the defaults of the format it came from (:data:`FIELD_DEFAULTS`)."""
    return {**FIELD_DEFAULTS[origin], **raw}


def _check_depth(raw: dict[str, Any], depth: int, *, origin: str, what: str) -> None:
    """The config's depth against the file's, and a ReLU between layers (the only deep classifier we can hold)."""
    if "xlora_depth" in raw and raw["xlora_depth"] != depth:
        raise InvalidMixtureError(
            f"{what}: xlora_depth is {raw['xlora_depth']} but {CLASSIFIER_WEIGHTS_NAME} has {depth} linear layers."
        )
    if depth > 1 and not with_defaults(raw, origin)["enable_relu_and_dropout"]:
        missing = "" if "enable_relu_and_dropout" in raw else f" (missing: {origin_name(origin)}'s default)"
        raise UnsupportedFormatError(
            f"{what}: a classifier of depth {depth} without ReLU (enable_relu_and_dropout=false{missing}) has no "
            "equivalent in xlora-hub or peft, whose classifiers put a ReLU between linear layers."
        )
    if "hidden_size" not in raw:
        raise InvalidConfigError(f"{what}: {CONFIG_NAME} has no `hidden_size`.")


def _check_softmax_topk(raw: Mapping[str, Any], *, accept: bool, what: str) -> None:
    """``enable_softmax_topk`` is another function in the original than in xlora-hub: refused unless accepted."""
    if raw["enable_softmax_topk"] and not accept:
        raise UnsupportedFormatError(
            f"{what}: enable_softmax_topk=true. The original xlora package applies this softmax over the kept "
            "scalings of the whole batch at once (every token and sequence together); xlora-hub and peft apply it "
            "per token, a different function, so the imported mixture gives other outputs. Pass "
            "accept_softmax_topk_change=True (CLI: --accept-softmax-topk-change) to import it with the per-token "
            "softmax; the import then warns with the largest logit change on a sample batch."
        )


def read_original(
    folder: Path, adapters: Any, *, from_hub: bool = False, accept_softmax_topk_change: bool = False
) -> ForeignCheckpoint:
    """An original xlora checkpoint folder; ``adapters`` (the caller's) overrides the experts' recorded locations.
    Missing fields take the defaults of the format that wrote the file (:func:`checkpoint_origin`)."""
    what = f"xlora checkpoint {folder}"
    raw = read_json(folder / CONFIG_NAME, what=what)
    origin = checkpoint_origin(folder)
    full = with_defaults(raw, origin)
    if raw.get("use_mean_pool"):
        raise UnsupportedFormatError(
            f"{what}: use_mean_pool=true routes whole sequences, not tokens; xlora-hub cannot represent it."
        )
    layers = _classifier_layers(load_classifier_tensors(folder / CLASSIFIER_WEIGHTS_NAME, what=what), what=what)
    depth = len(layers)
    _check_depth(raw, depth, origin=origin, what=what)
    _check_softmax_topk(full, accept=accept_softmax_topk_change, what=what)
    experts = checkpoint_experts(raw, adapters, folder, what=what, subfolders=True, from_hub=from_hub)
    settings = shared_settings(full)
    settings["xlora_depth"] = depth
    if depth > 1:
        settings["xlora_size"] = int(layers[0]["weight"].shape[0])
    if settings.get("scaling_pass_value") is None:
        settings["scaling_pass_value"] = 0.0  # both formats' default (their files hold a number)
    config = foreign_config(raw, experts, base_model=raw.get("base_model_id"), settings=settings, what=what)
    linears = [(layer["weight"], layer.get("bias")) for layer in layers]
    if full["use_bias"] and any(b is None for _, b in linears):
        raise InvalidMixtureError(f"{what}: use_bias is true but {CLASSIFIER_WEIGHTS_NAME} lacks a bias tensor.")
    return ForeignCheckpoint(config, linears, what)


# ---------------------------------------------------------------------------------------------- writing
def _original_config(
    config: XLoraConfig,
    order: list[str],
    base_model_id: str,
    *,
    layout: str = ORIGIN_MISTRALRS,
    use_bias: bool = True,
) -> dict[str, Any]:
    """The layout's ``xlora_config.json``, every field of the original ``xLoRAConfig`` explicit, in its order.

    ``layout="mistralrs"``: ``adapters`` as ``{name: name}``, no top-k (mistral.rs has none). ``layout="xlora"``:
    what the original's ``save_pretrained`` writes (``adapters`` as the list of names; ``top_k_lora`` and
    ``enable_softmax_topk`` as set). ``use_trainable_adapters`` is false in both: the experts' trained factors
    are in their folders, and the original's ``from_pretrained`` cannot load ``true`` from a list of names.
    """
    original = layout == ORIGIN_XLORA
    return {
        "hidden_size": config.hidden_size,
        "base_model_id": base_model_id,
        "adapters": list(order) if original else {name: name for name in order},
        "enable_softmax": config.enable_softmax,
        "enable_softmax_topk": config.enable_softmax_topk if original else False,
        "layerwise_scalings": config.layerwise_scalings,
        "xlora_depth": config.xlora_depth,
        "xlora_size": config.xlora_size,
        "enable_relu_and_dropout": True,
        "use_bias": use_bias,
        "xlora_dropout_p": config.xlora_dropout_p,
        "use_trainable_adapters": False,
        "softmax_temperature": config.softmax_temperature,
        "top_k_lora": config.top_k_lora if original else None,
        "scaling_pass_value": config.resolved_scaling_pass_value(),
        "global_scaling_weight": config.global_scaling_weight,
    }


def _original_classifier_state(
    classifier: nn.Module, *, naming: str = "linear", use_bias: bool = True
) -> dict[str, torch.Tensor]:
    """Our classifier's linear layers under the original keys: ``inner.N.*``, the last one ``last.*``.

    ``naming="linear"`` numbers ``inner`` by Linear layer (mistral.rs: ``inner.0``, ``inner.1``);
    ``naming="module"`` by module position as the original package does (ReLU and Dropout counted: ``inner.0``,
    ``inner.3``), which its strict loader needs. ``use_bias=False`` leaves the biases out (``use_bias: false``).
    """
    if naming not in ("linear", "module"):
        raise ValueError(f"naming must be 'linear' or 'module', got {naming!r}.")
    step = _ORIGINAL_MODULES_PER_INNER if naming == "module" else 1
    linears = [m for m in classifier.layers if isinstance(m, nn.Linear)]
    state: dict[str, torch.Tensor] = {}
    for i, linear in enumerate(linears):
        prefix = "last" if i == len(linears) - 1 else f"inner.{i * step}"
        state[f"{prefix}.weight"] = linear.weight
        if use_bias:
            state[f"{prefix}.bias"] = linear.bias
    return state
