"""Moved to :mod:`xlora_hub.hub` (``hub.experts``, ``hub.expert_checks``); kept until callers move."""

from .hub.expert_checks import *  # noqa: F403
from .hub.expert_checks import __all__ as _all1
from .hub.experts import *  # noqa: F403
from .hub.experts import __all__ as _all0

__all__ = _all0 + _all1
