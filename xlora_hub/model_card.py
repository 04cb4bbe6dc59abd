"""Moved to :mod:`xlora_hub.hub` (``hub.card``); kept until callers move."""

from .hub.card import make_model_card

__all__ = ["make_model_card"]
