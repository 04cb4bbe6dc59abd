"""The one wording of an error for a person: one line, redacted, capped; ``None`` when the error is a bug.

The CLI and the Space both show errors to people. What they show comes from here, so the two cannot word
the same failure differently, and so the line between "the input or the network is wrong" (one clear line)
and "xlora-hub has a bug" (the traceback) is drawn once. Recognised, in this order:

* the project's own errors (:class:`~xlora_hub.errors.XLoraHubError`): their message already names the
  thing at fault and the fix;
* ``huggingface_hub``'s errors, read through their typed fields (``repo_id``, ``response.status_code``,
  ``server_message``, ``request_id``, the request URL parsed segment by segment), never through their text;
* the HTTP client's transport errors and ``ConnectionError`` (the Hub cannot be reached);
* missing files (``FileNotFoundError``);
* any other error raised *from* a Hub error (``transformers`` wraps the Hub's errors in ``OSError``): worded
  as that Hub error.

Everything else (a ``TypeError``, a ``ZeroDivisionError``, a bare ``ValueError``...) gives ``None``: the caller
shows the traceback. Every message goes through :func:`xlora_hub.redact.redact`, so a token never reaches
the screen, and is cut to :data:`MAX_ERROR_CHARS` (a config value can be megabytes long).

A front end names its own fixes with :class:`ErrorHints` and reads what a Hub error was about with
:func:`hub_request`::

    line = format_error(err, token=token, hints=ErrorHints(token="set HF_TOKEN in the Space's secrets"))
    if line is None:
        raise  # a bug: let the traceback show
    about_the_mixture = hub_request(err).repo_id == mixture_repo_id
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any
from urllib.parse import unquote, urlsplit

from .errors import XLoraHubError
from .redact import redact
from .refs import hub_url

__all__ = [
    "MAX_ERROR_CHARS",
    "ErrorHints",
    "HubRequest",
    "as_one_line",
    "connection_message",
    "format_error",
    "hub_request",
    "transport_error_types",
]

MAX_ERROR_CHARS = 2000
"""The longest message :func:`format_error` returns; a longer one is cut, saying so."""

_MAX_CAUSES = 8  # how far down a chain of ``raise ... from err`` a Hub error is looked for
_API_SUBPATHS = frozenset(
    "resolve tree blob raw refs commit commits discussions settings revision paths-info preupload".split()
)
"""Path segments that follow a repo id in Hub API URLs (so they are never read as the repo's name)."""


@dataclass(frozen=True)
class ErrorHints:
    """How one front end tells a person to fix a Hub error: its own option names.

    The defaults are the library's words; the CLI passes its flags (``--token``, ``--revision``, ``--debug``),
    the Space its environment variables.
    """

    token: str = "pass a token that can read it (`token=`, HF_TOKEN or `hf auth login`)"
    revision: str = "Give an existing branch, tag or commit."
    offline: str = "Download it while online first (`xlora-hub pull MIXTURE`)."
    full_message: str = ""


@dataclass(frozen=True)
class HubRequest:
    """What a Hub HTTP error was about: read from the error's attributes and its request URL, never its text.

    ``repo_id`` comes from the error (``huggingface_hub`` sets it) or else from the URL's path segments
    (``/api/models/{repo}/...``, ``/{repo}/resolve/{revision}/{filename}``, ``/datasets/{repo}/...``).
    """

    status_code: int | None = None
    method: str | None = None
    url: str | None = None
    repo_id: str | None = None
    repo_type: str | None = None
    revision: str | None = None
    filename: str | None = None
    server_message: str | None = None
    request_id: str | None = None

    @property
    def status(self) -> str:
        """``"404 Not Found"`` (or ``"HTTP error"`` when the error carries no response)."""
        if self.status_code is None:
            return "HTTP error"
        try:
            return f"{self.status_code} {HTTPStatus(self.status_code).phrase}"
        except ValueError:
            return str(self.status_code)


def format_error(err: BaseException, *, token: str | bool | None = None, hints: ErrorHints | None = None) -> str | None:
    """The one-line message a person sees for ``err``, or ``None`` when ``err`` is a bug (show its traceback).

    Args:
        err: the exception a command or request raised.
        token: the Hub token in use, redacted from the message with every spelling of it (the environment's
            and the login token are always redacted too).
        hints: how the caller's front end names its options (default: the library's words).

    Returns:
        One line (whitespace folded), redacted, at most :data:`MAX_ERROR_CHARS` characters plus a note saying
        it was cut; ``None`` for anything that is not a project error, a Hub error, a connection error or a
        missing file.
    """
    hints = hints or ErrorHints()
    text = _message(err, token=token, hints=hints)
    if text is None:
        return None
    return as_one_line(text, token=token, hints=hints) or type(err).__name__


def as_one_line(text: str, *, token: str | bool | None = None, hints: ErrorHints | None = None) -> str:
    """``text`` as :func:`format_error` returns messages: redacted, whitespace folded, capped (saying so)."""
    return _capped(_one_line(text, token), hints or ErrorHints())


def _message(err: BaseException, *, token: str | bool | None, hints: ErrorHints) -> str | None:
    """The message for a recognised error (not yet one line), else ``None``."""
    if isinstance(err, XLoraHubError):
        return str(err)
    hub = _hub_message(err, hints)
    if hub is not None:
        return hub
    if isinstance(err, transport_error_types()):
        return connection_message(err, token=token)
    if isinstance(err, (ConnectionError, FileNotFoundError)):
        return str(err)
    cause = _hub_cause(err)
    return _hub_message(cause, hints) if cause is not None else None


def _hub_message(err: BaseException, hints: ErrorHints) -> str | None:
    """The wording of one of ``huggingface_hub``'s errors, from its class and typed fields; else ``None``."""
    from huggingface_hub import errors as hf

    if isinstance(err, hf.LocalEntryNotFoundError):  # before FileNotFoundError, of which it is one
        return (
            f"A file is not in the local cache and the Hub ({_endpoint()}) cannot be used (offline mode, "
            f"HF_HUB_OFFLINE=1 or no connection: check the network and HF_ENDPOINT). {hints.offline}"
        )
    if isinstance(err, hf.HFValidationError):
        return f"{err} Give a Hub repo id ('owner/name') or an existing local folder ('./path')."
    if isinstance(err, hf.HfHubHTTPError):
        return _http_message(err, hub_request(err), hints)
    if isinstance(err, hf.EntryNotFoundError):
        return str(err)
    return None


def _http_message(err: BaseException, request: HubRequest, hints: ErrorHints) -> str:
    """A Hub HTTP error worded by its class, with the repo, revision and file its request was about."""
    from huggingface_hub import errors as hf

    repo = request.repo_id
    where = f"Hub repo {repo!r}" if repo else f"the repo of {_path(request.url) or 'the request'}"
    subject = where[0].upper() + where[1:]
    server = f" The Hub says: {request.server_message.strip().rstrip('.')}." if request.server_message else ""
    if isinstance(err, hf.GatedRepoError):
        page = f" at {hub_url(repo, repo_type=request.repo_type or 'model')}" if repo else " on the Hub"
        return f"{subject} is gated: accept its conditions{page}, then {hints.token}.{server}"
    if isinstance(err, hf.RepositoryNotFoundError):
        return (
            f"{subject} was not found (no such repo on {_endpoint()}, or it is private and the token cannot read "
            f"it). Check the repo id; for a private repo {hints.token}."
        )
    if isinstance(err, hf.RevisionNotFoundError):
        revision = f"Revision {request.revision!r}" if request.revision else "The revision"
        return f"{revision} was not found in {where} on {_endpoint()}. {hints.revision}"
    if isinstance(err, hf.RemoteEntryNotFoundError):
        name = f"File {request.filename!r}" if request.filename else "A file"
        at = f" at revision {request.revision!r}" if request.revision else ""
        return f"{name} was not found in {where}{at} on {_endpoint()}."
    if isinstance(err, hf.DisabledRepoError):
        return f"{subject} has been disabled on {_endpoint()}; it cannot be downloaded.{server}"
    return _status_message(request, hints) + server


def _status_message(request: HubRequest, hints: ErrorHints) -> str:
    """Any other Hub HTTP error: the status, what was asked, the fix the status points to, the request id."""
    asked = " ".join(part for part in (request.method, _path(request.url)) if part) or "a request"
    text = f"The Hub at {_endpoint()} answered {request.status} to {asked}"
    code = request.status_code or 0
    if code == 401:
        text += f". The token was not accepted; {hints.token}"
    elif code == 403:
        text += ". The token does not have the rights this needs (a write token for a push)"
    elif code == 429:
        text += ". Too many requests: wait a little and try again"
    elif code >= 500:
        text += ". The Hub has a problem; try again later"
    text += "."
    if request.request_id:
        text += f" (Request ID: {request.request_id})"
    return text


def hub_request(err: BaseException) -> HubRequest:
    """The typed facts of a ``huggingface_hub`` HTTP error (all ``None`` for an error without a response)."""
    response = _field(err, "response")
    http_request = _field(response, "request")  # httpx raises on a missing `.request`: read it guarded
    url = str(_field(http_request, "url") or _field(response, "url") or "") or None
    repo_type, repo_id, revision, filename = _parse_hub_url(url, repo_id=getattr(err, "repo_id", None))
    return HubRequest(
        status_code=_field(response, "status_code"),
        method=_field(http_request, "method"),
        url=url,
        repo_id=repo_id,
        repo_type=getattr(err, "repo_type", None) or repo_type,
        revision=revision,
        filename=filename,
        server_message=getattr(err, "server_message", None),
        request_id=getattr(err, "request_id", None),
    )


def _field(obj: object, name: str) -> Any:
    """``obj.name``, or ``None`` when it is missing or its property raises (an error must not fail to print)."""
    try:
        return getattr(obj, name, None)
    except Exception:  # noqa: BLE001 - httpx's `.request` raises RuntimeError when unset
        return None


def _parse_hub_url(url: str | None, *, repo_id: str | None) -> tuple[str | None, str | None, str | None, str | None]:
    """``(repo_type, repo_id, revision, filename)`` of a Hub URL, from its path segments.

    ``/{[datasets|spaces]/}{repo}/resolve/{revision}/{filename}`` and
    ``/api/{models|datasets|spaces}/{repo}[/{revision|tree|paths-info|...}/{revision}]``; the revision is one
    percent-encoded segment (``refs%2Fpr%2F1``).
    """
    if not url:
        return None, repo_id, None, None
    segments = [unquote(part) for part in _path(url).strip("/").split("/") if part]
    repo_type = None
    if segments[:1] == ["api"] and len(segments) >= 3 and segments[1] in ("models", "datasets", "spaces"):
        repo_type, rest = segments[1][:-1], segments[2:]
        size = _repo_size(rest, repo_id)
        tail = rest[size:]
        revision = tail[1] if len(tail) >= 2 else None
        return repo_type, repo_id or "/".join(rest[:size]) or None, revision, None
    if segments[:1] in (["datasets"], ["spaces"]):
        repo_type, segments = segments[0][:-1], segments[1:]
    at = _repo_size(segments, repo_id) if repo_id else (segments.index("resolve") if "resolve" in segments else -1)
    if at < 0 or segments[at : at + 1] != ["resolve"]:
        return repo_type, repo_id, None, None
    rest = segments[at + 1 :]
    return (
        repo_type or "model",
        repo_id or "/".join(segments[:at]) or None,
        rest[0] if rest else None,
        "/".join(rest[1:]) or None,
    )


def _repo_size(segments: list[str], repo_id: str | None) -> int:
    """How many leading segments are the repo id (``name`` or ``owner/name``)."""
    if repo_id:
        return repo_id.count("/") + 1
    return 2 if len(segments) >= 2 and segments[1] not in _API_SUBPATHS else 1


def _hub_cause(err: BaseException) -> BaseException | None:
    """The ``huggingface_hub`` error this one was raised ``from`` (as ``transformers`` wraps them), if any."""
    from huggingface_hub import errors as hf

    cause = err.__cause__
    for _ in range(_MAX_CAUSES):
        if cause is None:
            return None
        if isinstance(cause, (hf.HfHubHTTPError, hf.LocalEntryNotFoundError, hf.HFValidationError)):
            return cause
        cause = cause.__cause__
    return None


def transport_error_types() -> tuple[type[BaseException], ...]:
    """The HTTP client's connection-level errors (dropped or refused connections), which are not ``OSError``."""
    classes: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):  # huggingface_hub 2.x uses httpx2, 1.x httpx
        try:
            classes.append(importlib.import_module(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(classes)


def connection_message(
    err: BaseException, *, what: str | None = None, token: str | bool | None = None, download: bool = True
) -> str:
    """A transport error worded for a person: the endpoint, what failed and how to fix it, the token redacted.

    ``what`` names what was being fetched or pushed (``"Mixture 'a/b', file xlora_config.json"``);
    ``download`` says whether the cache can help (``local_files_only=True`` / ``--offline``).
    """
    endpoint = _request_endpoint(err)
    detail = redact(" ".join(f"{type(err).__name__}: {err}".split()), [token])
    prefix = f"{what}: " if what else ""
    names = {cls.__name__ for cls in type(err).__mro__}
    if "LocalProtocolError" in names:
        return (
            f"{prefix}the request to the Hub at {endpoint} was refused by the HTTP client ({detail}). A token with "
            "spaces or line breaks (for example read from a file with Windows line endings) cannot be sent; check "
            "the token."
        )
    if names & {"ConnectError", "ConnectTimeout", "ProxyError"}:
        offline = (
            "; to use files already in the cache, pass `local_files_only=True` (`--offline` for the CLI commands "
            "that take it)."
        )
        return (
            f"{prefix}the Hub at {endpoint} could not be reached ({detail}). Check the network connection and "
            "HF_ENDPOINT (unset it for huggingface.co)" + (offline if download else ".")
        )
    if download:
        advice = (
            "Nothing incomplete was kept in the cache; try again, or pass `local_files_only=True` to use cached files."
        )
        return f"{prefix}the connection to the Hub at {endpoint} failed during the download ({detail}). {advice}"
    return (
        f"{prefix}the connection to the Hub at {endpoint} failed ({detail}). Try again; check the network "
        "connection and HF_ENDPOINT."
    )


def _endpoint() -> str:
    """The Hub URL requests go to (``HF_ENDPOINT``, read by ``huggingface_hub`` at import)."""
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def _request_endpoint(err: BaseException) -> str:
    """The endpoint a failed request went to: the configured one, or the request's own host if elsewhere."""
    endpoint = _endpoint()
    parts = urlsplit(str(_field(_field(err, "request"), "url") or ""))
    origin = f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else None
    same = origin is None or endpoint == origin or endpoint.startswith(origin + "/")
    return endpoint if same else origin


def _path(url: str | None) -> str:
    """The path of ``url`` below the configured endpoint (an endpoint may itself have a path)."""
    if not url:
        return ""
    endpoint = _endpoint()
    if url.startswith(endpoint + "/"):
        return urlsplit(url[len(endpoint) :]).path
    return urlsplit(url).path


def _one_line(text: str, token: str | bool | None) -> str:
    """``text`` redacted, its lines and runs of whitespace folded into single spaces, redacted again."""
    return redact(" ".join(redact(text, [token]).split()), [token])


def _capped(text: str, hints: ErrorHints) -> str:
    """``text`` cut to :data:`MAX_ERROR_CHARS`, saying so and how to see all of it."""
    if len(text) <= MAX_ERROR_CHARS:
        return text
    how = f"; {hints.full_message}" if hints.full_message else ""
    return text[:MAX_ERROR_CHARS].rstrip() + f"... [message cut: {len(text):,d} characters{how}]"
