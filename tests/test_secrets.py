"""Tokens never leave in a message: CRLF tokens, one-line errors, warnings, --debug tracebacks, the library's
ConnectionError; an unreachable Hub names its endpoint; one-line errors are capped in length."""

from __future__ import annotations

import json
import logging
import socket
import subprocess
import sys
import traceback
import uuid
import warnings
from pathlib import Path

import pytest
import transformers
from factories import save_expert, tiny_llama

from xlora_hub import XLoraConfig, XLoraModel, load_mixture
from xlora_hub.cli import MAX_ERROR_CHARS, main, one_line, output_settings
from xlora_hub.errors import InvalidConfigError
from xlora_hub.redact import redact, secret_forms

# A token read with `$(cat token.txt)` from a CRLF file keeps "\r"; one with a line break inside cannot be
# stripped into a valid header at all. Neither is known to the server.
CRLF_TOKEN = "hf_unknownCRLFsecret0001\r\n"
INSIDE_TOKEN = "hf_before0secret\r\nafter0secret"


def leaks(text: str, token: str) -> list[str]:
    """The spellings of ``token`` found in ``text`` (raw, stripped, repr, bytes repr, JSON, percent-encoded...)."""
    forms = set(secret_forms(token)) | {repr(token), repr(token.strip()), repr(token.encode())}
    return [form for form in forms if form.strip("'\"b") and form.strip("'\"b") in text]


def cli(capsys, *args: str) -> tuple[int, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_redact_covers_every_spelling():
    for token in (CRLF_TOKEN, INSIDE_TOKEN, "hf_plain_token_123"):
        for text in (
            f"header {token!r}",
            f"header {token.encode()!r}",
            json.dumps({"t": token}),
            f"url ?token={__import__('urllib.parse').parse.quote(token)}",
            " ".join(f"a {token} b".split()),
            token,
        ):
            assert not leaks(redact(text, [token]), token), text
    assert redact("Illegal header value b'Bearer whatever\\r\\n'") == "Illegal header value b'Bearer ***'"


@pytest.mark.parametrize("token", [CRLF_TOKEN, INSIDE_TOKEN])
def test_library_connection_error_holds_no_token(hub, tmp_path, token):
    with pytest.raises(ConnectionError) as info:
        load_mixture(f"alice/none-{uuid.uuid4().hex[:6]}", token=token, cache_dir=tmp_path / "cache")
    assert "http://127.0.0.1" in str(info.value)
    shown = str(info.value) + "".join(traceback.format_exception(info.value))
    assert not leaks(shown, token), shown


@pytest.mark.parametrize("token", [CRLF_TOKEN, INSIDE_TOKEN])
@pytest.mark.parametrize("debug", [[], ["--debug"]])
def test_cli_never_prints_the_token(hub, tmp_path, capsys, token, debug):
    code, out = cli(capsys, "info", f"alice/none-{uuid.uuid4().hex[:6]}", "--token", token,
                    "--cache-dir", tmp_path / "c", *debug)  # fmt: skip
    assert code == 1
    assert ("Traceback" in out) == bool(debug)
    assert not leaks(out, token), out


def test_a_crlf_token_is_stripped_and_works(hub, tmp_path, capsys):
    repo = f"alice/private-{uuid.uuid4().hex[:6]}"
    hub.server.create_repo(repo, private=True)
    code, out = cli(capsys, "info", repo, "--token", hub.token + "\r\n", "--cache-dir", tmp_path / "c")
    assert code == 1 and "has no xlora_config.json" in out  # it reached the private repo: the token was sent
    assert not leaks(out, hub.token + "\r\n")


def test_debug_traceback_of_a_real_process_is_redacted(hub, tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "xlora_hub", "info", "alice/nothing-here", "--token", INSIDE_TOKEN, "--debug"],
        capture_output=True,
        text=True,
        timeout=300,
        env=hub.env(tmp_path),
    )
    assert result.returncode == 1 and "Traceback" in result.stderr and "ConnectionError" in result.stderr
    assert not leaks(result.stdout + result.stderr, INSIDE_TOKEN), result.stderr


def test_warnings_and_log_lines_are_redacted(capsys):
    with output_settings(quiet=False, debug=False, secrets=[CRLF_TOKEN]):
        logging.getLogger("xlora_hub.hub").warning("could not pin (%s)", f"header {CRLF_TOKEN!r}")
        logging.getLogger("huggingface_hub").warning(f"header {CRLF_TOKEN.encode()!r}")
        warnings.warn(f"a warning with {CRLF_TOKEN!r}", UserWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert "could not pin" in err and "a warning with" in err
    assert not leaks(err, CRLF_TOKEN), err


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: nothing listens there


def test_push_with_the_hub_unreachable_names_the_endpoint(hub, tmp_path):
    tiny_llama().save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    expert = save_expert(tiny_llama, tmp_path / "e", target_modules=["q_proj"], seed=1)
    XLoraModel.from_experts(base, XLoraConfig(experts={"a": str(expert)})).save_pretrained(tmp_path / "mix")
    endpoint = f"http://127.0.0.1:{closed_port()}"
    env = {**hub.env(tmp_path), "HF_ENDPOINT": endpoint}
    result = subprocess.run(
        [sys.executable, "-m", "xlora_hub", "push", str(tmp_path / "mix"), "alice/x", "--token", CRLF_TOKEN],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    line = result.stderr.strip().splitlines()[-1]  # after the warning about the local base model
    assert result.returncode == 1 and line.startswith("xlora-hub push: error: "), result.stderr
    assert endpoint in line and "could not be reached" in line and "HF_ENDPOINT" in line and "network" in line
    assert not leaks(line, CRLF_TOKEN)


def test_one_line_errors_are_capped(tmp_path, capsys):
    line = one_line(InvalidConfigError("bad value " + "x" * 5_000_000))
    assert len(line) < MAX_ERROR_CHARS + 200 and "--debug" in line and "5,000,010 characters" in line
    (tmp_path / "mix").mkdir()
    (tmp_path / "mix" / "xlora_config.json").write_text(
        json.dumps({"format_version": 1, "experts": [{"name": "a", "repo_id": "o/" + "r" * 3_000_000}]})
    )
    code, out = cli(capsys, "info", tmp_path / "mix")
    assert code == 1 and len(out.strip().splitlines()) == 1 and len(out) < MAX_ERROR_CHARS + 300, out[:300]


def test_one_line_of_a_bare_transport_error_names_the_endpoint():
    import httpx2

    line = one_line(httpx2.ConnectError("[Errno 111] Connection refused"))
    from huggingface_hub import constants

    assert constants.ENDPOINT.rstrip("/") in line and "could not be reached" in line and "--offline" in line


def test_push_uses_a_crlf_token(hub, tmp_path, capsys):
    """The stripped token is the one sent: a push with a CRLF copy of a write token succeeds."""
    tiny_llama().save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    expert = save_expert(tiny_llama, tmp_path / "e", target_modules=["q_proj"], seed=1)
    XLoraModel.from_experts(base, XLoraConfig(experts={"a": str(expert)})).save_pretrained(tmp_path / "mix")
    repo = f"alice/crlf-{uuid.uuid4().hex[:6]}"
    code, out = cli(capsys, "push", tmp_path / "mix", repo, "--token", hub.token + "\r\n", "-q")
    assert code == 0, out
    assert hub.server.repo_exists(repo) and not leaks(out, hub.token + "\r\n")
    assert Path(tmp_path / "mix").is_dir()


def test_the_convert_module_prints_a_bugs_traceback_redacted(tmp_path, capsys, monkeypatch):
    # An error no formatter recognises is a bug: its traceback is shown, but never the token inside it.
    import xlora_hub.convert.command as command

    token = "hf_convert_secret_token"

    def broken(*args, **kwargs):
        raise RuntimeError(f"unexpected state while holding {token!r}")

    monkeypatch.setattr(command, "import_mixture", broken)
    assert command.main(["import", str(tmp_path / "src"), str(tmp_path / "out"), "--token", token]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: unexpected state" in err
    assert token not in err
