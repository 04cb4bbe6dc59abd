"""How a failed command ends: one line and exit 1 for a user error, the (redacted) traceback for a bug.

The wording comes from :func:`xlora_hub.error_messages.format_error`, which the Space uses too; this module
only adds the CLI's own words (its flags as the fix, a missing optional extra) and prints. An error that
``format_error`` does not recognise is a bug: its traceback is printed, with every secret redacted.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ..error_messages import MAX_ERROR_CHARS, ErrorHints, as_one_line, format_error
from ..redact import redact, redacted_traceback
from .options import EXIT_USAGE, EXIT_USER_ERROR, PROG, UsageError

__all__ = [
    "CLI_HINTS",
    "MAX_ERROR_CHARS",
    "OPTIONAL_PACKAGES",
    "error_line",
    "one_line",
    "print_traceback",
    "report_error",
]

CLI_HINTS = ErrorHints(
    token="pass --token, set HF_TOKEN or run `hf auth login`",
    revision="Give an existing branch, tag or commit with --revision.",
    offline=f"Run `{PROG} pull MIXTURE` while online first.",
    full_message="run with --debug to see all of it",
)
"""The CLI's flags, as the fix a Hub error message names."""

OPTIONAL_PACKAGES = frozenset({"gradio", "matplotlib", "datasets", "accelerate"})
"""Packages of the optional extras: a command that needs a missing one says which extra to install."""


def error_line(err: BaseException, *, secrets: Sequence[str | None] = ()) -> str | None:
    """The one-line message of a user error (redacted, capped), or ``None`` for a bug."""
    token = next((s for s in secrets if s), None)
    if isinstance(err, UsageError):
        line: str | None = as_one_line(str(err), token=token, hints=CLI_HINTS)
    elif isinstance(err, ImportError) and _optional_package(err):
        extra = "demo" if err.name in ("gradio", "matplotlib") else "train"
        text = f"{err}. This command needs an optional dependency: pip install 'xlora-hub[{extra}]'."
        line = as_one_line(text, token=token, hints=CLI_HINTS)
    else:
        line = format_error(err, token=token, hints=CLI_HINTS)
    return None if line is None else redact(line, secrets)


def _optional_package(err: ImportError) -> bool:
    """An ImportError is the user's only when an optional extra is missing; a broken import is a bug."""
    return (getattr(err, "name", None) or "").split(".")[0] in OPTIONAL_PACKAGES


def report_error(err: Exception, *, command: str, debug: bool, secrets: Sequence[str | None]) -> int:
    """Print ``err`` as the CLI shows it and return the exit status: 2 for bad usage, 1 otherwise.

    ``--debug`` prints the traceback of every error; without it a user error is one line
    ``xlora-hub COMMAND: error: ...`` and anything else (a bug) prints its traceback.
    """
    status = EXIT_USAGE if isinstance(err, UsageError) else EXIT_USER_ERROR
    line = None if debug else error_line(err, secrets=secrets)
    if line is None:
        print_traceback(err, secrets)
    else:
        print(f"{PROG} {command}: error: {line}", file=sys.stderr)
    return status


def print_traceback(err: BaseException, secrets: Sequence[str | None]) -> int:
    """Print ``err``'s whole traceback with every secret redacted (:func:`~xlora_hub.redact.redacted_traceback`);
    exit status 1."""
    print(redacted_traceback(err, secrets), file=sys.stderr)
    return EXIT_USER_ERROR


def one_line(err: BaseException, *, secrets: Sequence[str | None] = ()) -> str:
    """The error as one line: :func:`error_line`, or for an unrecognised error its own text, redacted."""
    line = error_line(err, secrets=secrets)
    if line is not None:
        return line
    return redact(as_one_line(redact(str(err), secrets), hints=CLI_HINTS), secrets) or type(err).__name__
