"""The one JSON reader of xlora-hub: every JSON file the library reads (mixture and adapter configs, foreign
formats' configs, the demo's build info) goes through :func:`read_json_object`.

A JSON file may come from a stranger's repo, so it is read with bounds: a size cap (checked before reading),
a nesting-depth cap (no bare ``RecursionError``), finite numbers only (no ``NaN``/``Infinity``/``1e400``) and a
JSON object at the top. Every failure is an :class:`~xlora_hub.errors.InvalidConfigError` naming the file.
Plain Python, no torch.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from .errors import InvalidConfigError, short_repr

MAX_JSON_BYTES = 16 * 1024 * 1024
"""Largest JSON file read (16 MiB): a mixture or adapter config is a few KB."""

MAX_JSON_DEPTH = 32
"""Deepest nesting of objects/arrays accepted: the formats read here nest 3 levels."""


class _JsonRefused(ValueError):
    """Raised inside the parser for a value xlora-hub does not accept (non-finite number)."""


def _refuse_constant(name: str) -> Any:
    raise _JsonRefused(f"the non-finite number {name} is not allowed")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise _JsonRefused(f"the number {short_repr(text, limit=40)} is too large (not a finite float)")
    return value


def _depth(data: Any, *, limit: int) -> int:
    """Nesting depth of parsed JSON, walked without recursion; stops once ``limit`` is passed."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if not isinstance(value, (dict, list)):
            continue
        deepest = max(deepest, depth)
        if deepest > limit:
            return deepest
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return deepest


def parse_json_object(text: str, *, what: str, max_depth: int = MAX_JSON_DEPTH, fix: str = "") -> dict[str, Any]:
    """Parse JSON text that must hold one object; ``what`` names the file in errors, ``fix`` is appended."""
    hint = f" {fix}" if fix else ""
    try:
        data = json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RecursionError:
        raise InvalidConfigError(
            f"{what}: nested deeper than {max_depth} levels; it is not a config xlora-hub reads.{hint}"
        ) from None
    except _JsonRefused as err:
        raise InvalidConfigError(f"{what}: {err}; only finite numbers are allowed.{hint}") from None
    except ValueError as err:  # JSONDecodeError, and int() of a number with too many digits
        raise InvalidConfigError(f"{what}: not valid JSON ({short_repr(str(err), limit=200)}).{hint}") from None
    if not isinstance(data, dict):
        raise InvalidConfigError(f"{what}: must hold a JSON object, got {type(data).__name__}.{hint}")
    if _depth(data, limit=max_depth) > max_depth:
        raise InvalidConfigError(
            f"{what}: nested deeper than {max_depth} levels; it is not a config xlora-hub reads.{hint}"
        )
    return data


def read_json_object(
    path: str | os.PathLike[str],
    *,
    what: str | None = None,
    max_bytes: int = MAX_JSON_BYTES,
    max_depth: int = MAX_JSON_DEPTH,
    fix: str = "",
) -> dict[str, Any]:
    """Read a JSON file that must hold one object, with a size cap checked before reading and a depth cap.

    ``what`` names the file in errors (default: its path); ``fix`` is a hint appended to every error.
    """
    path = Path(path)
    what = what or str(path)
    hint = f" {fix}" if fix else ""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > max_bytes:
                raise InvalidConfigError(
                    f"{what}: {size:,d} bytes, larger than the {max_bytes:,d} bytes a config may have.{hint}"
                )
            raw = f.read(max_bytes + 1)
    except OSError as err:
        raise InvalidConfigError(f"{what}: cannot be read ({err.strerror or err}).{hint}") from None
    if len(raw) > max_bytes:  # grew while read, or not a regular file
        raise InvalidConfigError(f"{what}: larger than the {max_bytes:,d} bytes a config may have.{hint}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InvalidConfigError(f"{what}: not UTF-8 text ({err.reason} at byte {err.start}).{hint}") from None
    return parse_json_object(text, what=what, max_depth=max_depth, fix=fix)


__all__ = ["MAX_JSON_BYTES", "MAX_JSON_DEPTH", "parse_json_object", "read_json_object"]
