"""Named exceptions a caller can catch, in the style of ``huggingface_hub.errors``.

Every message names the file, expert or field at fault and says how to fix it.
They subclass ``ValueError`` (or ``FileNotFoundError``) so code written against
plain Python errors keeps working.
"""

from __future__ import annotations


class XLoraHubError(Exception):
    """Base class of every error raised on purpose by xlora-hub."""


class InvalidConfigError(XLoraHubError, ValueError):
    """An X-LoRA configuration has a wrong value, a wrong type or a missing field."""


class InvalidMixtureError(XLoraHubError, ValueError):
    """A saved mixture (folder or Hub repo) is malformed or does not match the model it is loaded on."""


class UnsupportedFormatError(InvalidMixtureError):
    """A mixture or checkpoint uses a format (or format version) this release cannot read."""


class IncompatibleExpertError(XLoraHubError, ValueError):
    """A LoRA expert cannot be used in this mixture (DoRA, another architecture, another hidden size...)."""


class ExpertNotFoundError(XLoraHubError, FileNotFoundError):
    """A LoRA expert could not be found locally or on the Hub."""


class DataFormatError(XLoraHubError, ValueError):
    """A training data file or dataset does not have the expected shape."""
