"""Moved to :mod:`xlora_hub.hub` (``hub.summary``); kept until callers move."""

from .hub.summary import ExpertSummary, MixtureSummary, inspect_mixture

__all__ = ["ExpertSummary", "MixtureSummary", "inspect_mixture"]
