"""End-to-end checks of tests/hub_server.py with the real ``huggingface_hub`` client.

Every client call runs in a subprocess (:func:`hub_server.run_client`) because ``huggingface_hub`` reads
``HF_ENDPOINT``/``HF_HOME``/``HF_HUB_DISABLE_XET`` when it is imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hub_server import HubServer, client_env, run_client, start_server

WRITE = "tok-alice-write"
READ = "tok-alice-read"
BOB = "tok-bob-write"
SHA_RE = re.compile(r"^[0-9a-f]{40}$")


@pytest.fixture(scope="module")
def server():
    srv = start_server()
    srv.add_user(WRITE, "alice", write=True)
    srv.add_user(READ, "alice", write=False)
    srv.add_user(BOB, "bob", write=True)
    yield srv
    srv.stop()


@pytest.fixture(autouse=True)
def _reset(server: HubServer):
    server.clear_faults()
    server.clear_requests()
    yield
    server.clear_faults()


@pytest.fixture
def env_for(server: HubServer, tmp_path: Path):
    """``env_for(token, name)``: client environment with its own fresh HF_HOME."""

    def make(token: str | None = WRITE, name: str = "home") -> dict[str, str]:
        return client_env(server, tmp_path / name, token=token)

    return make


def test_upload_folder_lfs_and_snapshot_download(server: HubServer, env_for, tmp_path: Path):
    src = tmp_path / "src"
    (src / "adapters").mkdir(parents=True)
    files = {
        "config.json": json.dumps({"r": 8, "alpha": 16}).encode(),
        "adapters/adapter_0.safetensors": os.urandom(1_500_000),
        "adapters/notes.txt": b"tiny text\n",
    }
    for rel, data in files.items():
        (src / rel).write_bytes(data)

    out = run_client(
        f"""
from huggingface_hub import HfApi
api = HfApi()
url = api.create_repo("mix", private=False)
info = api.upload_folder(folder_path={str(src)!r}, repo_id="alice/mix", commit_message="add mixture")
m = api.model_info("alice/mix", files_metadata=True)
emit({{
    "url": str(url), "repo_id": url.repo_id, "oid": info.oid, "commit_url": info.commit_url, "sha": m.sha,
    "siblings": {{s.rfilename: [s.size, s.lfs.sha256 if s.lfs else None] for s in m.siblings}},
    "files": api.list_repo_files("alice/mix"),
    "top": sorted((f.path, type(f).__name__) for f in api.list_repo_tree("alice/mix")),
    "sub": sorted(f.path for f in api.list_repo_tree("alice/mix", path_in_repo="adapters")),
}})
""",
        env_for(WRITE, "uploader"),
    )
    assert out["url"] == f"{server.url}/alice/mix" and out["repo_id"] == "alice/mix"
    assert SHA_RE.match(out["oid"]) and out["oid"] == out["sha"]
    assert out["commit_url"].endswith(f"/alice/mix/commit/{out['oid']}")
    big = files["adapters/adapter_0.safetensors"]
    assert out["siblings"]["adapters/adapter_0.safetensors"] == [len(big), hashlib.sha256(big).hexdigest()]
    assert out["siblings"]["config.json"] == [len(files["config.json"]), None]
    assert sorted(out["files"]) == sorted([".gitattributes", *files])
    assert out["top"] == [[".gitattributes", "RepoFile"], ["adapters", "RepoFolder"], ["config.json", "RepoFile"]]
    assert out["sub"] == ["adapters/adapter_0.safetensors", "adapters/notes.txt"]
    # The big file went through LFS (batch + signed PUT without token), the small ones inline in the commit.
    methods_paths = server.requests
    assert ("POST", "/alice/mix.git/info/lfs/objects/batch") in methods_paths
    assert [p for m, p in methods_paths if m == "PUT"] == [f"/__lfs__/upload/{hashlib.sha256(big).hexdigest()}"]
    put = next(r for r in server.log if r.method == "PUT")
    assert "authorization" not in put.headers and put.status == 200

    # allow_patterns: only the matching file is fetched (fresh HF_HOME, anonymous client).
    server.clear_requests()
    out = run_client(
        """
from huggingface_hub import snapshot_download
emit(snapshot_download("alice/mix", allow_patterns=["adapters/*.safetensors"]))
""",
        env_for(None, "partial"),
    )
    part = Path(out)
    assert (part / "adapters/adapter_0.safetensors").read_bytes() == big
    assert not (part / "config.json").exists() and not (part / "adapters/notes.txt").exists()
    assert server.downloaded_files() == ["adapters/adapter_0.safetensors"]

    out = run_client(
        'from huggingface_hub import snapshot_download; emit(snapshot_download("alice/mix"))', env_for(None)
    )
    for rel, data in files.items():
        assert (Path(out) / rel).read_bytes() == data


def test_commits_get_new_shas_and_old_revisions_stay_downloadable(server: HubServer, env_for):
    out = run_client(
        """
from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import RevisionNotFoundError, EntryNotFoundError
api = HfApi()
api.create_repo("hist")
c1 = api.upload_file(path_or_fileobj=b"v1", path_in_repo="w.txt", repo_id="alice/hist")
c2 = api.upload_file(path_or_fileobj=b"v2", path_in_repo="w.txt", repo_id="alice/hist")
api.create_branch("alice/hist", branch="dev", revision=c1.oid)
c3 = api.upload_file(path_or_fileobj=b"dev", path_in_repo="w.txt", repo_id="alice/hist", revision="dev")
read = lambda **kw: open(hf_hub_download("alice/hist", "w.txt", **kw)).read()
refs = api.list_repo_refs("alice/hist")
emit({
    "c1": c1.oid, "c2": c2.oid, "c3": c3.oid,
    "old": read(revision=c1.oid), "short": read(revision=c1.oid[:7], force_download=True),
    "main": read(), "dev": read(revision="dev"),
    "commits": [(c.commit_id, c.title) for c in api.list_repo_commits("alice/hist")],
    "branches": sorted((b.name, b.target_commit) for b in refs.branches),
    "bad_rev": capture(hf_hub_download, "alice/hist", "w.txt", revision="nope"),
    "bad_file": capture(hf_hub_download, "alice/hist", "missing.txt"),
    "bad_repo": capture(api.model_info, "alice/does-not-exist"),
    "same_again": api.upload_file(path_or_fileobj=b"v2", path_in_repo="w.txt", repo_id="alice/hist").oid,
    "parent_ok": api.upload_file(
        path_or_fileobj=b"v3", path_in_repo="w.txt", repo_id="alice/hist", parent_commit=c2.oid).oid,
    "parent_stale": capture(api.upload_file, path_or_fileobj=b"v4", path_in_repo="w.txt",
                            repo_id="alice/hist", parent_commit=c2.oid),
})
""",
        env_for(WRITE),
    )
    c1, c2, c3 = out["c1"], out["c2"], out["c3"]
    assert all(SHA_RE.match(sha) for sha in (c1, c2, c3)) and len({c1, c2, c3}) == 3
    assert (out["old"], out["short"], out["main"], out["dev"]) == ("v1", "v1", "v2", "dev")
    assert [sha for sha, _ in out["commits"]][:2] == [c2, c1] and out["commits"][-1][1] == "initial commit"
    assert out["branches"] == sorted([["main", c2], ["dev", c3]])
    assert out["bad_rev"]["error"] == "RevisionNotFoundError"
    assert out["bad_file"]["error"] in ("RemoteEntryNotFoundError", "EntryNotFoundError")
    assert "EntryNotFoundError" in out["bad_file"]["mro"]
    assert out["bad_repo"]["error"] == "RepositoryNotFoundError"
    # Unchanged content: the client skips the commit and reports the current head.
    assert out["same_again"] == c2
    assert out["parent_ok"] not in (c1, c2, c3)
    assert out["parent_stale"]["status"] == 412 and "HfHubHTTPError" in out["parent_stale"]["mro"]
    assert server.get_file("alice/hist", "w.txt", c1) == b"v1"


def test_private_repo_is_invisible_without_owner_token(server: HubServer, env_for):
    run_client(
        """
from huggingface_hub import HfApi
api = HfApi()
api.create_repo("secret", private=True)
api.upload_file(path_or_fileobj=b"top secret", path_in_repo="s.txt", repo_id="alice/secret")
""",
        env_for(WRITE),
    )
    probe = """
from huggingface_hub import HfApi, hf_hub_download
api = HfApi()
emit({
    "info": capture(lambda: api.model_info("alice/secret").private),
    "download": capture(lambda: open(hf_hub_download("alice/secret", "s.txt")).read()),
    "files": capture(api.list_repo_files, "alice/secret"),
})
"""
    for token, name in ((None, "anon"), (BOB, "bob")):
        out = run_client(probe, env_for(token, name))
        for key in ("info", "download", "files"):
            assert out[key]["error"] == "RepositoryNotFoundError", (name, key, out[key])
        assert out["info"]["status"] == (401 if token is None else 404)
    out = run_client(probe, env_for(READ, "owner-read"))
    assert out["info"] == {"ok": True, "value": True}
    assert out["download"] == {"ok": True, "value": "top secret"}
    assert out["files"]["value"] == [".gitattributes", "s.txt"]


def test_write_permissions_and_create_repo_conflicts(server: HubServer, env_for):
    server.create_repo("alice/owned")
    out = run_client(
        """
from huggingface_hub import HfApi
api = HfApi()
emit({
    "whoami": api.whoami()["auth"]["accessToken"]["role"],
    "create": capture(api.create_repo, "nope"),
    "upload": capture(api.upload_file, path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/owned"),
    "delete": capture(api.delete_repo, "alice/owned"),
})
""",
        env_for(READ, "ro"),
    )
    assert out["whoami"] == "read"
    for key in ("create", "upload", "delete"):
        assert out[key]["status"] == 403 and "HfHubHTTPError" in out[key]["mro"], (key, out[key])
    assert server.list_files("alice/owned") == [".gitattributes"]

    out = run_client(
        """
from huggingface_hub import HfApi
api = HfApi()
emit({
    "foreign": capture(api.upload_file, path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/owned"),
    "dup": capture(api.create_repo, "bobs"),
    "dup_again": capture(api.create_repo, "bobs"),
    "exist_ok": str(api.create_repo("bobs", exist_ok=True)),
    "space": str(api.create_repo("demo", repo_type="space", space_sdk="gradio")),
    "sdk": api.space_info("bob/demo").sdk,
    "app": api.upload_file(path_or_fileobj=b"import gradio", path_in_repo="app.py", repo_id="bob/demo",
                           repo_type="space").commit_url,
    "space_files": api.list_repo_files("bob/demo", repo_type="space"),
    "deleted": api.delete_repo("bob/bobs"),
    "gone": capture(api.model_info, "bob/bobs"),
})
""",
        env_for(BOB, "bob"),
    )
    assert out["foreign"]["status"] == 403
    assert out["dup"]["ok"] and out["dup_again"]["status"] == 409
    assert out["exist_ok"] == f"{server.url}/bob/bobs"
    assert out["space"] == f"{server.url}/spaces/bob/demo" and out["sdk"] == "gradio"
    assert "/spaces/bob/demo/commit/" in out["app"]
    assert out["space_files"] == [".gitattributes", "app.py"]
    assert out["gone"]["error"] == "RepositoryNotFoundError"
    out = run_client(
        """
from huggingface_hub import hf_hub_download
emit(open(hf_hub_download("bob/demo", "app.py", repo_type="space")).read())
""",
        env_for(None, "anon"),
    )
    assert out == "import gradio"
    assert ("GET", "/spaces/bob/demo/resolve/main/app.py") in server.requests


def test_create_pr_opens_pull_request_refs(server: HubServer, env_for):
    server.create_repo("alice/prs")
    base = server.commit_files("alice/prs", {"a.txt": b"base"})
    out = run_client(
        """
import os
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
api = HfApi()
pr1 = api.upload_file(path_or_fileobj=b"proposal", path_in_repo="a.txt", repo_id="alice/prs", create_pr=True,
                      commit_message="Proposal")
pr2 = api.upload_file(path_or_fileobj=b"another", path_in_repo="b.bin", repo_id="alice/prs", create_pr=True)
more = api.upload_file(path_or_fileobj=b"more", path_in_repo="sub/c.txt", repo_id="alice/prs",
                       revision=pr1.pr_revision)
refs = api.list_repo_refs("alice/prs", include_pull_requests=True)
emit({
    "pr1": [pr1.pr_revision, pr1.pr_num, pr1.pr_url, pr1.oid], "pr2": [pr2.pr_revision, pr2.pr_num],
    "prs": sorted((r.ref, r.target_commit) for r in refs.pull_requests),
    "pr_file": open(hf_hub_download("alice/prs", "a.txt", revision=pr1.pr_revision)).read(),
    "main_file": open(hf_hub_download("alice/prs", "a.txt")).read(),
    "more": more.oid,
    "pr_tree": [f.path for f in api.list_repo_tree("alice/prs", path_in_repo="sub", revision="refs/pr/1")],
    "pr_snapshot": sorted(os.listdir(snapshot_download("alice/prs", revision="refs/pr/1"))),
})
""",
        env_for(BOB, "bob"),  # any user with a write token may open a PR on a public repo
    )
    assert out["pr1"][:3] == ["refs/pr/1", 1, f"{server.url}/alice/prs/discussions/1"]
    assert out["pr2"] == ["refs/pr/2", 2]
    assert out["prs"] == sorted([["refs/pr/1", out["more"]], ["refs/pr/2", server.head("alice/prs", "refs/pr/2")]])
    assert out["pr_file"] == "proposal" and out["main_file"] == "base"
    assert out["pr_tree"] == ["sub/c.txt"] and out["pr_snapshot"] == [".gitattributes", "a.txt", "sub"]
    assert server.head("alice/prs") == base
    assert ("HEAD", "/alice/prs/resolve/refs%2Fpr%2F1/a.txt") in server.requests


def test_fault_500_raises_http_error(server: HubServer, env_for):
    server.create_repo("alice/flaky")
    server.commit_files("alice/flaky", {"f.txt": b"payload"})
    server.set_fault("/api/models/alice/flaky", "500")
    code = """
from huggingface_hub import HfApi, hf_hub_download
emit({"info": capture(HfApi().model_info, "alice/flaky"),
      "dl": capture(lambda: open(hf_hub_download("alice/flaky", "f.txt")).read())})
"""
    out = run_client(code, env_for(None))
    assert out["info"]["status"] == 500 and out["info"]["error"] == "HfHubHTTPError"
    assert out["dl"] == {"ok": True, "value": "payload"}  # the fault only matches the API path
    server.clear_faults()
    # A transient error on the metadata HEAD call is retried by the client.
    fault = server.set_fault("/resolve/", "503", times=1, method="HEAD")
    out = run_client(code, env_for(None, "fresh"))
    assert out["dl"] == {"ok": True, "value": "payload"} and fault.hits == 1


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_fault_drop_and_truncate_make_downloads_fail(server: HubServer, env_for, tmp_path: Path):
    server.create_repo("alice/broken")
    blob = os.urandom(300_000)
    server.commit_files("alice/broken", {"w.safetensors": blob})
    code = """
import os
from huggingface_hub import hf_hub_download, constants
result = capture(hf_hub_download, "alice/broken", "w.safetensors")
if result["ok"]:
    result["value"] = open(result["value"], "rb").read().hex()
blobs = os.path.join(constants.HF_HUB_CACHE, "models--alice--broken", "blobs")
names = os.listdir(blobs) if os.path.isdir(blobs) else []
result["complete_blobs"] = [b for b in names if not b.endswith(".incomplete")]
emit(result)
"""
    # Every GET is cut mid-body: the client retries 5 times (1 s apart), then gives up.
    server.set_fault("/alice/broken/resolve/", "drop", method="GET")
    started = time.monotonic()
    out = run_client(code, env_for(None, "drop"))
    assert not out["ok"] and out["complete_blobs"] == [], out
    assert out["error"] == "RemoteProtocolError"  # httpx2's error propagates as is (not an HfHubHTTPError)
    assert time.monotonic() - started < 30
    server.clear_faults()

    # Short body with a consistent Content-Length: caught by the client's size check.
    server.set_fault("/alice/broken/resolve/", "truncate")
    out = run_client(code, env_for(None, "truncate"))
    assert not out["ok"] and "Consistency check failed" in out["message"] and out["complete_blobs"] == []
    server.clear_faults()

    # A single dropped connection is retried by the client and yields the right bytes.
    server.set_fault("/alice/broken/resolve/", "drop", method="GET", times=1)
    out = run_client(code, env_for(None, "retry"))
    assert out["ok"] and bytes.fromhex(out["value"]) == blob
    assert len(out["complete_blobs"]) == 1

    # The client buffers 10 MiB chunks: past that, a dropped download resumes with a Range request (206).
    server.clear_faults()
    server.clear_requests()
    huge = os.urandom(11 * 1024 * 1024)
    server.commit_files("alice/broken", {"w.safetensors": huge})
    server.set_fault("/alice/broken/resolve/", "drop:10600000", method="GET", times=1)
    out = run_client(
        code.replace(".read().hex()", '.read() == open(os.environ["EXPECTED"], "rb").read()'),
        {**env_for(None, "resume"), "EXPECTED": str(_write(tmp_path / "huge.bin", huge))},
    )
    assert out["ok"] and out["value"] is True
    gets = [(r.headers.get("range"), r.status) for r in server.log if r.method == "GET"]
    assert gets == [(None, 200), ("bytes=10485760-", 206)]


def _http(server: HubServer, method: str, path: str, data: bytes | None = None, headers: dict | None = None):
    request = urllib.request.Request(f"{server.url}{path}", data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), err.read()


def test_raw_http_details(server: HubServer):
    server.create_repo("alice/raw")
    sha = server.commit_files("alice/raw", {"w.bin": bytes(range(256)) * 8, "r.txt": b"regular"})
    # LFS file: sha256 ETag + linked headers; ranges answered with 206.
    status, headers, _ = _http(server, "HEAD", "/alice/raw/resolve/main/w.bin")
    blob_sha = hashlib.sha256(bytes(range(256)) * 8).hexdigest()
    assert status == 200 and headers["X-Repo-Commit"] == sha and headers["Content-Length"] == "2048"
    assert headers["ETag"] == headers["X-Linked-Etag"] == f'"{blob_sha}"' and headers["X-Linked-Size"] == "2048"
    status, headers, body = _http(server, "GET", f"/alice/raw/resolve/{sha}/w.bin", headers={"Range": "bytes=2000-"})
    assert status == 206 and body == (bytes(range(256)) * 8)[2000:]
    assert headers["Content-Range"] == "bytes 2000-2047/2048"
    assert _http(server, "GET", "/alice/raw/resolve/main/w.bin", headers={"Range": "bytes=5000-"})[0] == 416
    # Regular file: git blob sha1 as ETag, no linked headers.
    status, headers, body = _http(server, "GET", "/alice/raw/resolve/main/r.txt")
    assert body == b"regular" and headers["ETag"] == f'"{hashlib.sha1(b"blob 7" + bytes(1) + b"regular").hexdigest()}"'
    assert "X-Linked-Etag" not in headers
    # Error codes the client maps to its exceptions.
    status, headers, _ = _http(server, "GET", "/alice/raw/resolve/main/nope.txt")
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (404, "EntryNotFound", sha)
    status, headers, _ = _http(server, "GET", "/alice/raw/resolve/nope/r.txt")
    assert (status, headers["X-Error-Code"]) == (404, "RevisionNotFound")
    status, headers, _ = _http(server, "GET", "/api/models/alice/none")
    assert (status, headers["X-Error-Code"]) == (401, "RepoNotFound")
    status, headers, _ = _http(server, "GET", "/api/models/alice/raw", headers={"Authorization": "Bearer bogus"})
    assert status == 401 and "X-Error-Code" not in headers
    # LFS uploads need the server's signature, not a token.
    oid = hashlib.sha256(b"data").hexdigest()
    for query in ("", f"?size=4&sig={'0' * 64}"):
        assert _http(server, "PUT", f"/__lfs__/upload/{oid}{query}", data=b"data")[0] == 403


def test_cli_entry_point_serves(tmp_path: Path):
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    script = Path(__file__).with_name("hub_server.py")
    proc = subprocess.Popen(
        [sys.executable, str(script), "--port", str(port), "--token", "cli-token", "--user", "carol"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert "listening" in proc.stdout.readline()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/api/whoami-v2", headers={"Authorization": "Bearer cli-token"}
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert json.load(response)["name"] == "carol"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_files_metadata_lfs_sha256_ranged_header_reads_and_gating(server: HubServer, env_for, tmp_path: Path):
    import torch
    from safetensors.torch import save_file

    # a header over 100 kB, so parse_safetensors_file_metadata needs its second ranged read
    tensors = {f"layer.{i}.{'x' * 60}.weight": torch.zeros(1) for i in range(1500)}
    save_file(tensors, str(tmp_path / "big.safetensors"))
    data = (tmp_path / "big.safetensors").read_bytes()
    assert int.from_bytes(data[:8], "little") > 100_000
    server.create_repo("alice/headers")
    sha = server.commit_files("alice/headers", {"sub/big.safetensors": data, "notes.txt": b"hi\n"})
    server.set_gated("alice/headers", "manual")
    server.clear_requests()
    out = run_client(
        f"""
from huggingface_hub import HfApi
api = HfApi()
paths = api.get_paths_info("alice/headers", ["sub/big.safetensors", "notes.txt"], revision={sha!r})
meta = api.parse_safetensors_file_metadata("alice/headers", "sub/big.safetensors", revision={sha!r})
info = api.model_info("alice/headers", files_metadata=True)
emit({{
    "paths": {{p.path: [p.size, p.lfs.sha256 if p.lfs else None] for p in paths}},
    "n_tensors": len(meta.tensors),
    "dtype": next(iter(meta.tensors.values())).dtype,
    "gated": info.gated,
    "siblings": {{s.rfilename: s.lfs.sha256 if s.lfs else None for s in info.siblings}},
}})
""",
        env_for(None),
    )
    digest = hashlib.sha256(data).hexdigest()
    assert out["paths"] == {"sub/big.safetensors": [len(data), digest], "notes.txt": [3, None]}
    assert out["siblings"]["sub/big.safetensors"] == digest
    assert out["n_tensors"] == 1500 and out["dtype"] == "F32" and out["gated"] == "manual"
    assert server.downloaded_files(ranged=True) == ["sub/big.safetensors", "sub/big.safetensors"]
    assert server.downloaded_files(ranged=False) == []  # the header was read, the file never downloaded
    ranges = [r.headers["range"] for r in server.log if "range" in r.headers]
    assert ranges[0] == "bytes=0-100000" and ranges[1].startswith("bytes=8-")
    with pytest.raises(ValueError, match="gated must be"):
        server.set_gated("alice/headers", "yes")
