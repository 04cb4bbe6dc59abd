"""Moved to :mod:`xlora_hub.hub` (``hub.save``); kept until callers move."""

from .hub.save import *  # noqa: F403
from .hub.save import __all__ as _all0

__all__ = _all0
