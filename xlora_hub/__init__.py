"""xlora-hub: X-LoRA mixtures of LoRA experts as first-class citizens of the Hugging Face Hub."""

from .cache import XLoraCache
from .classifier import XLoraClassifier
from .config import BaseModelRef, ExpertRef, XLoraConfig
from .errors import (
    DataFormatError,
    ExpertNotFoundError,
    IncompatibleExpertError,
    InvalidConfigError,
    InvalidMixtureError,
    UnsupportedFormatError,
    XLoraHubError,
)
from .hub import ExpertSummary, MixtureSummary, inspect_mixture
from .model import XLoraModel

__version__ = "0.1.0"

__all__ = [
    "BaseModelRef",
    "DataFormatError",
    "ExpertNotFoundError",
    "ExpertRef",
    "IncompatibleExpertError",
    "InvalidConfigError",
    "InvalidMixtureError",
    "UnsupportedFormatError",
    "XLoraCache",
    "XLoraClassifier",
    "XLoraConfig",
    "XLoraHubError",
    "XLoraModel",
    "ExpertSummary",
    "MixtureSummary",
    "inspect_mixture",
    "__version__",
]
