"""``push_space`` against the tests' Hub server: the Space repo's files, its README front matter, updates, dry runs."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import gradio
import pytest
import torch
from huggingface_hub import HfApi, SpaceCard
from test_space_app import (
    EXPERTS,
    client,
    free_port,
    predict,
    reference,
    save_tiny_parts,
    tiny_mixture,
    wait_ready,
)

from xlora_hub import InvalidConfigError, InvalidMixtureError
from xlora_hub.space import SPACE_CONFIG_NAME, load_demo, push_space, space_target, spaces_app_dir

ROOT = Path(__file__).resolve().parent.parent


def _uid() -> str:
    return uuid.uuid4().hex[:8]


@pytest.fixture(scope="module")
def mixture_repo(hub, tmp_path_factory):
    """A mixture on the Hub whose experts live in their own Hub repos, over a base model made locally and
    recorded by its Hub copy (a local base folder is never published, see test_private_paths.py)."""
    base_dir, expert_dirs = save_tiny_parts(tmp_path_factory.mktemp("push-mixture"))
    api = HfApi(token=hub.token)
    uid = _uid()
    experts = {}
    for name, folder in expert_dirs.items():
        repo = api.create_repo(f"alice/space-expert-{name}-{uid}").repo_id
        api.upload_folder(repo_id=repo, folder_path=folder)
        experts[name] = repo
    model = tiny_mixture(base_dir, experts)
    base_repo = api.create_repo(f"alice/space-base-{uid}").repo_id
    api.upload_folder(repo_id=base_repo, folder_path=base_dir)
    repo = f"alice/space-mixture-{uid}"
    model.push_to_hub(repo, token=hub.token, base_model=base_repo)
    return repo, model


def _read(api: HfApi, repo: str, path: str) -> str:
    return Path(api.hf_hub_download(repo, path, repo_type="space")).read_text(encoding="utf-8")


def test_push_creates_then_updates_the_space(hub, mixture_repo):
    repo, model = mixture_repo
    api = HfApi(token=hub.token)
    space = f"alice/space-{_uid()}"
    first_sha = api.model_info(repo).sha

    url = push_space(repo, space, token=hub.token)
    assert url.endswith(f"/spaces/{space}")
    info = api.space_info(space)
    files = set(api.list_repo_files(space, repo_type="space"))
    assert {"app.py", "requirements.txt", "README.md", SPACE_CONFIG_NAME, "xlora_hub/space/__init__.py"} <= files
    assert _read(api, space, "app.py") == (spaces_app_dir() / "app.py").read_text(encoding="utf-8")
    assert "torch" in _read(api, space, "requirements.txt")
    assert json.loads(_read(api, space, SPACE_CONFIG_NAME))["revision"] == first_sha

    card = SpaceCard(_read(api, space, "README.md"))
    data = card.data
    assert (data.sdk, data.sdk_version, data.app_file) == ("gradio", gradio.__version__, "app.py")
    expert_repos = [ref.repo_id for ref in model.xlora_config.experts.values()]
    assert len(expert_repos) == len(EXPERTS) and all(expert_repos)
    base_repo = json.loads(Path(api.hf_hub_download(repo, "xlora_config.json")).read_text())["base_model"]["repo_id"]
    assert data.models == [repo, *expert_repos, base_repo]
    assert data.title and repo in card.text and first_sha in card.text

    # Someone adds a file; a vendored module of an older release is left over.
    api.upload_file(path_or_fileobj=b"mine", path_in_repo="notes.txt", repo_id=space, repo_type="space")
    api.upload_file(path_or_fileobj=b"", path_in_repo="xlora_hub/gone.py", repo_id=space, repo_type="space")
    # The mixture changes; a second push pins the Space to the new commit, in one commit.
    with torch.no_grad():
        model.classifier.layers[-1].bias.add_(1.0)
    model.push_to_hub(repo, token=hub.token, base_model=base_repo)
    second_sha = api.model_info(repo).sha
    assert second_sha != first_sha
    commits_before = len(api.list_repo_commits(space, repo_type="space"))

    push_space(repo, space, token=hub.token)
    assert len(api.list_repo_commits(space, repo_type="space")) == commits_before + 1
    assert json.loads(_read(api, space, SPACE_CONFIG_NAME))["revision"] == second_sha
    assert second_sha in SpaceCard(_read(api, space, "README.md")).text
    files = set(api.list_repo_files(space, repo_type="space"))
    assert "notes.txt" in files and "xlora_hub/gone.py" not in files
    assert api.space_info(space).sha != info.sha


def _requirements(lines) -> dict[str, str]:
    from packaging.requirements import Requirement

    reqs = [Requirement(line) for line in lines]
    return {req.name: str(req.specifier) for req in reqs}


def test_published_requirements_come_from_the_package_metadata(hub, mixture_repo, tmp_path):
    """The Space's requirements.txt is the installed package's dependencies plus its `demo` extra (gradio
    left to the README's sdk_version), as pyproject.toml declares them: nothing copied by hand."""
    from importlib import metadata

    from packaging.requirements import Requirement

    repo, _ = mixture_repo
    folder = Path(push_space(repo, "alice/unused", token=hub.token, dry_run_dir=tmp_path / "space"))
    text = (folder / "requirements.txt").read_text(encoding="utf-8")
    published = _requirements(line for line in text.splitlines() if line.strip() and not line.startswith("#"))
    declared = [Requirement(r) for r in metadata.requires("xlora-hub")]
    expected = {
        req.name: str(req.specifier)
        for req in declared
        if req.name != "gradio" and (req.marker is None or req.marker.evaluate({"extra": "demo"}))
    }
    assert published == expected
    assert {"torch", "transformers", "peft", "huggingface_hub", "safetensors", "matplotlib"} <= set(published)
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    in_pyproject = _requirements([*project["dependencies"], *project["optional-dependencies"]["demo"]])
    assert published == {name: spec for name, spec in in_pyproject.items() if name != "gradio"}


def test_push_to_a_revision_private_space(hub, mixture_repo):
    repo, _ = mixture_repo
    api = HfApi(token=hub.token)
    pinned = api.model_info(repo).sha
    space = f"alice/space-private-{_uid()}"
    push_space(repo, space, token=hub.token, private=True, revision=pinned)
    assert api.space_info(space).private is True
    assert json.loads(_read(api, space, SPACE_CONFIG_NAME)) == {
        "mixture": repo,
        "revision": pinned,
        "requested_revision": pinned,
    }


def test_dry_run_writes_a_folder_that_loads_the_pinned_mixture(hub, mixture_repo, tmp_path, monkeypatch):
    repo, model = mixture_repo
    api = HfApi(token=hub.token)
    space = f"alice/space-dry-{_uid()}"
    folder = push_space(repo, space, token=hub.token, dry_run_dir=tmp_path / "space", hardware="cpu-upgrade")
    assert Path(folder) == tmp_path / "space"
    assert not api.repo_exists(space, repo_type="space")
    assert SpaceCard.load(Path(folder) / "README.md").data.suggested_hardware == "cpu-upgrade"
    assert (Path(folder) / "xlora_hub" / "model.py").is_file()

    monkeypatch.delenv("XLORA_MIXTURE", raising=False)
    mixture, revision = space_target(folder)
    assert (mixture, revision) == (repo, api.model_info(repo).sha)
    loaded = load_demo(mixture, revision=revision)
    ids = torch.tensor([[5, 9, 14, 27]])
    torch.testing.assert_close(loaded.model(input_ids=ids).logits, model(input_ids=ids).logits)


def _preload(readme: Path) -> dict[str, tuple[list[str], str]]:
    """``{repo: (files, commit)}`` from a Space README's ``preload_from_hub`` lines (``REPO FILE,FILE COMMIT``)."""
    entries = {}
    for line in SpaceCard.load(readme).data.preload_from_hub:
        repo, files, commit = line.split(" ")
        entries[repo] = (files.split(","), commit)
    return entries


def test_space_preloads_every_repo_at_its_commit(hub, mixture_repo, tmp_path):
    """``preload_from_hub`` names the mixture, each expert and the base model, each pinned to the commit the Space
    uses, with the files the app reads; a cache holding just those files loads the Space's mixture offline."""
    repo, model = mixture_repo
    api = HfApi(token=hub.token)
    folder = Path(push_space(repo, "alice/unused", token=hub.token, dry_run_dir=tmp_path / "space"))
    readme = SpaceCard.load(folder / "README.md")
    entries = _preload(folder / "README.md")
    experts = list(model.xlora_config.experts.values())
    base_repo = json.loads(Path(api.hf_hub_download(repo, "xlora_config.json")).read_text())["base_model"]["repo_id"]
    assert list(entries) == [repo, *(e.repo_id for e in experts), base_repo] == readme.data.models
    assert entries[repo][1] == json.loads((folder / SPACE_CONFIG_NAME).read_text())["revision"]
    for ref in experts:
        assert entries[ref.repo_id][1] == (ref.revision or api.model_info(ref.repo_id).sha)
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(entries[ref.repo_id][0])
    assert entries[base_repo][1] == api.model_info(base_repo).sha
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(entries[base_repo][0])
    assert {"xlora_config.json", "xlora_classifier.safetensors"} <= set(entries[repo][0])
    for name, (files, commit) in entries.items():
        assert set(files) <= set(api.list_repo_files(name, revision=commit))
        assert ".gitattributes" not in files

    # What the Hub does at build time: download those files, at those commits, into the Space's cache.
    env = hub.env(tmp_path / "space-home")
    for name, (files, commit) in entries.items():
        for file in files:
            api.hf_hub_download(name, file, revision=commit, cache_dir=Path(env["HF_HOME"]) / "hub")
    env.update(HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    code = (
        "import sys, torch; from xlora_hub.space import space_target, load_demo; "
        "m, r = space_target(sys.argv[1]); d = load_demo(m, revision=r); "
        "print(d.model(input_ids=torch.tensor([[5, 9, 14, 27]])).logits.sum().item())"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder)], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    expected = model(input_ids=torch.tensor([[5, 9, 14, 27]])).logits.sum().item()
    assert float(proc.stdout.strip().splitlines()[-1]) == pytest.approx(expected, rel=1e-5)


def test_push_a_zero_gpu_space(hub, mixture_repo, tmp_path):
    """``space push --hardware zero-a10g`` (huggingface_hub's ZeroGPU flavor): the Space is created with that
    hardware requested, its README suggests it, its requirements install ``spaces``; a later push with other
    hardware requests that hardware for the existing Space."""
    from huggingface_hub import SpaceHardware

    from xlora_hub.cli import main

    repo, _ = mixture_repo
    api = HfApi(token=hub.token)
    space = f"alice/space-zero-{_uid()}"
    assert SpaceHardware.ZERO_A10G.value == "zero-a10g"
    assert main(["space", "push", repo, space, "--hardware", "zero-a10g", "--token", hub.token]) == 0
    assert api.get_space_runtime(space).requested_hardware == "zero-a10g"
    assert SpaceCard(_read(api, space, "README.md")).data.suggested_hardware == "zero-a10g"
    assert "spaces" in _requirements(
        line for line in _read(api, space, "requirements.txt").splitlines() if line.strip() and line[0] != "#"
    )
    push_space(repo, space, token=hub.token, hardware="cpu-basic")
    assert api.get_space_runtime(space).requested_hardware == "cpu-basic"


def test_bad_push_input_is_refused_before_anything_is_created(hub, mixture_repo, tmp_path):
    repo, _ = mixture_repo
    api = HfApi(token=hub.token)
    space = f"alice/space-bad-{_uid()}"
    with pytest.raises(InvalidMixtureError, match=r"Cannot load the mixture 'alice/nothing-here'.*no such repo"):
        push_space("alice/nothing-here", space, token=hub.token)
    with pytest.raises(InvalidConfigError, match="Unknown Space hardware 'h100-giant'"):
        push_space(repo, space, token=hub.token, hardware="h100-giant")
    with pytest.raises(InvalidConfigError, match="is a local folder"):
        push_space(str(tmp_path), space, token=hub.token)
    assert not api.repo_exists(space, repo_type="space")


@pytest.mark.slow
def test_the_wheel_ships_the_app_inside_the_package(tmp_path):
    """A built wheel has no top-level ``spaces_app`` package; the app's files are ``xlora_hub/space/app_files``."""
    import shutil
    import zipfile

    junk = shutil.ignore_patterns("build", "dist", ".git", ".venv*", "*.egg-info", "__pycache__", ".*_cache", "test-*")
    source = shutil.copytree(ROOT, tmp_path / "source", ignore=junk)  # no stale build/ of this checkout
    command = [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q"]
    subprocess.run([*command, "-w", str(tmp_path / "wheel")], check=True, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("xlora_hub-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert not [name for name in names if name.startswith("spaces_app/")]
    assert {"xlora_hub/space/app_files/app.py", "xlora_hub/space/app_files/README.md"} <= set(names)
    top_level = next(name for name in names if name.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["xlora_hub"]


@pytest.mark.slow
def test_the_pushed_space_runs(hub, mixture_repo, tmp_path):
    """The dry-run folder is a working Space: ``python app.py`` there (its own copy of xlora_hub) serves the
    pinned mixture, and its answer is the mixture's."""
    repo, model = mixture_repo
    folder = Path(push_space(repo, "alice/unused", token=hub.token, dry_run_dir=tmp_path / "space"))
    port = free_port()
    env = {**hub.env(tmp_path), "GRADIO_SERVER_PORT": str(port), "GRADIO_SERVER_NAME": "127.0.0.1"}
    env.pop("PYTHONPATH", None)
    log = open(tmp_path / "space.log", "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}/"
        started = time.monotonic()
        while proc.poll() is None and time.monotonic() - started < 240:
            try:
                wait_ready(url, timeout=2)
                break
            except TimeoutError:
                continue
        assert proc.poll() is None, (tmp_path / "space.log").read_text()[-3000:]
        from xlora_hub.hub import load_tokenizer

        tokenizer = load_tokenizer(repo)
        text = predict(client(url), "pushed", max_new_tokens=6, compare_base=False)[0]
        assert text == reference(model, tokenizer, "pushed", 6)["text"]
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
