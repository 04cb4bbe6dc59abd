"""The Hub client and its transport errors: one ``HfApi`` factory and one wording of "the Hub cannot be reached".

``huggingface_hub`` raises its own typed errors for HTTP answers; a dropped or refused connection instead comes
up from the HTTP client (``httpx``) as an exception that is not an ``OSError``. Every Hub call of this package
runs inside :func:`clear_connection_errors`, so such a failure reads the same wherever it happens.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

from ..error_messages import connection_message, transport_error_types

__all__ = [
    "LIBRARY_NAME",
    "clear_connection_errors",
    "client_identity",
    "hub_api",
    "hub_connection_error",
    "hub_endpoint",
    "transport_errors",
]

LIBRARY_NAME = "xlora-hub"
"""The library name the Hub sees in this package's user agent and in its model cards' ``library_name``."""


def client_identity() -> dict[str, str]:
    """``library_name`` / ``library_version`` for every ``HfApi`` and download call, so the Hub's user agent
    names xlora-hub (the Hub counts and routes requests by it). The version is the installed package's."""
    return {"library_name": LIBRARY_NAME, "library_version": _release()}


@functools.lru_cache(maxsize=1)
def _release() -> str:
    """The installed package's version, read once (the package metadata does not change while it runs)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(LIBRARY_NAME)
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def hub_api(token: str | bool | None) -> Any:
    """An ``HfApi`` client for ``token`` that names xlora-hub in its user agent (imported on first use, so the
    package imports without the network stack)."""
    from huggingface_hub import HfApi

    return HfApi(token=token, **client_identity())


def transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection-level errors (dropped or refused connections), which are not ``OSError``."""
    return transport_error_types()


def hub_endpoint() -> str:
    """The Hub URL requests go to (``HF_ENDPOINT``, read by ``huggingface_hub`` at import)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_connection_error(
    err: BaseException, *, what: str | None = None, token: str | bool | None = None, download: bool = True
) -> ConnectionError:
    """A transport error as a ``ConnectionError`` worded by :func:`xlora_hub.error_messages.connection_message`:
    the endpoint, what failed and how to fix it, the HTTP client's text redacted (it can hold the token)."""
    return ConnectionError(connection_message(err, what=what, token=token, download=download))


@contextlib.contextmanager
def clear_connection_errors(what: str, *, token: str | bool | None = None, download: bool = True) -> Iterator[None]:
    """Turn a lost or refused connection into a ``ConnectionError`` that names what was being fetched (or
    pushed), the endpoint and the fix, with the token redacted. The client's exception is not chained: its
    text (redacted here) can hold the token."""
    try:
        yield
    except transport_errors() as err:
        raise hub_connection_error(err, what=what, token=token, download=download) from None
