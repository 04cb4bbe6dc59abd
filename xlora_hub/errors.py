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


class ExpertDigestError(XLoraHubError, ValueError):
    """An expert's downloaded weight file is not the one its mixture recorded (another sha256 or size)."""


class ExpertNotFoundError(XLoraHubError, FileNotFoundError):
    """A LoRA expert could not be found locally or on the Hub."""


class DataFormatError(XLoraHubError, ValueError):
    """A training data file or dataset does not have the expected shape."""


class MissingDependencyError(XLoraHubError, ImportError):
    """An optional dependency a feature needs is not installed; the message names the extra to install."""


def short_repr(value: object, *, limit: int = 200) -> str:
    """``repr(value)`` cut to ``limit`` characters, so an error never echoes a huge value (a 50 MB config field).

    Large strings, lists and dicts are shortened before ``repr`` is taken, so the cost stays small too.
    """
    if isinstance(value, str) and len(value) > limit:
        value = value[:limit]
    elif isinstance(value, (list, tuple)) and len(value) > limit:
        value = type(value)(value[:limit])
    elif isinstance(value, dict) and len(value) > limit:
        value = dict(list(value.items())[:limit])
    try:
        text = repr(value)
    except Exception:  # a hostile __repr__ must not hide the real error
        text = f"<{type(value).__name__}>"
    if len(text) > limit:
        text = text[:limit] + "...(cut)"
    return text
