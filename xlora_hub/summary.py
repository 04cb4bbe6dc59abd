"""Moved to :mod:`xlora_hub.hub` (``hub.summary``); kept until callers move."""

from .hub.summary import *  # noqa: F403
from .hub.summary import __all__ as _all0

__all__ = _all0
