"""Moved to :mod:`xlora_hub.hub` (``hub.experts``, ``hub.expert_checks``); kept until callers move."""

from .hub.expert_checks import adapter_tensor_shapes, check_expert_matches_model, read_adapter_config
from .hub.experts import (
    ADAPTER_CONFIG_NAME,
    ADAPTER_WEIGHTS_NAME,
    PICKLE_WEIGHTS_NAME,
    ResolvedExpert,
    cached_commit_sha,
    resolve_expert,
    safe_relative_path,
)

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "PICKLE_WEIGHTS_NAME",
    "ResolvedExpert",
    "adapter_tensor_shapes",
    "cached_commit_sha",
    "check_expert_matches_model",
    "read_adapter_config",
    "resolve_expert",
    "safe_relative_path",
]
