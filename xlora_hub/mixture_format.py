"""Moved to :mod:`xlora_hub.hub` (``hub.format``); kept until callers move."""

from .hub.format import (
    CARD_TAGS,
    EXPERT_FILES,
    EXPERTS_DIR,
    LIBRARY_NAME,
    MODEL_CARD_NAME,
    check_classifier_file,
    classifier_metadata,
    classifier_shapes,
    expected_classifier_shapes,
    read_classifier_header,
    read_mixture_config,
    settings_dict,
)

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
