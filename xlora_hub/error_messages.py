"""TEMPORARY stub of ``xlora_hub.error_messages`` (R2 replaces it at merge; do not extend it).

Only what the Space needs to run on this branch: ``format_error(err, *, token=None) -> str | None``, a
one-line, redacted message for the project's own errors, the Hub client's errors and missing files, and
``None`` for anything else (a bug, which keeps its traceback).
"""

from __future__ import annotations

MAX_CHARS = 2000


def format_error(err: BaseException, *, token: str | None = None) -> str | None:
    """One redacted line for a user's error; ``None`` for anything else (a bug)."""
    from huggingface_hub.errors import (
        HfHubHTTPError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
    )

    from .errors import XLoraHubError
    from .redact import redact

    if not isinstance(
        err, (XLoraHubError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError, OSError, ValueError)
    ):
        return None
    lines = [line.strip() for line in redact(str(err), [token]).splitlines() if line.strip()]
    if isinstance(err, RepositoryNotFoundError) and lines:
        lines = lines[:1]  # the first line names the repo; the rest is the request id and advice
    return (" ".join(" ".join(lines).split()) or type(err).__name__)[:MAX_CHARS]
