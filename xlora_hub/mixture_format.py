"""Moved to :mod:`xlora_hub.hub` (``hub.format``); kept until callers move."""

from .hub.format import *  # noqa: F403
from .hub.format import __all__ as _all0

__all__ = _all0
