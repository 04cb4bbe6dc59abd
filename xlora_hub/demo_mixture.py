"""Moved to :mod:`xlora_hub.demo`; kept until callers move (the CLI, the Space and ``xlora_hub.__init__``)."""

from __future__ import annotations

from .demo import *  # noqa: F403
from .demo import __all__  # noqa: F401
