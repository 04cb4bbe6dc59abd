"""The mixture folder format (version 1, see ``docs/format.md``): names, checks and readers.

Everything here works from file headers and JSON, so a mixture can be validated before any model is
built or any weight is loaded.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from pathlib import Path
from typing import Any

from safetensors import safe_open

from .config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME, FORMAT_VERSION, XLoraConfig
from .errors import InvalidConfigError, InvalidMixtureError, UnsupportedFormatError
from .experts import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME, safe_relative_path

MODEL_CARD_NAME = "README.md"
EXPERTS_DIR = "experts"
LIBRARY_NAME = "xlora-hub"
CARD_TAGS = ("x-lora", "lora", "mixture-of-experts")
EXPERT_FILES = (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME)

# Settings shown in the card and the summary (everything in XLoraConfig but the structural fields).
_STRUCTURAL = {"experts", "base_model", "hidden_size", "layer_names"}
_BUNDLED_ATTR = "_xlora_hub_bundled_experts"
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


# ---------------------------------------------------------------------------------------------- helpers
def _is_hub_id(value: str | None) -> bool:
    """True for a string that names a Hub repo rather than a local folder."""
    return bool(value) and bool(_HUB_ID_RE.match(value)) and not os.path.exists(os.path.expanduser(value))


def settings_dict(config: XLoraConfig) -> dict[str, Any]:
    """The routing/classifier settings of a config (no experts, base model or layer names)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name not in _STRUCTURAL}


def expected_classifier_shapes(config: XLoraConfig) -> dict[str, list[int]]:
    """Tensor name -> shape of the classifier a config describes, built on the meta device (no memory, no weights)."""
    from .classifier import XLoraClassifier

    if config.hidden_size is None or config.layer_names is None:
        raise InvalidMixtureError(
            "The mixture config has no `hidden_size` or `layer_names`; it was not written by `save_pretrained`. "
            "Rebuild the mixture with `XLoraModel.from_experts` and save it again."
        )
    classifier = XLoraClassifier(
        config,
        hidden_size=config.hidden_size,
        n_layers=len(config.layer_names),
        n_experts=config.n_experts,
        device="meta",
    )
    return classifier.shapes()


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


def read_classifier_header(path: Path, *, what: str) -> tuple[dict[str, list[int]], dict[str, str]]:
    """Shapes and metadata of a safetensors file, from its header only; a clear error when it is unreadable."""
    try:
        with safe_open(str(path), framework="pt") as f:
            shapes = {key: list(f.get_slice(key).get_shape()) for key in f.keys()}
            metadata = dict(f.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for truncated/corrupt files
        raise InvalidMixtureError(
            f"{what}: {path.name} is not a readable safetensors file ({err}). It may be truncated or corrupt: "
            "download it again with `force_download=True`, or save the mixture again."
        ) from None
    return shapes, metadata


def check_classifier_file(path: Path, config: XLoraConfig, *, what: str) -> None:
    """Compare the classifier file's header (shapes and metadata) with the config before anything is built."""
    shapes, metadata = read_classifier_header(path, what=what)
    expected = expected_classifier_shapes(config)
    facts = {
        "n_layers": len(config.layer_names or []),
        "n_experts": config.n_experts,
        "hidden_size": config.hidden_size,
    }
    for key, value in facts.items():
        if key in metadata and metadata[key] != str(value):
            raise InvalidMixtureError(
                f"{what}: the classifier was saved for {key}={metadata[key]} but {CONFIG_NAME} says {value}; "
                "the two files come from different mixtures. Save the mixture again."
            )
    if shapes != expected:
        missing = sorted(set(expected) - set(shapes))
        extra = sorted(set(shapes) - set(expected))
        wrong = {k: (shapes[k], expected[k]) for k in expected if k in shapes and shapes[k] != expected[k]}
        detail = "; ".join(
            part
            for part in (
                f"missing {missing}" if missing else "",
                f"unexpected {extra}" if extra else "",
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
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise InvalidConfigError(f"{what}: {CONFIG_NAME} is not valid JSON ({err}).") from None
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
