"""One guarded way to write a folder: nothing half-written, nothing replaced that was not asked for.

Kills at every rename of a save over an existing mixture, ``--overwrite`` for every command that writes a
folder (create, convert, train -o, space push --dry-run), the working directory, and a mixture whose
``experts/`` is a link to a shared LoRA collection.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import uuid
from pathlib import Path

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factories import save_expert, tiny_llama
from test_cli import assert_user_error, make_world, run

from xlora_hub import InvalidConfigError, XLoraConfig, XLoraModel, load_mixture
from xlora_hub.convert import export_mistralrs, export_peft
from xlora_hub.staging import stale_leftovers

TARGETS = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def experts(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("safe-experts")
    return {name: save_expert(tiny_llama, root / name, target_modules=TARGETS, seed=s) for s, name in enumerate("abc")}


def mixture(experts: dict[str, Path], names: str, *, seed: int, temperature: float = 1.0) -> XLoraModel:
    model = XLoraModel.from_experts(
        tiny_llama(),
        XLoraConfig(experts={n: str(experts[n]) for n in names}, softmax_temperature=temperature),
    )
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.classifier.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    return model


def files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".xlora-" in p.name or p.name.startswith(".."))


def state(model: XLoraModel) -> tuple:
    """What tells two mixtures apart: expert order, a setting and the classifier weights."""
    classifier = {k: v.clone() for k, v in model.classifier.state_dict().items()}
    return model.expert_names, model.xlora_config.softmax_temperature, classifier


def same_state(a: tuple, b: tuple) -> bool:
    return a[:2] == b[:2] and a[2].keys() == b[2].keys() and all(torch.equal(a[2][k], b[2][k]) for k in a[2])


# ---------------------------------------------------------------------------------------------- kills
def _save_and_die(model: XLoraModel, target: Path, kill_at: int, when: str) -> int:
    """In a forked child: save ``model`` over ``target`` and SIGKILL itself at the ``kill_at``-th rename (or
    replace) call, ``when`` = before/after it. Returns the child's number of rename calls when it was not killed.
    """
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            os.close(read)
            calls = [0]

            def counted(real):
                def call(*args, **kwargs):
                    calls[0] += 1
                    if calls[0] == kill_at and when == "before":
                        os.kill(os.getpid(), signal.SIGKILL)
                    result = real(*args, **kwargs)
                    if calls[0] == kill_at and when == "after":
                        os.kill(os.getpid(), signal.SIGKILL)
                    return result

                return call

            os.rename, os.replace = counted(os.rename), counted(os.replace)
            model.save_pretrained(target)
            os.write(write, str(calls[0]).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        reported = pipe.read()
    _, status = os.waitpid(pid, 0)
    if kill_at:
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, status
        return -1
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0, status
    return int(reported)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="kills a forked child")
def test_a_save_survives_a_kill_at_any_point(experts, tmp_path):
    """docs/format.md "nothing half-written": a save over an existing mixture killed (SIGKILL) before or after
    each of its renames leaves a folder that loads as the complete old or the complete new mixture (never
    `experts/a` gone, never a new classifier with the old config), and the next save removes every leftover."""
    old_model = mixture(experts, "ab", seed=1)
    new_model = mixture(experts, "ac", seed=2, temperature=0.5)
    old_ref = old_model.save_pretrained(tmp_path / "old-ref")
    new_files = files(new_model.save_pretrained(tmp_path / "new-ref"))
    old_files = files(old_ref)
    old_state, new_state = state(old_model), state(new_model)
    work = tmp_path / "work"
    work.mkdir()
    target = work / "mix"

    shutil.copytree(old_ref, target)
    renames = _save_and_die(new_model, target, 0, "never")
    assert renames >= 3  # the config's own atomic write, then the swap's renames
    assert files(target) == new_files and not leftovers(work)

    outcomes = []
    for kill_at in range(1, renames + 1):
        for when in ("before", "after"):
            shutil.rmtree(target)
            shutil.copytree(old_ref, target)
            _save_and_die(new_model, target, kill_at, when)
            on_disk = files(target) if target.exists() else None
            assert on_disk in (old_files, new_files, None), (kill_at, when, on_disk)
            if on_disk is None:  # killed between the first two renames of the swap: the backup is complete
                (backup,) = [p for p in work.iterdir() if ".xlora-old-" in p.name]
                assert files(backup) == old_files
            loaded = state(load_mixture(target, base_model=tiny_llama()))  # restores a missing target
            is_old, is_new = same_state(loaded, old_state), same_state(loaded, new_state)
            assert is_old != is_new, (kill_at, when)
            assert files(target) == (old_files if is_old else new_files)
            outcomes.append("old" if is_old else "new")
            new_model.save_pretrained(target)  # the next save cleans up
            assert not leftovers(work), (kill_at, when, leftovers(work))
            assert same_state(state(load_mixture(target, base_model=tiny_llama())), new_state)
    assert "old" in outcomes and "new" in outcomes


def test_leftovers_of_running_writers_are_kept_and_dead_ones_removed(experts, tmp_path):
    target = mixture(experts, "ab", seed=1).save_pretrained(tmp_path / "mix")
    mine = tmp_path / f".mix.xlora-tmp-{os.getpid()}-live"  # this process runs: a concurrent save's staging
    mine.mkdir()
    dead_pid = _dead_pid()
    dead = tmp_path / f".mix.xlora-tmp-{dead_pid}-gone"
    dead.mkdir()
    other = tmp_path / f".other.xlora-tmp-{dead_pid}-gone"  # another target's: not this save's business
    other.mkdir()
    assert stale_leftovers(target) == [dead]
    mixture(experts, "ab", seed=2).save_pretrained(target)
    assert mine.is_dir() and other.is_dir() and not dead.exists()


def _dead_pid() -> int:
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return pid


# ---------------------------------------------------------------------------------------------- library overwrite
def test_save_keeps_other_files_and_drops_only_the_old_mixtures_experts(experts, tmp_path):
    target = mixture(experts, "ab", seed=1).save_pretrained(tmp_path / "mix")
    (target / "notes.txt").write_text("mine")
    (target / "base_model").mkdir()
    (target / "base_model" / "config.json").write_text("{}")
    (target / "experts" / "spare").mkdir()  # a LoRA the user keeps there, not part of the mixture
    (target / "experts" / "spare" / "x.txt").write_text("x")
    mixture(experts, "ac", seed=2).save_pretrained(target)
    assert files(target) >= {"notes.txt", "base_model/config.json", "experts/spare/x.txt"}
    assert (target / "experts" / "c").is_dir() and not (target / "experts" / "b").exists()  # the old mixture's own
    assert (target / "notes.txt").read_text() == "mine"


def test_overwrite_false_refuses_a_folder_with_files(experts, tmp_path):
    folder = tmp_path / "taken"
    folder.mkdir()
    (folder / "keep.txt").write_text("keep")
    model = mixture(experts, "ab", seed=1)
    for write in (
        lambda: model.save_pretrained(folder, overwrite=False),
        lambda: export_peft(model, folder),  # exports refuse by default
        lambda: export_mistralrs(model, folder, base_model_id="owner/base"),
    ):
        with pytest.raises(InvalidConfigError, match=r"'.*taken' already exists and is not empty.*--overwrite"):
            write()
        assert os.listdir(folder) == ["keep.txt"]
    export_peft(model, folder, overwrite=True)  # asked for: the folder is replaced as a whole
    assert not (folder / "keep.txt").exists() and (folder / "adapter_config.json").is_file()
    assert not leftovers(tmp_path)


def test_the_working_directory_is_never_swapped(experts, tmp_path, monkeypatch):
    model = mixture(experts, "ab", seed=1)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    model.save_pretrained(".")  # empty: filled in place
    assert (here / "xlora_config.json").is_file() and not leftovers(tmp_path)
    with pytest.raises(InvalidConfigError, match=r"'.*here' is the working directory.*new folder"):
        model.save_pretrained(".")
    with pytest.raises(InvalidConfigError, match="above the working directory"):
        os.chdir(here / "experts")
        model.save_pretrained(here)
    assert files(here) == files(mixture(experts, "ab", seed=1).save_pretrained(tmp_path / "ref"))
    assert not leftovers(tmp_path)


def test_a_target_that_is_a_link_is_refused(experts, tmp_path):
    real = mixture(experts, "ab", seed=1).save_pretrained(tmp_path / "real")
    before = files(real)
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    with pytest.raises(InvalidConfigError, match=r"'.*link' is a symbolic link .*never writes through a link"):
        mixture(experts, "ac", seed=2).save_pretrained(tmp_path / "link")
    assert files(real) == before


def test_saving_into_a_mixture_whose_experts_folder_links_to_a_shared_collection(experts, tmp_path):
    """The link is replaced by the mixture's own ``experts/`` folder; the shared collection is not touched."""
    shared = tmp_path / "shared-loras"
    shutil.copytree(experts["a"], shared / "a")
    shutil.copytree(experts["b"], shared / "other")
    before = {p: (shared / p).read_bytes() for p in files(shared)}
    target = tmp_path / "mix"
    target.mkdir()
    (target / "experts").symlink_to(shared, target_is_directory=True)
    mixture(experts, "bc", seed=3).save_pretrained(target, overwrite=True)
    mixture(experts, "ab", seed=4).save_pretrained(target)  # a second save over it
    assert {p: (shared / p).read_bytes() for p in files(shared)} == before
    assert not (target / "experts").is_symlink() and sorted(os.listdir(target / "experts")) == ["a", "b"]
    assert load_mixture(target, base_model=tiny_llama()).expert_names == ["a", "b"]


# ---------------------------------------------------------------------------------------------- CLI --overwrite
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory.mktemp("safe-world"))


@pytest.fixture(scope="module")
def cli_mixture(world, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("safe-mix") / "mix"
    assert run_ok(["create", world.base, "--name", f"math={world.math}", "--name", f"code={world.code}", "-o", out])
    return out


def run_ok(argv) -> bool:
    from xlora_hub.cli import main

    return main([str(a) for a in argv] + ["-q"]) == 0


def occupied(folder: Path, experts: dict[str, Path]) -> Path:
    """A folder holding an older mixture (expert ``c`` bundled) and a file of the user's."""
    mixture(experts, "c", seed=5).save_pretrained(folder)
    (folder / "mine.txt").write_text("mine")
    return folder


@pytest.mark.parametrize("to", ["xlora-hub", "peft", "mistralrs"])
def test_convert_needs_overwrite_for_a_folder_with_files(cli_mixture, experts, tmp_path, capsys, to):
    dest = occupied(tmp_path / "dest", experts)
    before = files(dest)
    extra = ["--base-model-id", "owner/base"] if to == "mistralrs" else []
    assert_user_error(capsys, ["convert", str(cli_mixture), str(dest), "--to", to, *extra],
                      str(dest), "already exists and is not empty", "--overwrite")  # fmt: skip
    assert files(dest) == before
    code, _, err = run(capsys, "convert", cli_mixture, dest, "--to", to, *extra, "--overwrite", "-q")
    assert code == 0, err
    assert (dest / ("xlora_config.json" if to != "peft" else "adapter_config.json")).is_file()
    assert not (dest / "experts" / "c").exists()  # no stale expert folder mixed into the result
    assert (dest / "mine.txt").exists() == (to == "xlora-hub")  # a mixture is replaced in it; an export replaces all
    assert not leftovers(tmp_path)


def test_train_output_needs_overwrite(world, cli_mixture, experts, tmp_path, capsys):
    dest = occupied(tmp_path / "trained", experts)
    before = files(dest)
    train = ["train", str(cli_mixture), "--data", str(world.data), "--max-length", "16", "-o", str(dest)]
    assert_user_error(capsys, train, str(dest), "already exists and is not empty", "--overwrite")
    assert files(dest) == before
    code, out, err = run(capsys, *train, "--overwrite", "-q")
    assert code == 0, err
    assert XLoraModel.from_pretrained(dest).expert_names == ["math", "code"]
    assert (dest / "mine.txt").read_text() == "mine"  # replacing the mixture in it keeps the user's other files
    assert not (dest / "experts" / "c").exists()
    code, _, err = run(capsys, "train", dest, "--data", world.data, "--max-length", "16", "-o", dest, "-q")
    assert code == 0, err  # -o naming the mixture itself is training in place


def test_train_in_place_from_inside_the_mixture_is_refused_before_training(
    world, cli_mixture, tmp_path, capsys, monkeypatch
):
    mix = Path(shutil.copytree(cli_mixture, tmp_path / "mix"))
    before = {p: (mix / p).read_bytes() for p in files(mix)}
    monkeypatch.chdir(mix)
    message = assert_user_error(capsys, ["train", ".", "--data", str(world.data)], str(mix), "working directory")
    assert "Trained" not in message and {p: (mix / p).read_bytes() for p in files(mix)} == before


# ---------------------------------------------------------------------------------------------- Space dry run
@pytest.fixture(scope="module")
def hub_mixture(hub, experts) -> str:
    repo = f"alice/safe-space-{uuid.uuid4().hex[:8]}"
    mixture(experts, "ab", seed=1).push_to_hub(repo, token=hub.token, bundle_experts=True)
    return repo


def test_space_dry_run_never_deletes_a_folders_files(hub, hub_mixture, tmp_path, capsys, monkeypatch):
    dest = tmp_path / "space"
    (dest / "experts" / "stale").mkdir(parents=True)
    (dest / "mine.txt").write_text("mine")
    (dest / "experts" / "stale" / "adapter_config.json").write_text("{}")
    push = ["space", "push", hub_mixture, "alice/demo", "--token", hub.token, "--dry-run"]
    assert_user_error(capsys, [*push, str(dest)], str(dest), "already exists and is not empty", "--overwrite")
    assert files(dest) == {"mine.txt", "experts/stale/adapter_config.json"}

    monkeypatch.chdir(dest)  # `--dry-run .` in a folder with files: refused, nothing moved, nothing left over
    assert_user_error(capsys, [*push, "."], str(dest), "--overwrite")
    assert_user_error(capsys, [*push, ".", "--overwrite"], str(dest), "the working directory", "new folder")
    assert files(dest) == {"mine.txt", "experts/stale/adapter_config.json"} and not leftovers(tmp_path)

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)
    code, _, err = run(capsys, *push, ".")
    assert code == 0, err
    assert (empty / "app.py").is_file() and json.loads((empty / "xlora_space.json").read_text())["mixture"]
    assert os.getcwd() == str(empty) and not leftovers(tmp_path)

    monkeypatch.chdir(tmp_path)
    code, _, err = run(capsys, *push, dest, "--overwrite")
    assert code == 0, err
    assert (dest / "app.py").is_file() and not (dest / "mine.txt").exists() and not leftovers(tmp_path)
    code, _, err = run(capsys, "space", "push", hub_mixture, "alice/demo", "--overwrite")
    assert code == 2 and "--overwrite only applies with --dry-run" in err  # a usage error


def test_convert_module_import_needs_overwrite_for_a_folder_with_files(cli_mixture, experts, tmp_path, capsys):
    # `python -m xlora_hub.convert import` used to replace the mixture files of a non-empty OUTPUT unasked.
    from xlora_hub.convert import main as convert_main

    dest = occupied(tmp_path / "dest", experts)
    before = files(dest)
    assert convert_main(["import", str(cli_mixture), str(dest)]) == 1
    err = capsys.readouterr().err
    assert "already exists and is not empty" in err and "--overwrite" in err and str(dest) in err
    assert files(dest) == before
    assert convert_main(["import", str(cli_mixture), str(dest), "--overwrite"]) == 0
    capsys.readouterr()
    assert XLoraModel.from_pretrained(dest).expert_names == ["math", "code"]
    assert (dest / "mine.txt").read_text() == "mine"  # replacing the mixture in it keeps the user's other files


def test_saving_over_a_folder_holding_a_mount_point_is_refused(experts, tmp_path, monkeypatch):
    # A bind-mounted subfolder would be copied into the new folder and then emptied with the old one.
    target = occupied(tmp_path / "mix", experts)
    (target / "volume").mkdir()
    (target / "volume" / "data.txt").write_text("precious")
    before = files(target)
    real_ismount = os.path.ismount
    monkeypatch.setattr(os.path, "ismount", lambda p: Path(p) == target / "volume" or real_ismount(p))
    with pytest.raises(InvalidConfigError, match=r"volume'.*is a mount point inside the folder being replaced"):
        mixture(experts, "a", seed=6).save_pretrained(target)
    assert files(target) == before
    assert (target / "volume" / "data.txt").read_text() == "precious"
    assert not leftovers(tmp_path)
