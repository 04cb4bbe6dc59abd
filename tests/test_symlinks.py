"""One rule for symbolic links: nothing of a mixture is read through a link that leaves its folder.

A bundled expert folder or file, the config, the classifier, a ``./base_model`` folder and the README linked
outside are refused with an error naming the path (so they are never loaded, re-saved, uploaded by
``push --bundle-experts`` or shown on the demo page); links that stay inside are fine, and so is a Hub
download, whose snapshot files are links into the repo cache's ``blobs/``.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factories import save_expert, tiny_llama
from test_cli import assert_user_error

from xlora_hub import BaseModelRef, InvalidMixtureError, XLoraConfig, XLoraModel, load_mixture
from xlora_hub.paths import resolve_inside
from xlora_hub.space import read_model_card

TARGETS = ["q_proj", "v_proj"]
IDS = torch.tensor([[1, 5, 9, 14, 27, 33, 60, 2]])


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A mixture folder with two bundled experts, kept pristine (each test works on a copy)."""
    root = tmp_path_factory.mktemp("links")
    experts = {
        n: save_expert(tiny_llama, root / f"lora-{n}", target_modules=TARGETS, seed=s) for s, n in ((1, "a"), (2, "b"))
    }
    tiny_llama().save_pretrained(root / "base")
    config = XLoraConfig(experts={n: str(p) for n, p in experts.items()}, base_model=BaseModelRef(str(root / "base")))
    return XLoraModel.from_experts(tiny_llama(), config).save_pretrained(root / "pristine")


@pytest.fixture
def mix(saved, tmp_path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "mix"))


def move_out(path: Path, outside: Path) -> None:
    """Replace ``path`` by a link to a copy of it outside the mixture."""
    outside.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(path), str(outside))
    path.symlink_to(outside, target_is_directory=outside.is_dir())


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize(
    "inside, what",
    [
        ("experts/b", "Expert 'b': bundled folder"),
        ("experts/a/adapter_model.safetensors", "Expert 'a': bundled file"),
        ("experts/a/adapter_config.json", "Expert 'a': bundled file"),
        ("xlora_config.json", "Mixture"),
        ("xlora_classifier.safetensors", "Mixture"),
    ],
)
def test_a_link_out_of_the_mixture_is_refused(mix, tmp_path, inside, what):
    """docs/format.md "paths inside": a file or folder of the mixture linked outside it is never read."""
    outside = tmp_path / "elsewhere" / Path(inside).name
    move_out(mix / inside, outside)
    with pytest.raises(InvalidMixtureError) as info:
        load_mixture(mix, base_model=tiny_llama())
    message = str(info.value)
    assert what in message and str(mix / inside) in message and str(outside) in message
    assert "outside" in message and "Copy the files into the mixture" in message


def test_push_bundle_experts_refuses_an_expert_linked_outside(hub, mix, tmp_path, capsys):
    move_out(mix / "experts" / "b", tmp_path / "private" / "b")
    repo = f"alice/links-{uuid.uuid4().hex[:8]}"
    assert_user_error(capsys, ["push", str(mix), repo, "--bundle-experts", "--token", hub.token],
                      "experts/b", "outside")  # fmt: skip
    assert not HfApi(token=hub.token).repo_exists(repo)  # nothing was uploaded


def test_links_that_stay_inside_the_mixture_are_fine(mix, saved):
    shutil.rmtree(mix / "experts" / "b")
    (mix / "experts" / "b").symlink_to("a", target_is_directory=True)  # b reuses a's files
    (mix / "README.md").rename(mix / "CARD.md")
    (mix / "README.md").symlink_to("CARD.md")
    model = load_mixture(mix, base_model=tiny_llama())
    assert model.expert_names == ["a", "b"]
    assert read_model_card(mix) == (saved / "README.md").read_text(encoding="utf-8")


def test_a_readme_linked_outside_is_not_shown(mix, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("not for the demo page")
    (mix / "README.md").unlink()
    (mix / "README.md").symlink_to(secret)
    with pytest.raises(InvalidMixtureError, match=r"the model card .*README.md' is a symbolic link .*secret.txt"):
        read_model_card(mix)


def test_a_base_model_folder_linked_outside_is_refused(mix, tmp_path):
    import json

    tiny_llama().save_pretrained(tmp_path / "models" / "base")
    (mix / "base_model").symlink_to(tmp_path / "models" / "base", target_is_directory=True)
    config = json.loads((mix / "xlora_config.json").read_text())
    config["base_model"] = {"repo_id": "./base_model", "revision": None}
    (mix / "xlora_config.json").write_text(json.dumps(config))
    with pytest.raises(InvalidMixtureError, match=r"base model folder .*base_model' is a symbolic link"):
        XLoraModel.from_pretrained(mix)


def test_a_hub_download_whose_files_are_cache_links_loads(hub, mix, tmp_path):
    model = load_mixture(mix, base_model=tiny_llama())
    repo = f"alice/links-hub-{uuid.uuid4().hex[:8]}"
    model.push_to_hub(repo, token=hub.token)  # its experts were bundled: they stay bundled
    cache = tmp_path / "cache"
    loaded = load_mixture(repo, base_model=tiny_llama(), token=hub.token, cache_dir=cache)
    torch.testing.assert_close(logits(loaded), logits(model), rtol=0, atol=0)
    snapshot_file = Path(hf_hub_download(repo, "experts/a/adapter_model.safetensors", token=hub.token, cache_dir=cache))
    if os.name == "posix":  # huggingface_hub links snapshot files to ../../blobs/ where it can
        assert snapshot_file.is_symlink() and "blobs" in os.readlink(snapshot_file)


def test_resolve_inside(tmp_path):
    (tmp_path / "root" / "sub").mkdir(parents=True)
    (tmp_path / "out.txt").write_text("x")
    (tmp_path / "root" / "in.txt").write_text("x")
    (tmp_path / "root" / "sub" / "up").symlink_to("../in.txt")
    (tmp_path / "root" / "sub" / "away").symlink_to(tmp_path / "out.txt")
    assert resolve_inside(tmp_path / "root", "sub/up", what="File") == tmp_path / "root" / "sub" / "up"
    with pytest.raises(InvalidMixtureError, match=r"File '.*away' is a symbolic link .*out.txt"):
        resolve_inside(tmp_path / "root", "sub/away", what="File")
