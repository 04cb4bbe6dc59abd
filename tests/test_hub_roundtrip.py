"""Mixtures through a Hub: push, pin, load, inspect, private repos, offline use and failures.

Everything goes through the real ``huggingface_hub`` client and ``tests/hub_server.py`` (``HF_ENDPOINT`` is set by
conftest.py). Loads use a fresh ``cache_dir`` per test, so no cached copy hides a failure.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import sys
import uuid
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import HfApi, ModelCard
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factories import save_expert, tiny_llama
from hub_server import run_client

from xlora_hub import (
    ExpertNotFoundError,
    IncompatibleExpertError,
    InvalidMixtureError,
    XLoraConfig,
    XLoraModel,
    inspect_mixture,
    load_mixture,
)

SHA = re.compile(r"^[0-9a-f]{40}$")
IDS = torch.tensor([[1, 5, 9, 14, 27, 33, 60, 2], [1, 7, 7, 90, 3, 44, 12, 100]])
TARGETS = ["q_proj", "v_proj", "gate_proj"]
GENERATE = dict(input_ids=IDS[:1, :4], max_new_tokens=6, do_sample=False, pad_token_id=0)


def unique(name: str, owner: str = "alice") -> str:
    return f"{owner}/{name}-{uuid.uuid4().hex[:8]}"


def seed_repo(hub, repo_id: str, folder: Path, *, private: bool = False, prefix: str = "") -> str:
    """Create a repo on the server with the files of ``folder`` (under ``prefix``); return the commit sha."""
    if not hub.server.repo_exists(repo_id):
        hub.server.create_repo(repo_id, private=private)
    files = {prefix + str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    return hub.server.commit_files(repo_id, files, author="alice")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomise(model: XLoraModel, seed: int) -> XLoraModel:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.classifier.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return model


@pytest.fixture(autouse=True)
def _no_faults(hub):
    hub.server.clear_faults()
    yield
    hub.server.clear_faults()


@pytest.fixture(scope="module")
def world(hub, tmp_path_factory):
    """A base model and three experts in their own repos (one private, one in a subfolder)."""
    root = tmp_path_factory.mktemp("world")
    tiny_llama().save_pretrained(root / "base")
    dirs = {n: save_expert(tiny_llama, root / n, target_modules=TARGETS, seed=s) for n, s in (("math", 1), ("code", 2))}
    dirs["secret"] = save_expert(tiny_llama, root / "secret", target_modules=["q_proj"], seed=3)
    dirs["math_v2"] = save_expert(tiny_llama, root / "math_v2", target_modules=TARGETS, seed=4)
    repos = {"base": unique("base"), "math": unique("lora-math"), "code": unique("lora-code"), "secret": unique("s")}
    seed_repo(hub, repos["base"], root / "base")
    seed_repo(hub, repos["math"], dirs["math"])
    seed_repo(hub, repos["code"], dirs["code"], prefix="adapters/code/")
    seed_repo(hub, repos["secret"], dirs["secret"], private=True)
    return dict(root=root, dirs=dirs, repos=repos)


def hub_base(world, cache: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(world["repos"]["base"], cache_dir=cache).eval()


def hub_mixture(hub, world, cache: Path, *, seed: int = 0, secret: bool = False, **settings) -> XLoraModel:
    repos = world["repos"]
    experts = {"math": repos["math"], "code": f"{repos['code']}:adapters/code"}
    if secret:
        experts["secret"] = repos["secret"]
    model = XLoraModel.from_experts(
        hub_base(world, cache), XLoraConfig(experts=experts, **settings), token=hub.token, cache_dir=cache
    )
    return randomise(model, seed)


# ---------------------------------------------------------------------------------------------- round trip


def _config_lock(data: bytes) -> dict:
    """The ``config_sha256`` / ``config_size`` a push records for an expert's adapter_config.json."""
    return {"config_sha256": hashlib.sha256(data).hexdigest(), "config_size": len(data)}


def test_push_and_load_round_trip(hub, world, tmp_path):
    model = hub_mixture(hub, world, tmp_path / "cache", layerwise_scalings=True)
    repos = world["repos"]
    assert model.xlora_config.base_model.repo_id == repos["base"]
    repo_id = unique("mixture")
    info = model.push_to_hub(repo_id, token=hub.token)
    assert SHA.match(info.oid) and hub.server.head(repo_id) == info.oid
    files = hub.server.list_files(repo_id)
    assert {"README.md", "xlora_config.json", "xlora_classifier.safetensors"} <= set(files)
    assert not [f for f in files if f.startswith("experts/")]

    config = json.loads(hub.server.get_file(repo_id, "xlora_config.json"))
    pinned = {e["name"]: e for e in config["experts"]}
    math_bytes = hub.server.get_file(repos["math"], "adapter_model.safetensors")
    assert pinned["math"] == {
        "name": "math",
        "repo_id": repos["math"],
        "revision": hub.server.head(repos["math"]),
        "sha256": hashlib.sha256(math_bytes).hexdigest(),  # format version 2: the weight file's digest and size
        "size": len(math_bytes),
        **_config_lock(hub.server.get_file(repos["math"], "adapter_config.json")),  # and its adapter config's
    }
    assert (
        pinned["code"]["revision"] == hub.server.head(repos["code"]) and pinned["code"]["subfolder"] == "adapters/code"
    )
    assert config["base_model"] == {"repo_id": repos["base"], "revision": hub.server.head(repos["base"])}

    card = ModelCard(hub.server.get_file(repo_id, "README.md").decode())
    assert card.data.base_model == repos["base"] and card.data.library_name == "xlora-hub"
    assert {"x-lora", "lora", "mixture-of-experts"} <= set(card.data.tags)
    math_sha = hub.server.head(repos["math"])
    assert f"[{repos['math']}]({hub.url}/{repos['math']}/tree/{math_sha})" in card.text
    assert f"/{repos['code']}/tree/{hub.server.head(repos['code'])}/adapters/code)" in card.text

    hub.server.clear_requests()
    loaded = XLoraModel.from_pretrained(repo_id, cache_dir=tmp_path / "fresh")  # base model from the config
    downloaded = set(hub.server.downloaded_files())
    assert "README.md" not in downloaded
    assert {"xlora_config.json", "xlora_classifier.safetensors", "adapter_config.json"} <= downloaded
    assert {"adapters/code/adapter_model.safetensors", "model.safetensors"} <= downloaded
    assert not [f for f in downloaded if f.endswith((".bin", ".pt", ".md"))]
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    assert torch.equal(loaded.generate(**GENERATE), model.generate(**GENERATE))
    assert [e.commit_sha for e in loaded.experts] == [math_sha, hub.server.head(repos["code"])]


def test_pinned_experts_and_mixture_revisions(hub, world, tmp_path):
    repos = world["repos"]
    expert_repo = unique("lora-moving")
    first_expert_sha = seed_repo(hub, expert_repo, world["dirs"]["math"])
    base = hub_base(world, tmp_path / "cache")
    model = randomise(
        XLoraModel.from_experts(
            base, XLoraConfig(experts={"m": expert_repo, "c": repos["math"]}), cache_dir=tmp_path / "c"
        ),
        seed=1,
    )
    first = logits(model)
    repo_id = unique("mixture")
    first_commit = model.push_to_hub(repo_id, token=hub.token).oid

    seed_repo(hub, expert_repo, world["dirs"]["math_v2"])  # a new commit in the expert repo
    again = load_mixture(repo_id, cache_dir=tmp_path / "fresh1")
    torch.testing.assert_close(logits(again), first, rtol=0, atol=0)  # still the old, pinned weights

    moved = XLoraModel.from_experts(
        hub_base(world, tmp_path / "cache"),
        XLoraConfig(experts={"m": expert_repo, "c": repos["math"]}),
        cache_dir=tmp_path / "c2",
    )
    moved.classifier.load_state_dict(model.classifier.state_dict())
    assert (logits(moved) - first).abs().max() > 1e-3  # the unpinned ref would have changed
    pinned_by_hand = XLoraModel.from_experts(
        hub_base(world, tmp_path / "cache"),
        XLoraConfig(experts={"m": f"{expert_repo}@{first_expert_sha}", "c": repos["math"]}),
        cache_dir=tmp_path / "c3",
    )
    pinned_by_hand.classifier.load_state_dict(model.classifier.state_dict())
    torch.testing.assert_close(logits(pinned_by_hand), first, rtol=0, atol=0)  # "repo@sha" refs work too

    randomise(model, seed=2)
    second = logits(model)
    second_commit = model.push_to_hub(repo_id, token=hub.token, commit_message="retrained").oid
    assert second_commit != first_commit
    torch.testing.assert_close(logits(load_mixture(repo_id, cache_dir=tmp_path / "f2")), second, rtol=0, atol=0)
    old = load_mixture(repo_id, revision=first_commit, cache_dir=tmp_path / "f3")
    torch.testing.assert_close(logits(old), first, rtol=0, atol=0)


def test_branch_and_pull_request(hub, world, tmp_path):
    model = hub_mixture(hub, world, tmp_path / "cache")
    repo_id = unique("mixture")
    main_sha = model.push_to_hub(repo_id, token=hub.token).oid
    randomise(model, seed=9)
    dev = model.push_to_hub(repo_id, token=hub.token, branch="dev")
    assert hub.server.refs(repo_id)["refs/heads/main"] == main_sha
    assert hub.server.refs(repo_id)["refs/heads/dev"] == dev.oid
    pr = model.push_to_hub(repo_id, token=hub.token, create_pr=True)
    assert pr.pr_url and pr.pr_revision == "refs/pr/1"
    loaded = load_mixture(repo_id, revision="refs/pr/1", cache_dir=tmp_path / "fresh")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)


def test_inspect_hub_mixture_downloads_no_weights(hub, world, tmp_path):
    model = hub_mixture(hub, world, tmp_path / "cache", xlora_depth=2, xlora_size=8)
    repo_id = unique("mixture")
    model.push_to_hub(repo_id, token=hub.token)
    hub.server.clear_requests()
    summary = inspect_mixture(repo_id, cache_dir=tmp_path / "fresh")
    assert hub.server.downloaded_files() == ["xlora_config.json"]
    assert summary.source == repo_id and summary.commit == hub.server.head(repo_id)
    assert [(e.name, e.kind, e.pinned) for e in summary.experts] == [("math", "hub", True), ("code", "hub", True)]
    math_size = len(hub.server.get_file(world["repos"]["math"], "adapter_model.safetensors"))
    assert summary.experts[0].size_bytes == math_size and summary.experts[1].subfolder == "adapters/code"
    assert summary.classifier_size_bytes == len(hub.server.get_file(repo_id, "xlora_classifier.safetensors"))
    assert summary.base_model.repo_id == world["repos"]["base"]
    assert world["repos"]["math"] in str(summary)


# ---------------------------------------------------------------------------------------------- private repos
def test_private_mixture_and_private_expert(hub, world, tmp_path):
    model = hub_mixture(hub, world, tmp_path / "cache", secret=True)
    repo_id = unique("private-mixture")
    model.push_to_hub(repo_id, token=hub.token, private=True)
    assert HfApi(token=hub.token).model_info(repo_id).private
    expected = logits(model)
    for token in (hub.token, hub.read_token):
        loaded = load_mixture(repo_id, token=token, cache_dir=tmp_path / f"ok-{token}")
        torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    for token in (None, hub.other_token):  # the Hub's own error, not a traceback of ours
        with pytest.raises(RepositoryNotFoundError):
            load_mixture(repo_id, token=token, cache_dir=tmp_path / "denied")
    with pytest.raises(HfHubHTTPError) as info:  # a token the Hub does not know: unauthorised
        load_mixture(repo_id, token="hf_not_a_token", cache_dir=tmp_path / "denied")
    assert info.value.response.status_code == 401


def test_private_expert_without_token_names_the_expert(hub, world, tmp_path):
    model = hub_mixture(hub, world, tmp_path / "cache", secret=True)
    repo_id = unique("public-mixture")
    model.push_to_hub(repo_id, token=hub.token)
    base = hub_base(world, tmp_path / "cache")
    with pytest.raises(ExpertNotFoundError, match="Expert 'secret'.*pass `token=`") as info:
        load_mixture(repo_id, base_model=base, cache_dir=tmp_path / "fresh")
    assert isinstance(info.value.__cause__, RepositoryNotFoundError)


# ---------------------------------------------------------------------------------------------- local experts
def test_local_experts_are_bundled_pushed_or_refused(hub, world, tmp_path):
    dirs = world["dirs"]
    base = hub_base(world, tmp_path / "cache")
    config = XLoraConfig(experts={"math": world["repos"]["math"], "mine": str(dirs["math_v2"])})
    model = randomise(XLoraModel.from_experts(base, config, cache_dir=tmp_path / "cache"), seed=4)
    expected = logits(model)

    repo_id = unique("mixture")
    with pytest.raises(InvalidMixtureError, match="'mine'.*bundle_experts=True.*push_local_experts=True"):
        model.push_to_hub(repo_id, token=hub.token)
    assert not hub.server.repo_exists(repo_id)  # nothing was pushed

    model.push_to_hub(repo_id, token=hub.token, push_local_experts=True)
    expert_repo = f"{repo_id}-mine"
    assert set(hub.server.list_files(expert_repo)) >= {"adapter_config.json", "adapter_model.safetensors", "README.md"}
    config = json.loads(hub.server.get_file(repo_id, "xlora_config.json"))
    mine_bytes = (dirs["math_v2"] / "adapter_model.safetensors").read_bytes()
    assert config["experts"][1] == {
        "name": "mine",
        "repo_id": expert_repo,
        "revision": hub.server.head(expert_repo),
        "sha256": hashlib.sha256(mine_bytes).hexdigest(),
        "size": len(mine_bytes),
        **_config_lock(hub.server.get_file(expert_repo, "adapter_config.json")),  # the config as pushed there
    }
    assert expert_repo in hub.server.get_file(repo_id, "README.md").decode()
    torch.testing.assert_close(logits(load_mixture(repo_id, cache_dir=tmp_path / "f1")), expected, rtol=0, atol=0)

    bundled_repo = unique("bundled")
    model.push_to_hub(bundled_repo, token=hub.token, bundle_experts=True)
    files = hub.server.list_files(bundled_repo)
    assert {
        f"experts/{n}/{f}" for n in ("math", "mine") for f in ("adapter_config.json", "adapter_model.safetensors")
    } <= set(files)
    # the bundled mixture needs no expert repo: delete the one it came from
    HfApi(token=hub.token).delete_repo(expert_repo)
    loaded = load_mixture(bundled_repo, cache_dir=tmp_path / "f2")
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)
    # pushing a loaded bundled mixture keeps its experts bundled, with no flag needed
    again = unique("bundled-again")
    loaded.push_to_hub(again, token=hub.token)
    assert "experts/mine/adapter_model.safetensors" in hub.server.list_files(again)
    # pushing references over a bundled mixture deletes the stale copies in the same commit
    model.push_to_hub(bundled_repo, token=hub.token, push_local_experts=True)
    assert not [f for f in hub.server.list_files(bundled_repo) if f.startswith("experts/")]


def test_local_files_only_from_the_cache_while_every_request_fails(hub, world, tmp_path):
    model = hub_mixture(hub, world, tmp_path / "cache", xlora_depth=2, xlora_size=8)
    repo_id = unique("mixture")
    model.push_to_hub(repo_id, token=hub.token)
    load_mixture(repo_id, cache_dir=tmp_path / "c")  # fills the cache
    hub.server.set_fault("/", "500")  # every request to the server fails from now on
    hub.server.clear_requests()
    loaded = load_mixture(repo_id, cache_dir=tmp_path / "c", local_files_only=True)
    assert hub.server.requests == []
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    with pytest.raises(ExpertNotFoundError, match="Expert 'math'.*not in the local cache"):  # a fresh cache
        XLoraModel.from_experts(tiny_llama(), model.xlora_config, cache_dir=tmp_path / "empty", local_files_only=True)


@pytest.mark.slow
def test_local_files_only_in_a_fresh_process_with_the_hub_unreachable(hub, world, tmp_path):
    model = hub_mixture(hub, world, tmp_path / "cache")
    repo_id = unique("mixture")
    model.push_to_hub(repo_id, token=hub.token)
    home = tmp_path / "home"
    load_mixture(repo_id, cache_dir=home / "hub")  # fills the cache of a fresh HF_HOME
    torch.save(logits(model), tmp_path / "expected.pt")
    env = hub.env(tmp_path)
    env.update(HF_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there
    code = f"""
import torch
from xlora_hub import XLoraModel
model = XLoraModel.from_pretrained({repo_id!r}, local_files_only=True)
ids = torch.tensor({IDS.tolist()})
with torch.no_grad():
    out = model(input_ids=ids).logits
emit(bool(torch.equal(out, torch.load({str(tmp_path / "expected.pt")!r}))))
"""
    assert run_client(code, env, timeout=300) is True


# ---------------------------------------------------------------------------------------------- failures
@pytest.fixture(scope="module")
def pushed(hub, world, tmp_path_factory):
    cache = tmp_path_factory.mktemp("pushed-cache")
    model = hub_mixture(hub, world, cache)
    repo_id = unique("mixture")
    model.push_to_hub(repo_id, token=hub.token)
    return dict(repo_id=repo_id, logits=logits(model))


def edited_mixture(hub, pushed, change) -> str:
    """A copy of the pushed mixture with its config edited by ``change``; returns its repo id."""
    repo_id = unique("edited")
    hub.server.create_repo(repo_id)
    files = {f: hub.server.get_file(pushed["repo_id"], f) for f in hub.server.list_files(pushed["repo_id"])}
    config = json.loads(files["xlora_config.json"])
    change(config)
    files["xlora_config.json"] = json.dumps(config).encode()
    hub.server.commit_files(repo_id, files)
    return repo_id


def no_snapshot_of(cache: Path, path_in_repo: str) -> bool:
    name = Path(path_in_repo).name
    return not [p for p in cache.rglob(name) if "snapshots" in p.parts and p.as_posix().endswith("/" + path_in_repo)]


def test_missing_expert_repo_names_the_expert(hub, world, pushed, tmp_path):
    repo_id = edited_mixture(hub, pushed, lambda c: c["experts"][0].update(repo_id="alice/does-not-exist"))
    with pytest.raises(ExpertNotFoundError, match="Expert 'math'.*'alice/does-not-exist' was not found"):
        load_mixture(repo_id, base_model=tiny_llama(), cache_dir=tmp_path / "c")


def test_pinned_revision_that_does_not_exist(hub, world, pushed, tmp_path):
    repo_id = edited_mixture(hub, pushed, lambda c: c["experts"][1].update(revision="0" * 40))
    with pytest.raises(ExpertNotFoundError, match="Expert 'code': revision '0{40}' does not exist"):
        load_mixture(repo_id, base_model=tiny_llama(), cache_dir=tmp_path / "c")
    with pytest.raises(RevisionNotFoundError):
        load_mixture(pushed["repo_id"], revision="no-such-branch", cache_dir=tmp_path / "c")


def test_hub_config_bad_input(hub, pushed, tmp_path):
    bad_version = edited_mixture(hub, pushed, lambda c: c.update(format_version=3))
    with pytest.raises(InvalidMixtureError, match="format_version 3 is not supported"):
        load_mixture(bad_version, cache_dir=tmp_path / "c")
    escaping = edited_mixture(hub, pushed, lambda c: c["experts"][1].update(subfolder="../../etc"))
    with pytest.raises(InvalidMixtureError, match="escapes the mixture"):
        load_mixture(escaping, cache_dir=tmp_path / "c")
    assert no_snapshot_of(tmp_path / "c", "xlora_classifier.safetensors")  # rejected before any weight download
    with pytest.raises(RepositoryNotFoundError):
        load_mixture("alice/no-such-mixture", cache_dir=tmp_path / "c")
    empty = unique("empty")
    hub.server.create_repo(empty)
    with pytest.raises(InvalidMixtureError, match="has no xlora_config.json.*import_mixture"):
        load_mixture(empty, cache_dir=tmp_path / "c")


def test_hub_expert_with_only_a_pickle_file(hub, world, tmp_path):
    repo = unique("pickle-expert")
    hub.server.create_repo(repo)
    folder = world["dirs"]["math"]
    hub.server.commit_files(
        repo,
        {
            "adapter_config.json": (folder / "adapter_config.json").read_bytes(),
            "adapter_model.bin": b"\x80\x04pickled",
        },
    )
    with pytest.raises(IncompatibleExpertError, match="safetensors only"):
        XLoraModel.from_experts(tiny_llama(), XLoraConfig(experts={"p": repo}), cache_dir=tmp_path / "c")
    assert not [p for p in (tmp_path / "c").rglob("adapter_model.bin")]  # never downloaded


@pytest.mark.parametrize(
    "target, kind",
    [
        ("xlora_classifier.safetensors", "500"),
        ("adapter_model.safetensors", "truncate"),
        # the client retries lost connections with back-off (about 5 s each)
        pytest.param("adapters/code/adapter_model.safetensors", "drop", marks=pytest.mark.slow),
        pytest.param("xlora_classifier.safetensors", "reset", marks=pytest.mark.slow),
    ],
)
def test_server_failures_leave_no_partial_state(hub, pushed, tmp_path, target, kind):
    cache = tmp_path / "cache"
    hub.server.set_fault(target, kind, method="GET")
    base = tiny_llama()
    with pytest.raises((OSError, InvalidMixtureError)) as info:  # HfHubHTTPError and ConnectionError are OSErrors
        load_mixture(pushed["repo_id"], base_model=base, cache_dir=cache)
    assert Path(target).name in str(info.value) or "expert" in str(info.value) or "500" in str(info.value)
    assert not any(isinstance(m, torch.nn.Module) and type(m).__name__.startswith("Lora") for m in base.modules())
    assert no_snapshot_of(cache, target)  # a failed download never becomes a cached file
    hub.server.clear_faults()
    loaded = load_mixture(pushed["repo_id"], base_model=tiny_llama(), cache_dir=cache)  # the same cache recovers
    torch.testing.assert_close(logits(loaded), pushed["logits"], rtol=0, atol=0)


def test_pushing_a_mixture_on_a_local_base_model_warns(hub, world, tmp_path, caplog):
    tiny_llama().save_pretrained(tmp_path / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    model = XLoraModel.from_experts(base, XLoraConfig(experts={"math": world["repos"]["math"]}), cache_dir=tmp_path)
    repo_id = unique("local-base")
    with caplog.at_level("WARNING", logger="xlora_hub.hub"):
        model.push_to_hub(repo_id, token=hub.token)
    assert f"local folder {str(tmp_path / 'base')!r}" in caplog.text and "base_model=" in caplog.text
    loaded = load_mixture(repo_id, base_model=tiny_llama(), cache_dir=tmp_path / "fresh")
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
