"""Lockfile-grade expert pins, the card's model-tree metadata, and ``xlora-hub check``, through the test Hub server.

The real ``huggingface_hub`` client talks to ``tests/hub_server.py`` (``HF_ENDPOINT`` set by conftest.py). A pushed
mixture records each expert's weight file by the sha256 and size the Hub reports; a load checks the file it gets
against them; the experts' tensor headers are read remotely (ranged reads) so a misfit costs no download.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import uuid
from pathlib import Path

import pytest
import torch
import transformers
from huggingface_hub import ModelCard

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factories import save_expert, tiny_llama

from xlora_hub import (
    ExpertDigestError,
    ExpertRef,
    IncompatibleExpertError,
    InvalidConfigError,
    InvalidMixtureError,
    XLoraConfig,
    XLoraModel,
    load_mixture,
)
from xlora_hub.cli import main
from xlora_hub.hub import check_mixture

TARGETS = ["q_proj", "v_proj"]
IDS = torch.tensor([[1, 5, 9, 14, 27, 33]])
WEIGHTS = "adapter_model.safetensors"


def unique(name: str) -> str:
    return f"alice/{name}-{uuid.uuid4().hex[:8]}"


def seed_repo(hub, repo_id: str, folder: Path, *, prefix: str = "", card: str | None = None) -> str:
    hub.server.create_repo(repo_id)
    files = {prefix + str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    if card is not None:
        files["README.md"] = card.encode()
    return hub.server.commit_files(repo_id, files, author="alice")


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.fixture(scope="module")
def world(hub, tmp_path_factory):
    """A base on the Hub; experts `math` (apache-2.0) and `code` (mit, gated, in a subfolder); `wide`, an expert of
    a base with another hidden size; a mixture of math and code pushed with xlora-hub."""
    root = tmp_path_factory.mktemp("pins")
    tiny_llama().save_pretrained(root / "base")
    repos = {"base": unique("base"), "math": unique("math"), "code": unique("code"), "wide": unique("wide")}
    seed_repo(hub, repos["base"], root / "base")
    seed_repo(
        hub,
        repos["math"],
        save_expert(tiny_llama, root / "math", target_modules=TARGETS, seed=1),
        card="---\nlicense: apache-2.0\n---\n# math\n",
    )
    seed_repo(
        hub,
        repos["code"],
        save_expert(tiny_llama, root / "code", target_modules=TARGETS, seed=2),
        prefix="adapters/code/",
        card="---\nlicense: mit\n---\n# code\n",
    )
    hub.server.set_gated(repos["code"], "manual")
    wide_base = lambda: tiny_llama(hidden_size=48)  # noqa: E731
    seed_repo(hub, repos["wide"], save_expert(wide_base, root / "wide", target_modules=TARGETS, seed=3))

    cache = root / "cache"
    base = transformers.AutoModelForCausalLM.from_pretrained(repos["base"], cache_dir=cache).eval()
    config = XLoraConfig(experts={"math": repos["math"], "code": f"{repos['code']}:adapters/code"})
    model = XLoraModel.from_experts(base, config, cache_dir=cache)
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.classifier.parameters():
            param.normal_()
    model.save_pretrained(root / "mix")  # for the CLI push
    mixture = unique("mixture")
    hub.server.clear_requests()
    with _captured_warnings() as warned:
        model.push_to_hub(mixture, token=hub.token)
    push_log = list(hub.server.log)
    return dict(root=root, repos=repos, mixture=mixture, logits=logits(model), warned=warned, push_log=push_log)


class _captured_warnings:
    """The xlora_hub log warnings emitted inside the block (a module fixture cannot use caplog)."""

    def __enter__(self) -> list[str]:
        self.records: list[str] = []
        self.handler = logging.Handler(logging.WARNING)
        self.handler.emit = lambda record: self.records.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("xlora_hub").addHandler(self.handler)
        return self.records

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("xlora_hub").removeHandler(self.handler)


def pushed_config(hub, repo_id: str) -> dict:
    return json.loads(hub.server.get_file(repo_id, "xlora_config.json"))


def edited(hub, world, change) -> str:
    """A copy of the pushed mixture with its config edited by ``change``; returns its repo id."""
    repo_id = unique("edited")
    hub.server.create_repo(repo_id)
    src = world["mixture"]
    files = {f: hub.server.get_file(src, f) for f in hub.server.list_files(src)}
    config = json.loads(files["xlora_config.json"])
    change(config)
    files["xlora_config.json"] = json.dumps(config).encode()
    hub.server.commit_files(repo_id, files)
    return repo_id


def point_math_at_wide(hub, world):
    """A config edit: expert `math` becomes the `wide` expert at its commit, with its true digest and size."""
    wide = world["repos"]["wide"]
    data = hub.server.get_file(wide, WEIGHTS)
    lock = dict(repo_id=wide, revision=hub.server.head(wide), sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    return lambda c: c["experts"][0].update(lock)


def base_model(hub, world, cache: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(world["repos"]["base"], cache_dir=cache).eval()


# ---------------------------------------------------------------------------------------------- push
def test_push_records_each_experts_digest_and_the_card_places_the_mixture_under_its_base(hub, world):
    repos = world["repos"]
    experts = {e["name"]: e for e in pushed_config(hub, world["mixture"])["experts"]}
    assert pushed_config(hub, world["mixture"])["format_version"] == 2
    for name, path in (("math", WEIGHTS), ("code", f"adapters/code/{WEIGHTS}")):
        data = hub.server.get_file(repos[name], path)
        assert experts[name]["sha256"] == hashlib.sha256(data).hexdigest() and experts[name]["size"] == len(data)
        assert experts[name]["revision"] == hub.server.head(repos[name])

    card = ModelCard(hub.server.get_file(world["mixture"], "README.md").decode())
    assert card.data.base_model == repos["base"]  # exactly one id (a list would read as a merge)
    assert isinstance(card.data.base_model, str)
    assert card.data.base_model_relation == "adapter" and card.data.library_name == "xlora-hub"
    assert {"x-lora", "lora", "mixture-of-experts"} <= set(card.data.tags)
    math_sha, code_sha = hub.server.head(repos["math"]), hub.server.head(repos["code"])
    assert f"[{repos['math']}]({hub.url}/{repos['math']}/tree/{math_sha})" in card.text
    assert "| `apache-2.0` | open |" in card.text
    assert (
        f"{repos['code']}/tree/{code_sha}/adapters/code) | `{code_sha[:12]}` | adapters/code | `mit` | gated (manual) |"
        in card.text
    )
    assert "different licences (math: apache-2.0; code: mit)" in card.text
    assert "Expert `code` is gated (manual)" in card.text
    warned = " ".join(world["warned"])
    assert "different licences" in warned and "Expert 'code' is gated (manual)" in warned


def test_an_expert_card_with_a_list_of_licences_is_read_as_one_licence(hub, world, tmp_path):
    listed = unique("listed")
    folder = save_expert(tiny_llama, tmp_path / "listed", target_modules=TARGETS, seed=4)
    seed_repo(hub, listed, folder, card="---\nlicense:\n- mit\n- apache-2.0\n---\n# listed\n")
    base = transformers.AutoModelForCausalLM.from_pretrained(world["repos"]["base"], cache_dir=tmp_path / "c")
    config = XLoraConfig(experts={"math": world["repos"]["math"], "listed": listed})
    model = XLoraModel.from_experts(base, config, cache_dir=tmp_path / "c")
    mixture = unique("listed-mix")
    model.push_to_hub(mixture, token=hub.token)
    card = ModelCard(hub.server.get_file(mixture, "README.md").decode())
    assert "| `mit, apache-2.0` | open |" in card.text
    assert "different licences (math: apache-2.0; listed: mit, apache-2.0)" in card.text


def test_hub_requests_name_xlora_hub_in_their_user_agent(hub, world, tmp_path):
    from importlib.metadata import version

    agent = f"xlora-hub/{version('xlora-hub')}"
    api_calls = [r for r in world["push_log"] if r.path.startswith("/api/")]
    assert api_calls and all(agent in r.headers.get("user-agent", "") for r in api_calls)
    hub.server.clear_requests()
    load_mixture(world["mixture"], cache_dir=tmp_path / "c")
    ours = [r for r in hub.server.log if world["repos"]["base"] not in r.path]  # transformers loads the base
    assert {"xlora_config.json", "adapter_config.json", WEIGHTS} <= {r.path.rsplit("/", 1)[-1] for r in ours}
    assert all(agent in r.headers.get("user-agent", "") for r in ours)


def test_check_and_convert_detect_name_xlora_hub_in_their_user_agent(hub, world, tmp_path):
    from importlib.metadata import version

    from xlora_hub.convert.common import LoadOptions
    from xlora_hub.convert.detect import source_folder

    agent = f"xlora-hub/{version('xlora-hub')}"
    hub.server.clear_requests()
    assert check_mixture(world["mixture"], cache_dir=tmp_path / "c") == []
    requested = [r for r in hub.server.log if "/resolve/" in r.path]
    assert any(world["repos"]["base"] in r.path and r.path.endswith("/config.json") for r in requested)
    assert all(agent in r.headers.get("user-agent", "") for r in hub.server.log)
    hub.server.clear_requests()
    _, fmt = source_folder(world["mixture"], revision=None, options=LoadOptions(cache_dir=tmp_path / "d"))
    assert fmt == "xlora-hub"
    assert hub.server.log and all(agent in r.headers.get("user-agent", "") for r in hub.server.log)


def test_cli_push_warns_on_stderr_when_licences_differ_or_an_expert_is_gated(hub, world, capsys):
    repo_id = unique("cli-push")
    code = main(["push", str(world["root"] / "mix"), repo_id, "--token", hub.token])
    err = capsys.readouterr().err
    assert code == 0 and hub.server.repo_exists(repo_id)
    assert "xlora-hub: WARNING: The experts are under different licences (math: apache-2.0; code: mit)" in err
    assert "Expert 'code' is gated (manual)" in err


# ---------------------------------------------------------------------------------------------- load
def test_a_tampered_expert_file_fails_to_load_with_the_digest_error(hub, world, tmp_path):
    other = "0" * 64
    lying = edited(hub, world, lambda c: c["experts"][0].update(sha256=other))
    math_sha = hub.server.head(world["repos"]["math"])
    real = hashlib.sha256(hub.server.get_file(world["repos"]["math"], WEIGHTS)).hexdigest()
    with pytest.raises(ExpertDigestError, match=f"Expert 'math' .*@{math_sha}.*sha256 {real}.*recorded sha256 {other}"):
        load_mixture(lying, cache_dir=tmp_path / "a")

    # a cache (or a mirror) that serves other bytes under the pinned commit: same size, one byte changed
    cache = tmp_path / "b"
    torch.testing.assert_close(logits(load_mixture(world["mixture"], cache_dir=cache)), world["logits"])
    blob = next(p for p in cache.rglob(WEIGHTS) if world["repos"]["math"].split("/")[1] in str(p)).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))
    with pytest.raises(
        ExpertDigestError, match=f"sha256 {hashlib.sha256(bytes(data)).hexdigest()}.*recorded sha256 {real}"
    ):
        load_mixture(world["mixture"], cache_dir=cache)


def test_the_experts_adapter_config_is_pinned_too(hub, world, tmp_path):
    repos = world["repos"]
    config = pushed_config(hub, world["mixture"])
    assert config["format_version"] == 2
    experts = {e["name"]: e for e in config["experts"]}
    for name, path in (("math", "adapter_config.json"), ("code", "adapters/code/adapter_config.json")):
        data = hub.server.get_file(repos[name], path)
        assert experts[name]["config_sha256"] == hashlib.sha256(data).hexdigest()
        assert experts[name]["config_size"] == len(data)

    # a mirror serving another lora_alpha under the pinned commit: the same repo id, the commit rewritten
    mirror = unique("mirror")
    hub.server.create_repo(mirror)
    files = {f: hub.server.get_file(repos["math"], f) for f in hub.server.list_files(repos["math"])}
    adapter = json.loads(files["adapter_config.json"])
    adapter["lora_alpha"] = adapter["lora_alpha"] * 2
    files["adapter_config.json"] = json.dumps(adapter).encode()
    hub.server.commit_files(mirror, files)
    recorded = experts["math"]
    served = edited(hub, world, lambda c: c["experts"][0].update(repo_id=mirror, revision=hub.server.head(mirror)))
    real = recorded["config_sha256"]
    with pytest.raises(ExpertDigestError, match=f"Expert 'math' .*adapter_config.json .*recorded sha256 {real}"):
        load_mixture(served, cache_dir=tmp_path / "a")
    problems = check_mixture(served, cache_dir=tmp_path / "b")
    assert [p.subject for p in problems] == ["expert 'math'"] and "adapter_config.json" in problems[0].message

    # pins without the config's digest (pushed before it was recorded) still load
    def without(c):
        for entry in c["experts"]:
            entry.pop("config_sha256"), entry.pop("config_size")

    older = edited(hub, world, without)
    torch.testing.assert_close(logits(load_mixture(older, cache_dir=tmp_path / "c")), world["logits"], rtol=0, atol=0)


def test_a_mixture_in_the_previous_format_version_still_loads(hub, world, tmp_path):
    def to_version_1(config):
        config["format_version"] = 1
        for entry in config["experts"]:
            entry.pop("sha256"), entry.pop("size")

    old = edited(hub, world, to_version_1)
    assert pushed_config(hub, old)["format_version"] == 1
    torch.testing.assert_close(logits(load_mixture(old, cache_dir=tmp_path / "c")), world["logits"], rtol=0, atol=0)


def test_an_expert_that_does_not_fit_is_refused_before_its_weights_are_downloaded(hub, world, tmp_path):
    misfit = edited(hub, world, point_math_at_wide(hub, world))
    hub.server.clear_requests()
    with pytest.raises(IncompatibleExpertError, match="Expert 'math' does not fit this base model.*input size 32"):
        load_mixture(misfit, base_model=base_model(hub, world, tmp_path / "c"), cache_dir=tmp_path / "c")
    assert WEIGHTS in hub.server.downloaded_files(ranged=True)  # its header was read remotely
    assert WEIGHTS not in hub.server.downloaded_files(ranged=False)  # and the weights never downloaded
    assert not list((tmp_path / "c").rglob(WEIGHTS))


# ---------------------------------------------------------------------------------------------- check
def run_check(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["check", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def no_weights_downloaded(hub, cache: Path) -> bool:
    whole = [f for f in hub.server.downloaded_files(ranged=False) if f.endswith(".safetensors")]
    return not whole and not list(cache.rglob("*.safetensors"))


def test_check_exits_0_on_a_good_mixture_without_downloading_weights(hub, world, tmp_path, capsys):
    hub.server.clear_requests()
    code, out, _ = run_check(capsys, world["mixture"], "--cache-dir", str(tmp_path / "c"))
    assert code == 0 and out.strip().endswith(
        "ok (pins, digests, shapes, base model and layer order checked; no weights downloaded)"
    )
    assert no_weights_downloaded(hub, tmp_path / "c")
    assert {WEIGHTS, f"adapters/code/{WEIGHTS}", "xlora_classifier.safetensors"} <= set(
        hub.server.downloaded_files(ranged=True)
    )
    code, out, _ = run_check(
        capsys, world["mixture"], "--json", "--revision", "main", "--cache-dir", str(tmp_path / "c")
    )
    assert code == 0 and json.loads(out) == {
        "mixture": world["mixture"],
        "revision": "main",
        "ok": True,
        "problems": [],
    }


def test_check_exits_1_with_one_line_per_problem(hub, world, tmp_path, capsys):
    code_sha256 = "f" * 64

    def break_it(config):
        point_math_at_wide(hub, world)(config)  # shapes that no longer fit the base
        config["experts"][1]["sha256"] = code_sha256  # a digest the Hub's file does not have

    broken = edited(hub, world, break_it)
    hub.server.clear_requests()
    code, out, _ = run_check(capsys, broken, "--cache-dir", str(tmp_path / "c"))
    lines = out.strip().splitlines()
    assert code == 1 and len(lines) == 2, out
    assert lines[0].startswith(f"{broken}: expert 'math': Expert 'math' does not fit this base model")
    assert lines[1].startswith(f"{broken}: expert 'code': ") and f"recorded sha256 {code_sha256}" in lines[1]
    assert no_weights_downloaded(hub, tmp_path / "c")

    code, out, _ = run_check(capsys, broken, "--json", "--cache-dir", str(tmp_path / "c"))
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert [p["subject"] for p in report["problems"]] == ["expert 'math'", "expert 'code'"]


def test_check_reports_unrecorded_digests_and_a_layer_order_that_differs(hub, world, tmp_path):
    def old_and_reordered(config):
        config["format_version"] = 1
        for entry in config["experts"]:
            entry.pop("sha256"), entry.pop("size")
        config["layer_names"] = list(reversed(config["layer_names"]))

    problems = check_mixture(edited(hub, world, old_and_reordered), cache_dir=tmp_path / "c")
    assert [p.subject for p in problems] == ["expert 'math'", "expert 'code'", "layers"]
    assert all("no sha256/size of its weight file is recorded" in p.message for p in problems[:2])
    assert "the same layers in another order" in problems[2].message


def test_check_says_a_digest_it_cannot_compare_is_not_checked(hub, world, tmp_path):
    plain = unique("plain-git")
    hub.server.create_repo(plain)
    folder = world["root"] / "math"
    hub.server.commit_files(plain, {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}, lfs=False)
    data = (folder / WEIGHTS).read_bytes()
    lock = dict(repo_id=plain, revision=hub.server.head(plain), sha256=hashlib.sha256(data).hexdigest(), size=len(data))
    mixture = edited(hub, world, lambda c: c["experts"][0].update(lock))
    problems = check_mixture(mixture, cache_dir=tmp_path / "c")
    assert [p.subject for p in problems] == ["expert 'math'"]
    assert problems[0].message.startswith("cannot verify sha256 remotely:") and "not an LFS file" in problems[0].message
    assert f"only its size ({len(data):,d} bytes) was compared" in problems[0].message
    wrong_size = edited(hub, world, lambda c: c["experts"][0].update(lock, size=len(data) + 1))
    (problem,) = check_mixture(wrong_size, cache_dir=tmp_path / "c")
    assert "sha256 unknown (not an LFS file)" in problem.message and f"({len(data) + 1} bytes)" in problem.message


def test_check_a_mixture_that_records_no_base_takes_base_model(hub, world, tmp_path, capsys):
    no_base = edited(hub, world, lambda c: c.update(base_model=None))  # as a push from a local base records it
    hub.server.clear_requests()
    code, out, _ = run_check(capsys, no_base, "--cache-dir", str(tmp_path / "c"))
    assert code == 1 and "records no base model" in out and "--base-model" in out
    for base in (str(world["root"] / "base"), world["repos"]["base"]):  # a folder, a Hub id
        code, out, _ = run_check(capsys, no_base, "--base-model", base, "--cache-dir", str(tmp_path / "c"))
        assert code == 0, out
    assert no_weights_downloaded(hub, tmp_path / "c")
    wide = tmp_path / "wide"
    tiny_llama(hidden_size=48).config.save_pretrained(wide)  # config only: all check reads
    problems = check_mixture(no_base, base_model=wide, cache_dir=tmp_path / "c")
    assert problems and problems[0].subject == f"base model {str(wide)!r}" and "hidden size 48" in problems[0].message


def test_check_a_local_folder_and_a_hub_mixture_with_bundled_experts(hub, world, tmp_path):
    assert check_mixture(world["root"] / "mix", cache_dir=tmp_path / "c") == []
    bundled = unique("bundled")
    load_mixture(world["root"] / "mix", cache_dir=tmp_path / "c").push_to_hub(
        bundled, token=hub.token, bundle_experts=True
    )
    assert "experts/code/adapter_model.safetensors" in hub.server.list_files(bundled)
    hub.server.clear_requests()
    assert check_mixture(bundled, cache_dir=tmp_path / "d") == []
    assert "experts/code/adapter_model.safetensors" in hub.server.downloaded_files(ranged=True)
    assert no_weights_downloaded(hub, tmp_path / "d")


def test_push_refuses_an_expert_copy_that_is_not_the_hubs_file(hub, world, tmp_path):
    cache = tmp_path / "c"
    model = load_mixture(world["root"] / "mix", cache_dir=cache)  # a local folder records no digest yet
    blob = next(p for p in cache.rglob(WEIGHTS) if world["repos"]["math"].split("/")[1] in str(p)).resolve()
    data = bytearray(blob.read_bytes())
    data[-1] ^= 0x01
    blob.write_bytes(bytes(data))
    repo_id = unique("refused")
    with pytest.raises(InvalidMixtureError, match="Expert 'math': the copy this mixture was built with .* is not"):
        model.push_to_hub(repo_id, token=hub.token)
    assert not hub.server.repo_exists(repo_id)  # refused before anything was made


@pytest.mark.parametrize(
    "fields, message",
    [
        (dict(repo_id="a/b", sha256="ABC"), "`sha256` must be 64 lower-case hex digits, got 'ABC'"),
        (dict(repo_id="a/b", size=-1), r"`size` must be a byte count \(an integer >= 0\), got -1"),
        (dict(repo_id="a/b", size=True), "`size` must be a byte count"),
        (dict(path="experts/x", sha256="0" * 64), "is a local folder: `sha256`/`size` record a Hub file"),
        (dict(repo_id="a/b", config_sha256="xyz"), "`config_sha256` must be 64 lower-case hex digits, got 'xyz'"),
        (dict(repo_id="a/b", config_size=1.5), r"`config_size` must be a byte count \(an integer >= 0\)"),
    ],
)
def test_bad_digest_fields_are_refused_naming_the_field(fields, message):
    with pytest.raises(InvalidConfigError, match=message):
        ExpertRef(**fields)
    with pytest.raises(InvalidConfigError, match=message):
        XLoraConfig.from_dict({"format_version": 2, "experts": [{"name": "x", **fields}]})
