"""Test session set-up: one Hub-compatible server on 127.0.0.1 that the real huggingface_hub client talks to.

``huggingface_hub`` reads ``HF_ENDPOINT``, ``HF_HOME`` and ``HF_HUB_DISABLE_XET`` when it is imported, so the
server is started and the variables are set here, at import time, before any test module imports transformers,
peft or huggingface_hub. The library itself never knows it is a test server.
"""

from __future__ import annotations

import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from hub_server import HubServer, client_env, hub_env, start_server  # noqa: E402

_SESSION_HOME = Path(tempfile.mkdtemp(prefix="xlora-hub-tests-"))
_SERVER = start_server()
_TOKENS = {"alice": "hf_alice_write", "alice_ro": "hf_alice_read", "bob": "hf_bob_write"}
_SERVER.add_user(_TOKENS["alice"], "alice", write=True)
_SERVER.add_user(_TOKENS["alice_ro"], "alice", write=False)
_SERVER.add_user(_TOKENS["bob"], "bob", write=True)
for _name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
    os.environ.pop(_name, None)
os.environ.update(hub_env(_SERVER, _SESSION_HOME / "hf_home"))
os.environ.pop("HF_TOKEN", None)  # anonymous unless a test passes a token
os.environ.setdefault("XLORA_HUB_CACHE", str(_SESSION_HOME / "xlora-hub-cache"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MPLBACKEND", "Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

# Every model in the suite is tiny: one thread is fastest, and two threads crawl when other processes
# share the cores (the OpenMP threads wait for each other at every op). Subprocesses choose their own.
torch.set_num_threads(1)


@dataclass
class Hub:
    """The session's Hub server and its users' tokens."""

    server: HubServer
    url: str
    token: str
    read_token: str
    other_token: str

    def env(self, tmp_path: Path, token: str | None = None) -> dict[str, str]:
        """Environment for a subprocess: same server, a fresh ``HF_HOME`` under ``tmp_path``."""
        env = client_env(self.server, Path(tmp_path) / "hf_home", token=token)
        env["XLORA_HUB_CACHE"] = os.environ["XLORA_HUB_CACHE"]
        return env


@pytest.fixture(scope="session")
def hub() -> Hub:
    return Hub(
        server=_SERVER,
        url=_SERVER.url,
        token=_TOKENS["alice"],
        read_token=_TOKENS["alice_ro"],
        other_token=_TOKENS["bob"],
    )


def pytest_sessionfinish(session, exitstatus):
    _SERVER.stop()
