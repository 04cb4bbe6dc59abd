"""The Hub client and its transport errors: one ``HfApi`` factory and one wording of "the Hub cannot be reached".

``huggingface_hub`` raises its own typed errors for HTTP answers; a dropped or refused connection instead comes
up from the HTTP client (``httpx``) as an exception that is not an ``OSError``. Every Hub call of this package
runs inside :func:`clear_connection_errors`, so such a failure reads the same wherever it happens.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Iterator
from typing import Any

__all__ = ["clear_connection_errors", "hub_api", "hub_connection_error", "hub_endpoint", "transport_errors"]


def hub_api(token: str | bool | None) -> Any:
    """An ``HfApi`` client for ``token`` (imported on first use, so the package imports without the network stack)."""
    from huggingface_hub import HfApi

    return HfApi(token=token)


def transport_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection-level errors (dropped or refused connections), which are not ``OSError``."""
    classes: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        try:
            classes.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def hub_endpoint() -> str:
    """The Hub URL requests go to (``HF_ENDPOINT``, read by ``huggingface_hub`` at import)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _connection_text(names: set[str], *, prefix: str, endpoint: str, detail: str, download: bool) -> str:
    """What went wrong and the fix, by the kind of transport error (its class names)."""
    if "LocalProtocolError" in names:
        return (
            f"{prefix}the request to the Hub at {endpoint} was refused by the HTTP client ({detail}). A token with "
            "spaces or line breaks (for example read from a file with Windows line endings) cannot be sent; check "
            "the token."
        )
    if names & {"ConnectError", "ConnectTimeout", "ProxyError"}:
        return (
            f"{prefix}the Hub at {endpoint} could not be reached ({detail}). Check the network connection and "
            "HF_ENDPOINT (unset it for huggingface.co)"
            + (
                "; to use files already in the cache, pass `local_files_only=True` (`--offline` for the CLI "
                "commands that take it)."
                if download
                else "."
            )
        )
    return (
        f"{prefix}the connection to the Hub at {endpoint} failed"
        + (" during the download" if download else "")
        + f" ({detail}). "
        + (
            "Nothing incomplete was kept in the cache; try again, or pass `local_files_only=True` to use cached files."
            if download
            else "Try again; check the network connection and HF_ENDPOINT."
        )
    )


def hub_connection_error(
    err: BaseException, *, what: str | None = None, token: str | bool | None = None, download: bool = True
) -> ConnectionError:
    """A transport error as a ``ConnectionError`` that names the endpoint, says what failed and how to fix it.

    The HTTP client's text is redacted (:func:`xlora_hub.redact.redact`): it can hold the token, for example as
    the repr of a header it refused.
    """
    from ..redact import redact

    detail = redact(" ".join(f"{type(err).__name__}: {err}".split()), [token])
    names = {cls.__name__ for cls in type(err).__mro__}
    prefix = f"{what}: " if what else ""
    return ConnectionError(
        _connection_text(names, prefix=prefix, endpoint=hub_endpoint(), detail=detail, download=download)
    )


@contextlib.contextmanager
def clear_connection_errors(what: str, *, token: str | bool | None = None, download: bool = True) -> Iterator[None]:
    """Turn a lost or refused connection into a ``ConnectionError`` that names what was being fetched (or
    pushed), the endpoint and the fix, with the token redacted. The client's exception is not chained: its
    text (redacted here) can hold the token."""
    try:
        yield
    except transport_errors() as err:
        raise hub_connection_error(err, what=what, token=token, download=download) from None
