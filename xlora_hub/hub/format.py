"""The mixture folder format (version 1, see ``docs/format.md``): names, checks and readers.

Everything here works from file headers and JSON, so a mixture can be validated before any model is
built or any weight is loaded.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from safetensors import safe_open

from ..config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME, FORMAT_VERSION, XLoraConfig
from ..config_checks import check_classifier_size
from ..errors import InvalidConfigError, InvalidMixtureError, UnsupportedFormatError, short_repr
from ..jsonfile import read_json_object
from .api import LIBRARY_NAME
from .experts import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, safe_relative_path

__all__ = [
    "CARD_TAGS",
    "EXPERTS_DIR",
    "EXPERT_FILES",
    "LIBRARY_NAME",
    "MODEL_CARD_NAME",
    "check_classifier_file",
    "classifier_metadata",
    "classifier_shapes",
    "expected_classifier_shapes",
    "read_classifier_header",
    "read_mixture_config",
    "settings_dict",
]

MODEL_CARD_NAME = "README.md"
EXPERTS_DIR = "experts"
CARD_TAGS = ("x-lora", "lora", "mixture-of-experts", "moe")
EXPERT_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)

# Settings shown in the card and the summary (everything in XLoraConfig but the structural fields).
_STRUCTURAL = {"experts", "base_model", "hidden_size", "layer_names"}


def settings_dict(config: XLoraConfig) -> dict[str, Any]:
    """The routing/classifier settings of a config (no experts, base model or layer names)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _STRUCTURAL}


def classifier_shapes(config: XLoraConfig, *, hidden_size: int, n_layers: int, n_experts: int) -> dict[str, list[int]]:
    """Tensor name -> shape of the classifier ``XLoraClassifier`` builds, by arithmetic (no module, no memory).

    The size is bounded first (:func:`~xlora_hub.config.check_classifier_size`), so the listing is at most
    ``2 * MAX_XLORA_DEPTH`` entries. Indices follow the ``nn.Sequential`` (Linear, ReLU, [Dropout]) per layer.
    """
    check_classifier_size(config, hidden_size=hidden_size, n_layers=n_layers, n_experts=n_experts)
    out_features = n_experts * n_layers if config.layerwise_scalings else n_experts
    per_hidden = 3 if config.xlora_dropout_p > 0.0 else 2
    shapes: dict[str, list[int]] = {}
    width = hidden_size
    for depth in range(config.xlora_depth - 1):
        index = depth * per_hidden
        shapes[f"layers.{index}.weight"] = [config.xlora_size, width]
        shapes[f"layers.{index}.bias"] = [config.xlora_size]
        width = config.xlora_size
    last = (config.xlora_depth - 1) * per_hidden
    shapes[f"layers.{last}.weight"] = [out_features, width]
    shapes[f"layers.{last}.bias"] = [out_features]
    return shapes


def expected_classifier_shapes(config: XLoraConfig) -> dict[str, list[int]]:
    """Tensor name -> shape of the classifier a saved config describes (nothing is built or allocated)."""
    if config.hidden_size is None or config.layer_names is None:
        raise InvalidMixtureError(
            "The mixture config has no `hidden_size` or `layer_names`; it was not written by `save_pretrained`. "
            "Rebuild the mixture with `XLoraModel.from_experts` and save it again."
        )
    return classifier_shapes(
        config, hidden_size=config.hidden_size, n_layers=len(config.layer_names), n_experts=config.n_experts
    )


def classifier_metadata(config: XLoraConfig) -> dict[str, str]:
    """safetensors metadata (strings only) that lets a loader check the classifier before building a model."""
    return {
        "format": "pt",
        "xlora_format_version": str(FORMAT_VERSION),
        "n_layers": str(len(config.layer_names or [])),
        "n_experts": str(config.n_experts),
        "hidden_size": str(config.hidden_size),
        "xlora_depth": str(config.xlora_depth),
        "xlora_size": str(config.xlora_size),
        "layerwise_scalings": json.dumps(config.layerwise_scalings),
        "expert_names": json.dumps(config.expert_names),
    }


def read_classifier_header(
    path: Path, *, what: str, max_tensors: int | None = None
) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Shapes and metadata of a safetensors file, from its header only; a clear error when it is unreadable.

    With ``max_tensors``, a file holding more tensors than that is refused from its key count alone, so the
    work is bounded by the config rather than by a stranger's header.
    """
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
            if max_tensors is not None and len(keys) > max_tensors:
                raise InvalidMixtureError(
                    f"{what}: {path.name} holds {len(keys):,d} tensors but {CONFIG_NAME} describes a classifier of "
                    f"{max_tensors}; the two files come from different mixtures. Save the mixture again."
                )
            shapes = {key: list(f.get_slice(key).get_shape()) for key in keys}
            metadata = dict(f.metadata() or {})
    except InvalidMixtureError:
        raise
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise InvalidMixtureError(
            f"{what}: {path.name} is not a readable safetensors file ({err}). It may be truncated or corrupt: "
            "download it again with `force_download=True`, or save the mixture again."
        ) from None
    return shapes, metadata


def check_classifier_file(path: Path, config: XLoraConfig, *, what: str) -> None:
    """Compare the classifier file's header (shapes and metadata) with the config before anything is built."""
    expected = expected_classifier_shapes(config)  # bounded by the config's limits before the file is read
    shapes, metadata = read_classifier_header(path, what=what, max_tensors=len(expected))
    facts = {
        "n_layers": len(config.layer_names or []),
        "n_experts": config.n_experts,
        "hidden_size": config.hidden_size,
    }
    for key, value in facts.items():
        if key in metadata and metadata[key] != str(value):
            raise InvalidMixtureError(
                f"{what}: the classifier was saved for {key}={metadata[key][:40]} but {CONFIG_NAME} says {value}; "
                "the two files come from different mixtures. Save the mixture again."
            )
    if shapes != expected:
        missing = sorted(set(expected) - set(shapes))
        extra = sorted(set(shapes) - set(expected))
        wrong = {k: (shapes[k], expected[k]) for k in expected if k in shapes and shapes[k] != expected[k]}
        detail = "; ".join(
            part
            for part in (
                f"missing {short_repr(missing)}" if missing else "",
                f"unexpected {short_repr(extra)}" if extra else "",
                ", ".join(f"{k} has shape {got}, expected {exp}" for k, (got, exp) in wrong.items()),
            )
            if part
        )
        raise InvalidMixtureError(
            f"{what}: {CLASSIFIER_WEIGHTS_NAME} does not match {CONFIG_NAME} ({detail}). The config describes "
            f"{config.n_experts} experts, {len(config.layer_names or [])} layers, hidden size {config.hidden_size}, "
            f"xlora_depth={config.xlora_depth}, layerwise_scalings={config.layerwise_scalings}."
        )


def read_mixture_config(path: Path, *, what: str) -> XLoraConfig:
    """Read and validate ``xlora_config.json``; every path inside it must stay inside the mixture."""
    data = read_json_object(path, what=f"{what}: {CONFIG_NAME}")
    if isinstance(data, dict) and "format_version" not in data and ("adapters" in data or "base_model_id" in data):
        raise UnsupportedFormatError(
            f"{what}: {CONFIG_NAME} is in the original `xlora` package / mistral.rs format, not xlora-hub's. "
            "Import it with `xlora_hub.convert.import_mixture(...)`."
        )
    config = XLoraConfig.from_dict(data, source=f"{what}: {CONFIG_NAME}")
    if config.hidden_size is None or config.layer_names is None:
        raise InvalidConfigError(
            f"{what}: {CONFIG_NAME} is missing `hidden_size` or `layer_names`, which `save_pretrained` always writes."
        )
    for name, ref in config.experts.items():
        if ref.path is not None:
            safe_relative_path(ref.path, what=f"{what}: expert {name!r} path")
        if ref.subfolder is not None:
            safe_relative_path(ref.subfolder, what=f"{what}: expert {name!r} subfolder")
    return config
