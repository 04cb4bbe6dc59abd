"""One redaction for every message that can carry a Hub token: errors, warnings, tracebacks.

A token reaches a message in more spellings than the one the user typed. ``--token "$(cat token.txt)"``
of a CRLF file gives ``hf_...\\r``; the HTTP client then refuses the header and prints its *repr*
(``Illegal header value b'Bearer hf_...\\r\\n'``), so looking for the raw token finds nothing. Every
spelling a message can hold is covered here: the token as given and stripped, its ``repr`` and bytes
``repr`` escapes, JSON escaping, percent-encoding (a token in a URL), whitespace folded as a one-line
message folds it, and anything after ``Bearer`` whatever token it is. Callers pass the tokens they were
given; the environment's and the ``hf auth login`` token are always added.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from urllib.parse import quote, quote_plus

REDACTED = "***"
"""What a secret is replaced with."""

_BEARER = re.compile(r"(?i)(\bbearer\s+)[^\s'\",;)\]}>]+")
_MIN_PIECE = 8  # a whitespace-separated piece of a token at least this long is a secret on its own


def secret_forms(secret: str) -> list[str]:
    """Every spelling of ``secret`` a message can hold, longest first (so no form leaves part of another)."""
    forms: set[str] = set()
    for base in {secret, secret.strip()}:
        if not base.strip():
            continue
        forms.update(
            {
                base,
                repr(base)[1:-1],
                json.dumps(base)[1:-1],
                json.dumps(base, ensure_ascii=False)[1:-1],
                repr(base.encode("utf-8", "backslashreplace"))[2:-1],
                quote(base, safe=""),
                quote_plus(base),
                " ".join(base.split()),
            }
        )
        forms.update(piece for piece in base.split() if len(piece) >= _MIN_PIECE)
    return sorted((form for form in forms if form.strip()), key=len, reverse=True)


def known_secrets(*given: str | bool | None) -> list[str]:
    """The tokens given (``str`` ones; ``True``/``None`` mean "the login token") plus the environment's
    ``HF_TOKEN`` / ``HUGGING_FACE_HUB_TOKEN`` and the stored login token, each once."""
    tokens = [t for t in given if isinstance(t, str)]
    tokens += [os.environ.get(name) or "" for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")]
    try:  # the login token file, read directly: `get_token()` may refresh or exchange tokens over the network
        from huggingface_hub import constants

        tokens.append(open(constants.HF_TOKEN_PATH, encoding="utf-8").read())
    except (OSError, ImportError, UnicodeDecodeError, AttributeError):
        pass
    return list(dict.fromkeys(t for t in tokens if t and t.strip()))


def redact(text: str, secrets: Iterable[str | bool | None] = ()) -> str:
    """``text`` with every form of every known secret (see :func:`known_secrets`) and every ``Bearer`` value
    replaced by ``***``."""
    forms = sorted({form for secret in known_secrets(*secrets) for form in secret_forms(secret)}, key=len, reverse=True)
    for form in forms:
        text = text.replace(form, REDACTED)
    return _BEARER.sub(lambda match: match.group(1) + REDACTED, text)


def redacted_traceback(err: BaseException, secrets: Iterable[str | bool | None] = ()) -> str:
    """``err``'s whole traceback (its causes included) with every secret redacted.

    Front ends print this instead of letting Python print the traceback: the HTTP client's exceptions in the
    chain can hold the token (as the repr of a header it refused)."""
    import traceback

    return redact("".join(traceback.format_exception(err)), secrets).rstrip()


__all__ = ["REDACTED", "known_secrets", "redact", "redacted_traceback", "secret_forms"]
