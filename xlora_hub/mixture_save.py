"""Moved to :mod:`xlora_hub.hub` (``hub.save``); kept until callers move."""

from .hub.save import save_mixture, write_expert_files

__all__ = ["save_mixture", "write_expert_files"]
