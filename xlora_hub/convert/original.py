"""The original ``xlora`` package / mistral.rs layout, in and out (for example ``lamm-mit/x-lora``).

``xlora_config.json`` without ``format_version`` (``adapters`` as a list or a dict, ``base_model_id``,
``use_bias``, ``enable_relu_and_dropout``...), classifier keys ``inner.*`` / ``last.*`` (often bfloat16), experts
in ``<name>/`` subfolders (or flat, as :mod:`.mistralrs` writes them). The layout writers here
(:func:`_original_config`, :func:`_original_classifier_state`) are shared with the mistral.rs export.
"""

from __future__ import annotations

import logging
import re
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

_ORIGINAL_KEY = re.compile(r"^(?:inner\.(\d+)|last)\.(weight|bias)$")


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


def _check_depth(raw: dict[str, Any], depth: int, *, what: str) -> None:
    """The config's depth against the file's, and a ReLU between layers (the only deep classifier we can hold)."""
    if "xlora_depth" in raw and raw["xlora_depth"] != depth:
        raise InvalidMixtureError(
            f"{what}: xlora_depth is {raw['xlora_depth']} but {CLASSIFIER_WEIGHTS_NAME} has {depth} linear layers."
        )
    if depth > 1 and not raw.get("enable_relu_and_dropout", False):
        raise UnsupportedFormatError(
            f"{what}: a classifier of depth {depth} without ReLU (enable_relu_and_dropout=false) has no equivalent in "
            "xlora-hub or peft, whose classifiers put a ReLU between linear layers."
        )
    if "hidden_size" not in raw:
        raise InvalidConfigError(f"{what}: {CONFIG_NAME} has no `hidden_size`.")


def read_original(folder: Path, adapters: Any, *, from_hub: bool = False) -> ForeignCheckpoint:
    """An original xlora checkpoint folder; ``adapters`` (the caller's) overrides the experts' recorded locations."""
    what = f"xlora checkpoint {folder}"
    raw = read_json(folder / CONFIG_NAME, what=what)
    if raw.get("use_mean_pool"):
        raise UnsupportedFormatError(
            f"{what}: use_mean_pool=true routes whole sequences, not tokens; xlora-hub cannot represent it."
        )
    layers = _classifier_layers(load_classifier_tensors(folder / CLASSIFIER_WEIGHTS_NAME, what=what), what=what)
    depth = len(layers)
    _check_depth(raw, depth, what=what)
    experts = checkpoint_experts(raw, adapters, folder, what=what, subfolders=True, from_hub=from_hub)
    settings = shared_settings(raw)
    settings["xlora_depth"] = depth
    if depth > 1:
        settings["xlora_size"] = int(layers[0]["weight"].shape[0])
    if settings.get("scaling_pass_value") is None:
        settings["scaling_pass_value"] = 0.0  # mistral.rs' default when it is missing
    config = foreign_config(raw, experts, base_model=raw.get("base_model_id"), settings=settings, what=what)
    linears = [(layer["weight"], layer.get("bias")) for layer in layers]
    if raw.get("use_bias", True) and any(b is None for _, b in linears):
        raise InvalidMixtureError(f"{what}: use_bias is true but {CLASSIFIER_WEIGHTS_NAME} lacks a bias tensor.")
    return ForeignCheckpoint(config, linears, what)


# ---------------------------------------------------------------------------------------------- writing
def _original_config(config: XLoraConfig, order: list[str], base_model_id: str) -> dict[str, Any]:
    """The original package's ``xlora_config.json`` (``base_model_id`` and ``enable_relu_and_dropout`` explicit)."""
    return {
        "hidden_size": config.hidden_size,
        "base_model_id": base_model_id,
        "adapters": {name: name for name in order},
        "layerwise_scalings": config.layerwise_scalings,
        "enable_relu_and_dropout": True,
        "use_bias": True,
        "xlora_depth": config.xlora_depth,
        "xlora_size": config.xlora_size,
        "xlora_dropout_p": config.xlora_dropout_p,
        "enable_softmax": config.enable_softmax,
        "softmax_temperature": config.softmax_temperature,
        "scaling_pass_value": config.resolved_scaling_pass_value(),
        "use_trainable_adapters": False,
        "global_scaling_weight": config.global_scaling_weight,
        "top_k_lora": None,
        "enable_softmax_topk": False,
    }


def _original_classifier_state(classifier: nn.Module) -> dict[str, torch.Tensor]:
    """Our classifier's linear layers under the original keys: ``inner.N.*``, the last one ``last.*``."""
    linears = [m for m in classifier.layers if isinstance(m, nn.Linear)]
    state: dict[str, torch.Tensor] = {}
    for i, linear in enumerate(linears):
        prefix = "last" if i == len(linears) - 1 else f"inner.{i}"
        state[f"{prefix}.weight"] = linear.weight
        state[f"{prefix}.bias"] = linear.bias
    return state
