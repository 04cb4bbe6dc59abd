"""The embedded default mixture: what it scores, that it is reproducible, cached, laid out and pushable.

The full build (about two minutes on one core) is made once per session in the session's
``XLORA_HUB_CACHE`` and shared with every other test that loads the demo; the tests that need it are
``slow``. The quick tests use a small recipe that builds in seconds.

The scores are checked two ways. A machine that reproduces the recorded build (its weights digest is
``REFERENCE_WEIGHTS_SHA256``) must reproduce the recorded table exactly. Any other build must keep the
margin that builds with other seeds and kernels all keep (benchmarks/results/demo_seeds.md).
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest
import torch

from xlora_hub import XLoraModel
from xlora_hub.demo import (
    BUILD_INFO_NAME,
    LORA_TARGETS,
    REFERENCE_WEIGHTS_SHA256,
    SMALL_RECIPE,
    TASKS,
    build_demo_mixture,
    canonicalize_safetensors_header,
    demo_mixture_path,
    evaluate_demo_mixture,
    load_demo_mixture,
    make_task_examples,
    push_demo_mixture,
    read_build_info,
    weights_digest,
)

SMALL = SMALL_RECIPE


# The recorded build (seed 0, n_per_task=100): per task, the mixture's and its own expert's exact match
# and the routing accuracy, in examples out of 100.
REFERENCE_SCORES = {"add": (99, 99, 100), "rev": (100, 100, 100), "up": (98, 100, 100), "cnt": (100, 100, 100)}
MIXTURE_MARGIN = 0.05
"""How far below its own expert the mixture may score on a build that is not the recorded one (see above)."""


@pytest.fixture(scope="session")
def demo_folder():
    return build_demo_mixture(progress=False)


def _scores(report) -> dict[str, tuple[int, int, int]]:
    return {t.task: (round(100 * t.mixture), round(100 * t.own_expert), round(100 * t.routing)) for t in report.tasks}


def _file_bytes(folder: Path) -> dict[str, bytes]:
    """Every file of a build but its build record (which holds timings), by relative path."""
    return {
        p.relative_to(folder).as_posix(): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != BUILD_INFO_NAME
    }


def _logits(model, tokenizer, texts: list[str]) -> torch.Tensor:
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**batch).logits


# ---------------------------------------------------------------------------------------------- the real mixture
@pytest.mark.slow
def test_demo_mixture_routes_and_matches_its_experts(demo_folder):
    info = read_build_info(demo_folder)
    print(f"\ndemo mixture build: {info['build_seconds']} s {info['phase_seconds']}")
    report = evaluate_demo_mixture(n_per_task=100)  # prints the table (pytest -s shows it)
    assert [t.task for t in report.tasks] == list(TASKS)
    if info["weights_sha256"] == REFERENCE_WEIGHTS_SHA256:  # this machine reproduced the recorded build
        assert _scores(report) == REFERENCE_SCORES, report.format()  # the same weights and kernels: exactly
    else:
        print(
            f"this machine built other weights than the recorded build (digest {info['weights_sha256'][:12]}, "
            f"recorded {REFERENCE_WEIGHTS_SHA256[:12]}): its kernels or library versions differ; checking the margin"
        )
    for t in report.tasks:
        assert t.routing >= 0.9, report.format()
        assert t.own_expert >= 0.9, report.format()
        assert t.mixture >= t.own_expert - MIXTURE_MARGIN, report.format()
        assert t.mixture >= t.base + 0.7, report.format()  # far above the base model
        assert t.base <= 0.05, report.format()
        others = [score for name, score in t.experts.items() if name != t.task]
        assert max(others) <= 0.2, report.format()  # each expert knows its own task only
    assert report.routing_accuracy >= 0.9


@pytest.mark.slow
def test_demo_mixture_layout_and_cache(demo_folder):
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((demo_folder / "xlora_config.json").read_text())
    assert [e["name"] for e in config["experts"]] == list(TASKS)
    assert [e["path"] for e in config["experts"]] == [f"experts/{t}" for t in TASKS]
    assert config["base_model"] == {"repo_id": "./base_model"}
    for task in TASKS:  # each expert is a plain peft adapter folder
        assert PeftConfig.from_pretrained(str(demo_folder / "experts" / task)).r == 8
    _assert_exportable(demo_folder)
    tokenizer = AutoTokenizer.from_pretrained(demo_folder / "base_model")
    base = AutoModelForCausalLM.from_pretrained(demo_folder / "base_model")
    assert type(base).__name__ == "LlamaForCausalLM"
    assert tokenizer.decode(tokenizer("rev:ABC=")["input_ids"]) == "rev:ABC="

    # A second call reuses the cached build: same folder, untouched.
    stamp = (demo_folder / BUILD_INFO_NAME).stat().st_mtime_ns
    model, tokenizer = load_demo_mixture(progress=False)
    assert (demo_folder / BUILD_INFO_NAME).stat().st_mtime_ns == stamp
    example = make_task_examples("up", 1, seed=99)[0]
    ids = tokenizer(example["prompt"], return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True) == example["completion"]


@pytest.mark.slow
def test_full_build_is_bitwise_reproducible(demo_folder, tmp_path):
    digest = weights_digest(demo_folder)
    assert digest == read_build_info(demo_folder)["weights_sha256"]
    if digest == REFERENCE_WEIGHTS_SHA256:
        return  # an earlier build, recorded in the code, made the same weights: no need for a second build here
    again = build_demo_mixture(cache_dir=tmp_path, progress=False)  # other kernels: at least this machine repeats
    assert weights_digest(again) == digest
    assert _file_bytes(again) == _file_bytes(demo_folder)


# ---------------------------------------------------------------------------------------------- quick recipe
def _assert_exportable(folder: Path) -> None:
    """What mistral.rs needs of a build: LoRA on the Linear projections only (it drops embedding LoRA), a
    top-level `rope_theta` next to transformers 5's `rope_parameters`, a `Sequence[ByteFallback, Fuse]` decoder."""
    from safetensors import safe_open

    for task in TASKS:
        adapter = json.loads((folder / "experts" / task / "adapter_config.json").read_text())
        assert adapter["target_modules"] == sorted(LORA_TARGETS) and "embed_tokens" not in adapter["target_modules"]
        with safe_open(str(folder / "experts" / task / "adapter_model.safetensors"), framework="pt") as handle:
            keys = list(handle.keys())
        assert keys and not [k for k in keys if "embed" in k or "lm_head" in k]
    config = json.loads((folder / "base_model" / "config.json").read_text())
    assert config["rope_theta"] == config["rope_parameters"]["rope_theta"] == 10000.0
    for where in (folder / "base_model", folder):  # the base model's tokenizer and the mixture's copy
        decoder = json.loads((where / "tokenizer.json").read_text())["decoder"]
        assert decoder == {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}


def test_small_build_is_exportable_and_decodes_as_before(tmp_path):
    """The build's base folder as mistral.rs reads it, and the new decoder decodes every token list exactly as the
    bare `Fuse` of recipe v2 did (each token alone, every pair, and seeded random lists, special tokens kept or
    skipped)."""
    import random

    from tokenizers import Tokenizer, decoders

    folder = build_demo_mixture(cache_dir=tmp_path, recipe=SMALL, progress=False)
    _assert_exportable(folder)
    new = Tokenizer.from_file(str(folder / "base_model" / "tokenizer.json"))
    old = Tokenizer.from_file(str(folder / "base_model" / "tokenizer.json"))
    old.decoder = decoders.Fuse()
    size = new.get_vocab_size()
    rng = random.Random(0)
    lists = [[i] for i in range(size)] + [[i, j] for i in range(size) for j in range(size)]
    lists += [[rng.randrange(size) for _ in range(rng.randint(1, 30))] for _ in range(500)]
    for skip in (True, False):
        assert new.decode_batch(lists, skip_special_tokens=skip) == old.decode_batch(lists, skip_special_tokens=skip)
    assert new.decode(new.encode("rev:ABC=").ids) == "rev:ABC="


def test_small_build_is_reproducible_and_atomic(tmp_path):
    torch.set_num_threads(2)
    first = build_demo_mixture(cache_dir=tmp_path / "a", recipe=SMALL, progress=False)
    second = build_demo_mixture(cache_dir=tmp_path / "b", recipe=SMALL, progress=False)
    other_seed = build_demo_mixture(seed=1, cache_dir=tmp_path / "a", recipe=SMALL, progress=False)
    assert first == demo_mixture_path(cache_dir=tmp_path / "a", recipe=SMALL) != demo_mixture_path(cache_dir=tmp_path)
    assert weights_digest(first) == weights_digest(second) == read_build_info(first)["weights_sha256"]
    assert weights_digest(other_seed) != weights_digest(first)
    assert torch.get_num_threads() == 2 and not torch.are_deterministic_algorithms_enabled()  # settings restored
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([first.name, other_seed.name])

    # force rebuilds in place; the result is the same.
    assert weights_digest(build_demo_mixture(cache_dir=tmp_path / "a", recipe=SMALL, force=True, progress=False)) == (
        weights_digest(first)
    )
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == sorted([first.name, other_seed.name])


def test_small_build_files_are_byte_identical(tmp_path):
    """The classifier's safetensors metadata used to come out in a different order in each build."""
    first = build_demo_mixture(cache_dir=tmp_path / "a", recipe=SMALL, progress=False)
    second = build_demo_mixture(cache_dir=tmp_path / "b", recipe=SMALL, progress=False)
    assert _file_bytes(first) == _file_bytes(second)
    assert "xlora_classifier.safetensors" in _file_bytes(first)


def test_build_records_its_kernels(tmp_path, monkeypatch):
    """What chose the math kernels is part of the build record, so a build with another digest says why it may."""
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    kernels = read_build_info(build_demo_mixture(cache_dir=tmp_path, recipe=SMALL, progress=False))["kernels"]
    assert kernels["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert kernels["MKL_ENABLE_INSTRUCTIONS"] == "AVX2"


def test_canonical_header_does_not_depend_on_metadata_order(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    tensors = {"b": torch.arange(6.0).reshape(2, 3), "a": torch.ones(4, dtype=torch.int64)}
    keys = [f"key{i}" for i in range(12)]
    for name, order in (("one", keys), ("two", keys[::-1])):
        (tmp_path / name).mkdir()
        save_file(tensors, tmp_path / name / "w.safetensors", metadata={k: k.upper() for k in order})
    digests = [weights_digest(tmp_path / name) for name in ("one", "two")]
    for name in ("one", "two"):
        canonicalize_safetensors_header(tmp_path / name / "w.safetensors")
    one, two = ((tmp_path / name / "w.safetensors").read_bytes() for name in ("one", "two"))
    assert one == two
    assert digests[0] == digests[1] == weights_digest(tmp_path / "one")  # the digest ignores the metadata order
    with safe_open(str(tmp_path / "one" / "w.safetensors"), framework="pt") as handle:
        assert handle.metadata() == {k: k.upper() for k in keys}
        assert torch.equal(handle.get_tensor("b"), tensors["b"]) and torch.equal(handle.get_tensor("a"), tensors["a"])


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    import xlora_hub.demo.build as demo_build

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo_build, "_train_classifier", interrupted)
    with pytest.raises(KeyboardInterrupt):
        build_demo_mixture(cache_dir=tmp_path, recipe=SMALL, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_push_demo_mixture_as_separate_repos(hub, tmp_path):
    from huggingface_hub import HfApi

    repo_id = f"alice/demo-{uuid.uuid4().hex[:8]}"
    model, tokenizer = load_demo_mixture(cache_dir=tmp_path / "build", recipe=SMALL, progress=False)
    push_demo_mixture(repo_id, cache_dir=tmp_path / "build", recipe=SMALL, token=hub.token)
    api = HfApi(token=hub.token)
    for suffix in ["base", *TASKS]:
        assert api.model_info(f"{repo_id}-{suffix}").sha
    config = json.loads(open(api.hf_hub_download(repo_id, "xlora_config.json", cache_dir=tmp_path / "hf")).read())
    assert config["base_model"]["repo_id"] == f"{repo_id}-base" and len(config["base_model"]["revision"]) == 40
    assert [e["repo_id"] for e in config["experts"]] == [f"{repo_id}-{t}" for t in TASKS]

    loaded = XLoraModel.from_pretrained(repo_id, token=hub.token, cache_dir=tmp_path / "hf")
    texts = [make_task_examples(t, 1, seed=5)[0]["prompt"] for t in TASKS]
    torch.testing.assert_close(_logits(loaded, tokenizer, texts), _logits(model, tokenizer, texts), rtol=0, atol=0)


def test_bad_seed():
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        build_demo_mixture(seed=-1)


def test_adapter_configs_do_not_depend_on_the_hash_seed(tmp_path):
    """peft writes `target_modules` from a set (hash-seed order); the build sorts it, so processes agree."""
    import json

    from xlora_hub.demo.cache import canonicalize_adapter_config

    for name, modules in (("one", ["v_proj", "q_proj", "down_proj"]), ("two", ["down_proj", "q_proj", "v_proj"])):
        (tmp_path / name).mkdir()
        config = {"peft_type": "LORA", "r": 4, "target_modules": modules}
        (tmp_path / name / "adapter_config.json").write_text(json.dumps(config))
        canonicalize_adapter_config(tmp_path / name / "adapter_config.json")
    one, two = ((tmp_path / n / "adapter_config.json").read_bytes() for n in ("one", "two"))
    assert one == two
    assert json.loads(one) == {"peft_type": "LORA", "r": 4, "target_modules": ["down_proj", "q_proj", "v_proj"]}
