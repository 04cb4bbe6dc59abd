"""Files and paths that must not leave the machine: pushed configs and cards, the Space page, uploads to the
app, and a Hub checkpoint whose experts point at the downloader's own disk."""

from __future__ import annotations

import json
import os
import re
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import transformers
from factories import peft_reference, save_expert, tiny_llama

from xlora_hub import ExpertNotFoundError, XLoraConfig, XLoraModel
from xlora_hub.convert import import_mixture, save_peft_classifier
from xlora_hub.space import MAX_UPLOAD_BYTES

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TARGETS = ["q_proj", "v_proj"]


def absolute_paths(text: str, root: Path) -> list[str]:
    """Every spelling of a path on this machine in ``text``: the test's folder and any '/tmp/...'-like path."""
    found = [str(root)] if str(root) in text else []
    found += re.findall(r"(?<![\w.:/])/(?:tmp|home|root|work|var|Users)/[^\s'\"`)]*", text)
    return found


def local_mixture(root: Path, *, trained_on_local_base: bool = True) -> XLoraModel:
    """A mixture on a base model loaded from a local folder, with a local expert (bundled when saved)."""
    tiny_llama().save_pretrained(root / "base")
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    expert = save_expert(tiny_llama, root / "lora_math", target_modules=TARGETS, seed=1)
    if trained_on_local_base:  # peft records the folder the expert was trained on
        config = json.loads((expert / "adapter_config.json").read_text())
        config["base_model_name_or_path"] = str(root / "base")
        (expert / "adapter_config.json").write_text(json.dumps(config))
    return XLoraModel.from_experts(base, XLoraConfig(experts={"math": str(expert)}))


def pushed_text(hub, repo_id: str) -> dict[str, str]:
    return {
        path: hub.server.get_file(repo_id, path).decode("utf-8")
        for path in hub.server.list_files(repo_id)
        if path.endswith((".json", ".md"))
    }


def test_push_never_writes_a_local_path(hub, tmp_path, caplog):
    model = local_mixture(tmp_path)
    repo = f"alice/paths-{uuid.uuid4().hex[:6]}"
    with caplog.at_level("WARNING", logger="xlora_hub.hub"):
        model.push_to_hub(repo, token=hub.token, bundle_experts=True)
    assert "base_model=" in caplog.text and "--base-model" in caplog.text
    files = pushed_text(hub, repo)
    assert {"xlora_config.json", "README.md", "experts/math/adapter_config.json"} <= set(files)
    for path, text in files.items():
        assert not absolute_paths(text, tmp_path), (path, absolute_paths(text, tmp_path))
    assert json.loads(files["xlora_config.json"])["base_model"] is None
    loaded = XLoraModel.from_pretrained(repo, base_model=tiny_llama(), cache_dir=tmp_path / "c")
    assert loaded.expert_names == ["math"]

    # the user names the Hub copy of the base model: recorded (and pinned), still no path anywhere
    base_repo = f"alice/base-{uuid.uuid4().hex[:6]}"
    hub.server.create_repo(base_repo)
    model.push_to_hub(repo, token=hub.token, bundle_experts=True, base_model=base_repo)
    files = pushed_text(hub, repo)
    config = json.loads(files["xlora_config.json"])
    assert config["base_model"] == {"repo_id": base_repo, "revision": hub.server.head(base_repo)}
    assert f"`{base_repo}`" in files["README.md"]
    for path, text in files.items():
        assert not absolute_paths(text, tmp_path), path


def test_push_local_experts_writes_no_local_path(hub, tmp_path):
    model = local_mixture(tmp_path)
    repo = f"alice/own-{uuid.uuid4().hex[:6]}"
    model.push_to_hub(repo, token=hub.token, push_local_experts=True)
    for target in (repo, f"{repo}-math"):
        for path, text in pushed_text(hub, target).items():
            assert not absolute_paths(text, tmp_path), (target, path)


def test_pushed_expert_trained_on_the_mixtures_local_base_names_its_hub_copy(hub, tmp_path, caplog):
    """An expert trained on the folder the mixture's base was loaded from names the Hub copy of that base once
    it is pushed (``base_model=``), in its adapter config and its card, so loading the mixture does not warn
    that the expert was trained on another base; an expert trained elsewhere keeps no path."""
    model = local_mixture(tmp_path)
    base_repo = f"alice/base-{uuid.uuid4().hex[:6]}"
    hub.server.create_repo(base_repo)
    repo = f"alice/own-{uuid.uuid4().hex[:6]}"
    model.push_to_hub(repo, token=hub.token, push_local_experts=True, base_model=base_repo)
    files = pushed_text(hub, f"{repo}-math")
    assert json.loads(files["adapter_config.json"])["base_model_name_or_path"] == base_repo
    assert f"base_model: {base_repo}" in files["README.md"]
    with caplog.at_level("WARNING"):
        XLoraModel.from_pretrained(repo, base_model=tiny_llama(), cache_dir=tmp_path / "c")
    assert "was trained on" not in caplog.text

    other = local_mixture(tmp_path / "elsewhere", trained_on_local_base=False)
    config = json.loads((tmp_path / "elsewhere" / "lora_math" / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "some-other-base")
    (tmp_path / "elsewhere" / "lora_math" / "adapter_config.json").write_text(json.dumps(config))
    repo2 = f"alice/own-{uuid.uuid4().hex[:6]}"
    other.push_to_hub(repo2, token=hub.token, push_local_experts=True, base_model=base_repo)
    assert json.loads(pushed_text(hub, f"{repo2}-math")["adapter_config.json"])["base_model_name_or_path"] is None


def test_model_card_names_a_local_base_by_its_folder(tmp_path):
    from xlora_hub.hub import make_model_card

    model = local_mixture(tmp_path, trained_on_local_base=False)
    card = str(make_model_card(model.xlora_config))
    assert str(tmp_path) not in card and "folder `base`" in card


# ------------------------------------------------------------------------------------------ the Space page
@pytest.fixture(scope="module")
def local_app(tmp_path_factory):
    from test_space_app import save_tiny_mixture, start_app

    root = tmp_path_factory.mktemp("private-space")
    folder = save_tiny_mixture(root)
    demo, url = start_app(folder)
    yield root, url
    demo.close()


def test_space_page_shows_no_local_path(local_app):
    root, url = local_app
    config = json.loads((root / "mixture" / "xlora_config.json").read_text())
    assert config["base_model"]["repo_id"].startswith(str(root))  # the saved mixture does name its local base
    pages = {
        name: httpx.get(url + name, timeout=30).text
        for name in ("", "config", "gradio_api/info", "gradio_api/info?all_endpoints=true")
    }
    assert "mixture" in pages["config"] and "math" in pages["config"]  # the page is there, with its experts
    for name, text in pages.items():
        assert str(root) not in text, name
        assert not absolute_paths(text, root), (name, absolute_paths(text, root)[:3])
    assert "local folder" in pages["config"]


def test_space_refuses_large_uploads(local_app):
    _, url = local_app
    small = httpx.post(url + "gradio_api/upload", files={"files": ("a.txt", b"x" * 100)}, timeout=30)
    assert small.status_code == 200, small.text
    big = httpx.post(url + "gradio_api/upload", files={"files": ("big.bin", b"x" * (MAX_UPLOAD_BYTES * 8))}, timeout=30)
    assert big.status_code in (400, 413) and "maximum allowed size" in big.text, (big.status_code, big.text)


# ------------------------------------------------------------------------------------------ convert from the Hub
def upload(hub, folder: Path) -> str:
    repo_id = f"alice/peft-{uuid.uuid4().hex[:8]}"
    hub.server.create_repo(repo_id)
    hub.server.commit_files(
        repo_id, {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    )
    return repo_id


@pytest.fixture(scope="module")
def peft_checkpoint(tmp_path_factory) -> Path:
    """peft's own X-LoRA checkpoint: its `adapters` are the absolute paths of the experts on this machine."""
    root = tmp_path_factory.mktemp("peft-abs")
    experts = [save_expert(tiny_llama, root / f"e{i}", target_modules=TARGETS, seed=i + 1) for i in range(2)]
    reference = peft_reference(tiny_llama, experts)
    reference.save_pretrained(str(root / "peft"))
    save_peft_classifier(reference, root / "peft")
    adapters = json.loads((root / "peft" / "adapter_config.json").read_text())["adapters"]
    assert all(os.path.isabs(value) and Path(value).is_dir() for value in adapters.values())
    return root / "peft"


def with_adapters(folder: Path, tmp_path: Path, adapters: dict) -> Path:
    copy = tmp_path / "ckpt"
    copy.mkdir()
    for path in folder.iterdir():
        if path.is_file():
            (copy / path.name).write_bytes(path.read_bytes())
    config = json.loads((copy / "adapter_config.json").read_text())
    config["adapters"] = adapters
    (copy / "adapter_config.json").write_text(json.dumps(config))
    return copy


def test_hub_checkpoint_with_absolute_adapter_paths_is_refused(hub, peft_checkpoint, tmp_path):
    repo = upload(hub, peft_checkpoint)
    adapters = json.loads((peft_checkpoint / "adapter_config.json").read_text())["adapters"]
    with pytest.raises(
        ExpertNotFoundError, match=rf"expert '0' has the absolute path {re.escape(repr(adapters['0']))}"
    ):
        import_mixture(repo, base_model=tiny_llama(), cache_dir=tmp_path / "c")
    # the local folder is the user's own: its absolute paths still load
    assert import_mixture(peft_checkpoint, base_model=tiny_llama()).n_experts == 2
    # and the caller can say where the experts are
    model = import_mixture(repo, base_model=tiny_llama(), cache_dir=tmp_path / "c", adapters=adapters)
    assert model.n_experts == 2


@pytest.mark.parametrize(
    "value, message",
    [
        ("../../../../e0", r"path '../../../../e0' leaves the downloaded repo"),
        ("~/e0", "absolute path"),
        ("e0", "neither a folder"),
        ("0", "numbered"),
    ],
)
def test_hub_checkpoint_paths_must_stay_inside(hub, peft_checkpoint, tmp_path, monkeypatch, value, message):
    monkeypatch.chdir(peft_checkpoint.parent)  # "e0" is a folder of the working directory: never used
    adapters = json.loads((peft_checkpoint / "adapter_config.json").read_text())["adapters"]
    folder = with_adapters(peft_checkpoint, tmp_path, {"0": value, "1": adapters["1"]})
    if value == "0":
        (folder / "0").mkdir()
        (folder / "0" / "adapter_config.json").write_text("{}")
    repo = upload(hub, folder)
    with pytest.raises(ExpertNotFoundError, match=message) as info:
        import_mixture(repo, base_model=tiny_llama(), cache_dir=tmp_path / "c")
    assert "'0'" in str(info.value)


def test_hub_checkpoint_relative_expert_inside_is_used(hub, peft_checkpoint, tmp_path):
    adapters = json.loads((peft_checkpoint / "adapter_config.json").read_text())["adapters"]
    folder = with_adapters(peft_checkpoint, tmp_path, {"0": "experts/math", "1": "experts/code"})
    for name, source in (("math", adapters["0"]), ("code", adapters["1"])):
        (folder / "experts" / name).mkdir(parents=True)
        for file in Path(source).iterdir():
            (folder / "experts" / name / file.name).write_bytes(file.read_bytes())
    model = import_mixture(upload(hub, folder), base_model=tiny_llama(), cache_dir=tmp_path / "c")
    assert model.n_experts == 2 and all(str(tmp_path / "c") in str(e.local_dir) for e in model.experts)


def test_a_link_out_of_a_downloaded_checkpoint_is_never_followed(tmp_path):
    """A snapshot holding a link to a folder elsewhere (as a crafted cache could): refused, not imported."""
    from xlora_hub.convert.detect import expert_refs as _refs

    outside = save_expert(tiny_llama, tmp_path / "outside", target_modules=TARGETS, seed=1)
    snapshot = tmp_path / "snapshot"
    snapshot.mkdir()
    (snapshot / "evil").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ExpertNotFoundError, match=r"expert 'a' path 'evil' is a link that leaves"):
        _refs({"a": "evil"}, snapshot, what="checkpoint", subfolders=False, confined=True)
    (snapshot / "a").symlink_to(outside, target_is_directory=True)  # the original layout's <name>/ folder
    with pytest.raises(ExpertNotFoundError, match="has no a/adapter_config.json"):
        _refs(["a"], snapshot, what="checkpoint", subfolders=True, confined=True)
    # a local folder's links are its owner's choice
    assert _refs({"a": "evil"}, snapshot, what="checkpoint", subfolders=False)["a"].path == str(outside.resolve())
