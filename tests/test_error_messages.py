"""The one error formatter (:func:`xlora_hub.error_messages.format_error`): each of huggingface_hub's errors
built by huggingface_hub itself (against the test Hub server, or from a real response through its own
``hf_raise_for_status``), read through its typed fields; the project's errors and missing files; ``None``, and
so a traceback in the CLI, for everything else."""

from __future__ import annotations

import socket
import uuid

import httpx2
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download
from huggingface_hub import errors as hf
from huggingface_hub.utils import hf_raise_for_status

from xlora_hub.cli import main
from xlora_hub.cli.errors import CLI_HINTS
from xlora_hub.error_messages import MAX_ERROR_CHARS, ErrorHints, format_error, hub_request
from xlora_hub.errors import ExpertNotFoundError, InvalidConfigError

ENDPOINT = constants.ENDPOINT.rstrip("/")


def raised(call, *args, **kwargs) -> BaseException:
    """The exception ``call(*args, **kwargs)`` raises (the test fails if it raises none)."""
    with pytest.raises(Exception) as info:
        call(*args, **kwargs)
    return info.value


def from_response(status: int, url: str, headers: dict[str, str] | None = None) -> BaseException:
    """The error huggingface_hub raises for this HTTP response (its own ``hf_raise_for_status``)."""
    response = httpx2.Response(status, headers=headers or {}, request=httpx2.Request("GET", url))
    return raised(hf_raise_for_status, response)


@pytest.fixture(scope="module")
def repo(hub) -> str:
    """A Hub repo with one file, ``config.json``."""
    repo_id = f"alice/errors-{uuid.uuid4().hex[:8]}"
    api = HfApi(token=hub.token)
    api.create_repo(repo_id)
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)
    return repo_id


# ---------------------------------------------------------------------------------------------- Hub errors
def test_repository_not_found_names_the_repo_and_the_token_fix(hub, tmp_path):
    missing = f"alice/missing-{uuid.uuid4().hex[:8]}"
    err = raised(hf_hub_download, missing, "config.json", cache_dir=tmp_path)
    assert type(err) is hf.RepositoryNotFoundError and hub_request(err).repo_id == missing
    line = format_error(err)
    assert line == (
        f"Hub repo {missing!r} was not found (no such repo on {ENDPOINT}, or it is private and the token cannot "
        "read it). Check the repo id; for a private repo pass a token that can read it (`token=`, HF_TOKEN or `hf "
        "auth login`)."
    )
    assert "pass --token, set HF_TOKEN" in format_error(err, hints=CLI_HINTS)


def test_revision_not_found_names_the_revision_read_from_the_url(hub, repo, tmp_path):
    for revision in ("no-such-branch", "refs/pr/99"):  # the second is one percent-encoded URL segment
        err = raised(hf_hub_download, repo, "config.json", revision=revision, cache_dir=tmp_path)
        assert type(err) is hf.RevisionNotFoundError
        request = hub_request(err)
        assert (request.repo_id, request.revision, request.status_code) == (repo, revision, 404)
        assert format_error(err, hints=CLI_HINTS) == (
            f"Revision {revision!r} was not found in Hub repo {repo!r} on {ENDPOINT}. Give an existing branch, tag "
            "or commit with --revision."
        )


def test_missing_file_in_a_repo_names_file_repo_and_revision(hub, repo, tmp_path):
    err = raised(hf_hub_download, repo, "weights/nope.safetensors", cache_dir=tmp_path)
    assert isinstance(err, hf.RemoteEntryNotFoundError)
    assert format_error(err) == (
        f"File 'weights/nope.safetensors' was not found in Hub repo {repo!r} at revision 'main' on {ENDPOINT}."
    )


def test_local_entry_not_found_says_the_hub_cannot_be_used(hub, repo, tmp_path):
    err = raised(hf_hub_download, repo, "config.json", cache_dir=tmp_path, local_files_only=True)
    assert isinstance(err, hf.LocalEntryNotFoundError)
    line = format_error(err, hints=CLI_HINTS)
    assert f"the Hub ({ENDPOINT}) cannot be used" in line and line.endswith(
        "`xlora-hub pull MIXTURE` while online first."
    )


def test_gated_repo_points_to_its_page(hub):
    err = from_response(
        403,
        f"{ENDPOINT}/api/models/owner/gated-model",
        {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access to model owner/gated-model is restricted."},
    )
    assert type(err) is hf.GatedRepoError
    assert format_error(err, hints=CLI_HINTS) == (
        f"Hub repo 'owner/gated-model' is gated: accept its conditions at {ENDPOINT}/owner/gated-model, then pass "
        "--token, set HF_TOKEN or run `hf auth login`. The Hub says: Access to model owner/gated-model is restricted."
    )


def test_other_http_errors_give_status_request_fix_and_request_id(hub, repo):
    err = raised(HfApi(token="hf_not_a_known_token").model_info, repo)
    assert type(err) is hf.HfHubHTTPError and err.response.status_code == 401
    line = format_error(err, hints=CLI_HINTS)
    assert line.startswith(f"The Hub at {ENDPOINT} answered 401 Unauthorized to GET /api/models/{repo}")
    assert "The token was not accepted; pass --token" in line and "Invalid credentials" in line  # server_message
    err = from_response(503, f"{ENDPOINT}/api/models/a/b", {"X-Request-Id": "req-123"})
    assert format_error(err) == (
        f"The Hub at {ENDPOINT} answered 503 Service Unavailable to GET /api/models/a/b. The Hub has a problem; try "
        "again later. (Request ID: req-123)"
    )


def test_a_bad_repo_id_says_what_a_repo_id_looks_like(tmp_path):
    err = raised(hf_hub_download, "not a repo!", "config.json", cache_dir=tmp_path)
    assert isinstance(err, hf.HFValidationError)
    assert format_error(err).endswith("Give a Hub repo id ('owner/name') or an existing local folder ('./path').")


def test_a_hub_error_wrapped_by_transformers_is_worded_as_the_hub_error(hub, tmp_path):
    from transformers import AutoConfig

    missing = f"alice/missing-{uuid.uuid4().hex[:8]}"
    err = raised(AutoConfig.from_pretrained, missing, cache_dir=tmp_path)
    assert type(err) is OSError and isinstance(err.__cause__, hf.RepositoryNotFoundError)
    assert format_error(err).startswith(f"Hub repo {missing!r} was not found (no such repo on {ENDPOINT}")


def test_an_unreachable_hub_names_the_endpoint_it_tried():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens there once the block ends
    err = raised(HfApi(endpoint=f"http://127.0.0.1:{port}").model_info, "a/b")
    assert isinstance(err, httpx2.TransportError)
    line = format_error(err)
    assert f"the Hub at http://127.0.0.1:{port} could not be reached" in line and "HF_ENDPOINT" in line


# ---------------------------------------------------------------------------------------------- ours, files, bugs
def test_project_errors_and_missing_files_are_their_own_message_on_one_line(tmp_path):
    assert format_error(InvalidConfigError("`top_k_lora` is 3:\n  at most 2.")) == "`top_k_lora` is 3: at most 2."
    assert format_error(ExpertNotFoundError("Expert 'a' not found.")) == "Expert 'a' not found."
    err = raised(open, tmp_path / "nope.txt")
    assert format_error(err) == f"[Errno 2] No such file or directory: {str(tmp_path / 'nope.txt')!r}"
    assert format_error(ConnectionError("Pushing: the Hub could not be reached.")) == (
        "Pushing: the Hub could not be reached."
    )


def test_messages_are_redacted_and_capped():
    token = "hf_secret_token_value_1234"
    assert format_error(InvalidConfigError(f"header 'Bearer {token}\\r\\n'"), token=token) == "header 'Bearer ***'"
    line = format_error(InvalidConfigError("x" * 10_000), hints=ErrorHints(full_message="see the log"))
    assert len(line) < MAX_ERROR_CHARS + 100 and line.endswith("[message cut: 10,000 characters; see the log]")


@pytest.mark.parametrize(
    "err",
    [TypeError("unsupported operand"), ZeroDivisionError("division by zero"), ValueError("bad"), KeyError("k"),
     PermissionError(13, "Permission denied"), RuntimeError("boom"), ImportError("No module named 'xlora_hub.x'")],
)  # fmt: skip
def test_anything_else_is_a_bug(err):
    assert format_error(err) is None


def test_a_bug_inside_a_command_keeps_its_traceback(monkeypatch, tmp_path, capsys):
    """A plain ``ValueError`` or ``ZeroDivisionError`` from the library is a bug: the CLI prints its (redacted)
    traceback and exits 1, where it once printed one line as if the input were wrong."""
    import xlora_hub.hub

    token = "hf_bug_token_never_printed"
    for bug in (ZeroDivisionError("division by zero"), ValueError(f"internal state, token {token}")):

        def broken(*args, bug=bug, **kwargs):
            raise bug

        monkeypatch.setattr(xlora_hub.hub, "inspect_mixture", broken)
        assert main(["info", str(tmp_path), "--token", token]) == 1
        err = capsys.readouterr().err
        assert err.startswith("Traceback") and f"{type(bug).__name__}: " in err and "error:" not in err
        assert token not in err
