"""Moved to :mod:`xlora_hub.hub` (``hub.card``); kept until callers move."""

from .hub.card import *  # noqa: F403
from .hub.card import __all__ as _all0

__all__ = _all0
