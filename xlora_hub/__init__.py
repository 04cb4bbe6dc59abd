"""xlora-hub: X-LoRA mixtures of LoRA experts as first-class citizens of the Hugging Face Hub.

The config and error classes are plain Python; everything that needs torch, transformers or peft is
imported on first use, so ``import xlora_hub`` (and ``xlora-hub --version``) stays fast.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .config import BaseModelRef, ExpertRef, XLoraConfig
from .errors import (
    DataFormatError,
    ExpertDigestError,
    ExpertNotFoundError,
    IncompatibleExpertError,
    InvalidConfigError,
    InvalidMixtureError,
    UnsupportedFormatError,
    XLoraHubError,
)

__version__ = "0.1.0"

_LAZY = {
    "XLoraModel": "model",
    "XLoraCache": "cache",
    "XLoraStaticCache": "cache",
    "XLoraClassifier": "classifier",
    "inspect_mixture": "hub",
    "MixtureSummary": "hub",
    "ExpertSummary": "hub",
    "load_mixture": "model",
    "train_classifier": "training",
    "XLoraTrainer": "training",
    "load_demo_mixture": "demo",
}

if TYPE_CHECKING:  # pragma: no cover
    from .cache import XLoraCache, XLoraStaticCache
    from .classifier import XLoraClassifier
    from .demo import load_demo_mixture
    from .hub import ExpertSummary, MixtureSummary, inspect_mixture
    from .model import XLoraModel, load_mixture
    from .training import XLoraTrainer, train_classifier


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))


__all__ = [
    "BaseModelRef",
    "DataFormatError",
    "ExpertDigestError",
    "ExpertNotFoundError",
    "ExpertRef",
    "ExpertSummary",
    "IncompatibleExpertError",
    "InvalidConfigError",
    "InvalidMixtureError",
    "MixtureSummary",
    "UnsupportedFormatError",
    "XLoraCache",
    "XLoraClassifier",
    "XLoraConfig",
    "XLoraHubError",
    "XLoraModel",
    "XLoraStaticCache",
    "XLoraTrainer",
    "__version__",
    "inspect_mixture",
    "load_demo_mixture",
    "load_mixture",
    "train_classifier",
]
