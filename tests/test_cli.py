"""The ``xlora-hub`` command in-process (``main([...])``): help, version, each sub-command on tiny local mixtures,
and every user error exiting 1 with a one-line message (plus one real-process check of the exit codes)."""

from __future__ import annotations

import json
import os
import re
import shutil
import string
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from factories import peft_reference, save_expert, tiny_llama

from xlora_hub import XLoraConfig, XLoraModel, __version__, cli
from xlora_hub.cli import default_expert_name, expert_refs, main
from xlora_hub.config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME, ExpertRef

TARGETS = ["q_proj", "v_proj", "gate_proj"]
CHARS = string.digits + string.ascii_lowercase + string.ascii_uppercase + " .,:;+-=?!'"
COMMANDS = [
    "create",
    "train",
    "info",
    "check",
    "generate",
    "push",
    "pull",
    "convert",
    "demo",
    "space",
    "space push",
    "bench",
]
ROUTED = re.compile(r"\[([A-Za-z_]\w*)\]")


# ---------------------------------------------------------------------------------------------- tiny world
def char_tokenizer():
    """A character-level tokenizer built with ``tokenizers`` (BOS added), saved next to the tiny base model."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(["<pad>", "<s>", "</s>", "<unk>", *CHARS])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


@dataclass
class World:
    root: Path
    base: Path
    math: Path
    code: Path
    data: Path


def make_world(root: Path) -> World:
    """A tiny Llama (vocabulary = the tokenizer's) with its tokenizer, two LoRA experts and a small JSONL."""
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = char_tokenizer()
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    math = save_expert(tiny_llama, root / "lora-math", target_modules=TARGETS, seed=1)
    code = save_expert(tiny_llama, root / "lora-code", target_modules=TARGETS, seed=2)
    rows = [{"prompt": f"{a}+{b}=", "completion": str(a + b), "expert": "math"} for a in range(4) for b in range(3)]
    rows += [{"prompt": f"def f{a}(", "completion": "x):", "expert": "code"} for a in range(4)]
    data = root / "train.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return World(root, root / "base", math, code, data)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    return make_world(tmp_path_factory.mktemp("cli-world"))


@pytest.fixture(scope="module")
def mixture(world: World, tmp_path_factory) -> Path:
    """A mixture made by `create` (local experts, so bundled), shared by the read-only tests."""
    out = tmp_path_factory.mktemp("cli-mix") / "mix"
    assert main(["create", str(world.base), "--name", f"math={world.math}", "--name", f"code={world.code}",
                 "-o", str(out), "-q"]) == 0  # fmt: skip
    return out


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_user_error(capsys, argv: list, *phrases: str) -> str:
    """Exit 1, exactly one line on stderr naming the command, containing each phrase, and no traceback."""
    code, out, err = run(capsys, *argv)
    assert code == 1, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"xlora-hub {argv[0]}: error: "), err
    assert "Traceback" not in err
    for phrase in phrases:
        assert phrase in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------------------------------------- help, version, usage
def test_help_of_every_command_has_an_example(capsys):
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "examples:" in out
    for command in COMMANDS:
        code, out, _ = run(capsys, *command.split(), "--help")
        assert code == 0, command
        assert f"usage: xlora-hub {command}" in out, command
        assert "examples:" in out and f"xlora-hub {command.split()[0]} " in out.split("examples:")[1], command


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert code == 0 and out.strip() == f"xlora-hub {__version__}"


@pytest.mark.parametrize(
    "argv",
    [[], ["frobnicate"], ["create", "./base"], ["info"], ["generate", "./mix"], ["info", "x/y", "--bogus"],
     ["train", "./mix", "--data", "d.jsonl", "--epochs", "two"], ["convert", "a", "b", "--to", "onnx"]],
)  # fmt: skip
def test_bad_usage_exits_2(capsys, argv):
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert "usage: xlora-hub" in err and "Traceback" not in err


@pytest.mark.parametrize(
    "argv, flag",
    [(["push", "./mix", "a/b", "--eval-no-plots"], "--eval-no-plots"),
     (["push", "./mix", "a/b", "--tokenizer", "gpt2"], "--tokenizer")],
)  # fmt: skip
def test_push_evaluation_flags_without_eval_are_usage_errors(capsys, argv, flag):
    code, _, err = run(capsys, *argv)
    assert code == 2 and f"{flag} only applies with --eval DATA" in err


@pytest.mark.parametrize(
    "fmt, extra, message",
    [("peft", ["--lossy"], "--lossy only applies to export mistralrs, not peft"),
     ("lora", ["--lossy", "--weights", "a=1"], "--lossy only applies to export mistralrs, not lora"),
     ("xlora", ["--weights", "a=1"], "--weights only applies to export lora, not xlora"),
     ("mistralrs", ["--calibration", "d.jsonl"], "--calibration only applies to export lora, not mistralrs"),
     ("mistralrs", ["--accept-softmax-topk-change"], "--accept-softmax-topk-change only applies to export xlora"),
     ("peft", ["--base-model-id", "o/b"], "--base-model-id only applies to export mistralrs or xlora, not peft")],
)  # fmt: skip
def test_convert_module_export_flags_of_another_format_are_usage_errors(capsys, tmp_path, fmt, extra, message):
    from xlora_hub.convert import main as convert_main

    with pytest.raises(SystemExit) as exit_:
        convert_main(["export", fmt, str(tmp_path / "missing"), str(tmp_path / "out"), *extra])
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- expert names
def test_expert_names_from_refs():
    refs = expert_refs(
        ["alice/lora-math", "lora_math=dave/other", "alice/lora-math@v2", "bob/loras@main:adapters/Code",
         "./folder/2nd expert"],
        ["chat=carol/chat-lora"],
    )  # fmt: skip
    assert list(refs) == ["lora_math_2", "lora_math", "lora_math_3", "code", "expert_2nd_expert", "chat"]
    assert refs["lora_math"] == ExpertRef(repo_id="dave/other")
    assert refs["lora_math_3"] == ExpertRef(repo_id="alice/lora-math", revision="v2")
    assert refs["code"] == ExpertRef(repo_id="bob/loras", revision="main", subfolder="adapters/Code")
    assert refs["expert_2nd_expert"] == ExpertRef(path="./folder/2nd expert")
    assert default_expert_name(ExpertRef(repo_id="x/---")) == "expert"


# ---------------------------------------------------------------------------------------------- sub-commands
def test_create_sets_the_xlora_options(world, tmp_path, capsys):
    out_dir = tmp_path / "mix"
    code, out, err = run(
        capsys,
        "create", world.base, world.math, world.code, "-o", out_dir,
        "--top-k", "1", "--softmax-temperature", "0.5", "--layerwise", "--depth", "2", "--classifier-size", "16",
        "--dropout", "0.1", "--scaling-pass-value", "auto", "--global-scaling-weight", "0.7",
    )  # fmt: skip
    assert code == 0, err
    assert "Created an X-LoRA mixture of 2 experts" in out
    config = XLoraConfig.load(out_dir / CONFIG_NAME)
    assert config.expert_names == ["lora_math", "lora_code"]
    assert all(ref.path == f"experts/{name}" for name, ref in config.experts.items())  # local experts are bundled
    assert (config.top_k_lora, config.softmax_temperature, config.layerwise_scalings) == (1, 0.5, True)
    assert (config.xlora_depth, config.xlora_size, config.xlora_dropout_p) == (2, 16, 0.1)
    assert config.scaling_pass_value is None and config.global_scaling_weight == 0.7
    assert config.base_model.repo_id == str(world.base.resolve())  # absolute: loads from any working directory
    # a second `create` into the same folder must not silently replace the mixture
    assert_user_error(capsys, ["create", world.base, world.math, "-o", out_dir], "--overwrite")
    assert run(capsys, "create", world.base, world.math, "-o", out_dir, "--overwrite", "-q")[0] == 0
    assert XLoraConfig.load(out_dir / CONFIG_NAME).expert_names == ["lora_math"]


def test_train_info_and_generate_with_routing(world, mixture, tmp_path, capsys):
    trained = tmp_path / "trained"
    shutil.copytree(mixture, trained)
    before = load_file(str(trained / CLASSIFIER_WEIGHTS_NAME))
    code, out, err = run(
        capsys, "train", trained, "--data", world.data, "--epochs", "2", "--batch-size", "4", "--max-length", "16",
        "--routing-loss-weight", "1.0", "--lr", "0.05", "-q",
    )  # fmt: skip
    assert code == 0, err
    assert re.search(r"Trained 8 steps \(2 epochs\): loss \d+\.\d+ -> \d+\.\d+", out)
    after = load_file(str(trained / CLASSIFIER_WEIGHTS_NAME))
    assert any(not torch.equal(before[k], after[k]) for k in before)  # saved in place, trained

    code, out, _ = run(capsys, "info", trained, "--json")
    info = json.loads(out)
    assert code == 0 and info["n_experts"] == 2 and [e["name"] for e in info["experts"]] == ["math", "code"]
    assert all(e["kind"] == "bundled" and e["size_bytes"] > 0 for e in info["experts"])
    code, out, _ = run(capsys, "info", trained)
    assert code == 0 and "math: bundled experts/math" in out

    prompt = "2+1="
    code, out, err = run(capsys, "generate", trained, prompt, "--max-new-tokens", "6", "--show-routing")
    assert code == 0, err
    lines = out.splitlines()
    text, routing_line = lines[0], lines[3]
    assert "\033[" not in out  # not a TTY: plain `token[expert]`

    from transformers import AutoTokenizer

    model = XLoraModel.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(world.base)
    encoded = tokenizer(prompt, return_tensors="pt")
    model.enable_scalings_logging()
    output = model.generate(**encoded, max_new_tokens=6, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert text == tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    scalings = torch.cat(model.get_scalings_log(), dim=1)[0]  # [tokens - 1, layers, experts]
    expected = [model.expert_names[i] for i in scalings.mean(dim=1).argmax(dim=-1).tolist()]
    assert ROUTED.findall(routing_line) == expected
    assert len(expected) == output.shape[1] - 1  # every token but the last generated one
    assert routing_line.startswith("<s>[")

    code, out, _ = run(capsys, "generate", trained, prompt, "--max-new-tokens", "6", "--show-routing", "--json")
    data = json.loads(out)
    assert data["text"] == text and [t["expert"] for t in data["tokens"]] == [*expected, None]

    code, out, _ = run(capsys, "generate", trained, prompt, "--max-new-tokens", "6", "--show-routing",
                       "--color", "always", "--layer", "1")  # fmt: skip
    assert code == 0 and "\033[30;4" in out and "experts:" in out


def test_convert_round_trip_peft_to_xlora_hub_to_peft_keeps_logits(world, tmp_path, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from xlora_hub.convert import save_peft_classifier

    def base():
        return AutoModelForCausalLM.from_pretrained(world.base).eval()

    reference = peft_reference(base, [world.math, world.code], layerwise_scalings=True, xlora_depth=2, xlora_size=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in reference.base_model.internal_xlora_classifier.parameters():
            param.copy_(torch.randn(param.shape, generator=gen))
    reference.save_pretrained(str(tmp_path / "peft"))
    save_peft_classifier(reference, tmp_path / "peft")
    ids = torch.tensor([[1, 5, 9, 14, 27, 33, 60, 2]])
    with torch.no_grad():
        expected = reference(input_ids=ids).logits

    code, out, err = run(capsys, "convert", tmp_path / "peft", tmp_path / "hub", "--to", "xlora-hub", "-q")
    assert code == 0, err
    assert "(peft) to xlora-hub" in out
    code, out, err = run(capsys, "convert", tmp_path / "hub", tmp_path / "peft2", "--to", "peft", "-q")
    assert code == 0, err
    code, out, err = run(capsys, "convert", tmp_path / "hub", tmp_path / "mistralrs", "--to", "mistralrs", "-q")
    assert code == 0, err

    ours = XLoraModel.from_pretrained(tmp_path / "hub")
    again = base()
    again.config.use_cache = False
    by_peft = PeftModel.from_pretrained(again, str(tmp_path / "peft2")).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(by_peft(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)
    code, _, err = run(capsys, "convert", tmp_path / "mistralrs", tmp_path / "back", "--to", "xlora-hub", "-q")
    assert code == 0, err
    with torch.no_grad():
        back = XLoraModel.from_pretrained(tmp_path / "back")
        torch.testing.assert_close(back(input_ids=ids).logits, expected, rtol=1e-5, atol=1e-5)


def test_push_pull_to_local_dir_and_space_dry_run(hub, world, mixture, tmp_path, capsys):
    repo = f"alice/cli-push-{uuid.uuid4().hex[:8]}"
    # A local base folder is never published (test_private_paths.py): name its Hub copy with --base-model.
    base_repo = f"alice/cli-base-{uuid.uuid4().hex[:8]}"
    HfApi(token=hub.token).create_repo(base_repo)
    HfApi(token=hub.token).upload_folder(repo_id=base_repo, folder_path=str(world.base))
    code, out, err = run(capsys, "push", mixture, repo, "--token", hub.token, "--branch", "dev", "-q",
                         "--base-model", base_repo)  # fmt: skip
    assert code == 0, err
    assert hub.token not in out + err
    assert HfApi(token=hub.token).model_info(repo, revision="dev").sha in out

    local, cache = tmp_path / "pulled", tmp_path / "cache"
    code, out, err = run(capsys, "pull", repo, "--revision", "dev", "--local-dir", local, "--cache-dir", cache)
    assert code == 0, err
    assert (local / CONFIG_NAME).is_file() and (local / "experts" / "math" / "adapter_model.safetensors").is_file()
    prompt = ["2+2=", "--max-new-tokens", "5", "--json", "--cache-dir", cache]
    code, pulled, err = run(capsys, "generate", local, *prompt, "--offline")
    assert code == 0, err
    assert json.loads(pulled) == json.loads(run(capsys, "generate", mixture, *prompt)[1])

    code, out, err = run(capsys, "space", "push", repo, "alice/demo", "--revision", "dev", "--dry-run",
                         tmp_path / "space", "--token", hub.token)  # fmt: skip
    assert code == 0, err
    assert (tmp_path / "space" / "app.py").is_file()
    pinned = json.loads((tmp_path / "space" / "xlora_space.json").read_text())
    assert (
        pinned["mixture"] == repo and pinned["revision"] == HfApi(token=hub.token).model_info(repo, revision="dev").sha
    )
    assert_user_error(capsys, ["space", "push", str(mixture), "alice/demo", "--dry-run", str(tmp_path / "s2")],
                      "local folder")  # fmt: skip


def test_push_local_experts_gives_each_local_expert_its_own_repo(hub, mixture, capsys):
    repo = f"alice/cli-own-{uuid.uuid4().hex[:8]}"
    code, _, err = run(capsys, "push", mixture, repo, "--push-local-experts", "--token", hub.token, "-q")
    assert code == 0, err
    info = json.loads(run(capsys, "info", repo, "--json", "--token", hub.token)[1])
    assert [(e["kind"], e["repo_id"]) for e in info["experts"]] == [("hub", f"{repo}-math"), ("hub", f"{repo}-code")]


def test_bench_runs_the_benchmark_script(capfd, monkeypatch):
    assert main(["bench", "--", "--help"]) == 0
    assert "--quick" in capfd.readouterr().out  # the benchmark's own help
    monkeypatch.setattr(cli.bench, "BENCH_SCRIPT", Path("benchmarks") / "missing.py")
    assert main(["bench", "--quick"]) == 1
    assert "source checkout" in capfd.readouterr().err


# ---------------------------------------------------------------------------------------------- user errors
def test_missing_files_are_user_errors(world, mixture, tmp_path, capsys):
    assert_user_error(capsys, ["train", str(mixture), "--data", str(tmp_path / "nope.jsonl")], "nope.jsonl",
                      "no such data file")  # fmt: skip
    assert_user_error(capsys, ["create", str(tmp_path / "no-base"), str(world.math), "-o", str(tmp_path / "m")],
                      "no-base", "does not exist")  # fmt: skip
    assert_user_error(capsys, ["create", str(world.base), str(tmp_path / "no-expert"), "-o", str(tmp_path / "m")],
                      "no-expert", "does not exist")  # fmt: skip
    assert_user_error(capsys, ["info", str(tmp_path / "no-mixture")], "no-mixture", "does not exist")
    assert_user_error(capsys, ["demo", str(tmp_path / "no-mixture")], "no-mixture", "does not exist")
    assert_user_error(capsys, ["generate", str(world.math), "hi"], CONFIG_NAME, "not an xlora-hub mixture")
    assert_user_error(capsys, ["convert", str(world.root), str(tmp_path / "out"), "--to", "peft"],
                      "not an X-LoRA checkpoint")  # fmt: skip
    assert not (tmp_path / "m").exists()  # nothing half-written


def test_a_base_folder_without_a_model_is_a_user_error(world, tmp_path, capsys):
    # transformers says so with a bare ValueError, which the CLI no longer takes for a user error by itself
    (tmp_path / "empty-base").mkdir()
    assert_user_error(capsys, ["create", str(tmp_path / "empty-base"), str(world.math), "-o", str(tmp_path / "m")],
                      "Base model", "empty-base", "could not be loaded", "model folder")  # fmt: skip
    assert_user_error(capsys, ["convert", str(tmp_path / "m"), str(tmp_path / "o"), "--to", "peft", "--base-model",
                               str(tmp_path / "empty-base")], "empty-base", "could not be loaded")  # fmt: skip
    assert not (tmp_path / "m").exists()


def test_bad_ref_syntax_is_a_user_error(world, tmp_path, capsys):
    out = str(tmp_path / "m")
    assert_user_error(capsys, ["create", str(world.base), "alice/lora@", "-o", out], "empty revision")
    assert_user_error(capsys, ["create", str(world.base), "not a repo!", "-o", out], "not a repo!",
                      "valid Hub repo id")  # fmt: skip
    assert_user_error(capsys, ["create", str(world.base), "--name", "math", "-o", out], "NAME=REF")
    assert_user_error(capsys, ["create", str(world.base), "--name", "2x=alice/a", "-o", out], "valid identifier")
    assert_user_error(capsys, ["create", str(world.base), str(world.math), "-o", out, "--top-k", "3"], "top_k_lora")
    assert not Path(out).exists()


def test_unknown_repo_and_revision_are_user_errors(hub, world, mixture, tmp_path, capsys):
    missing = f"alice/missing-{uuid.uuid4().hex[:8]}"
    line = assert_user_error(capsys, ["info", missing, "--token", hub.token], missing, "--token")
    assert hub.token not in line
    assert_user_error(capsys, ["create", str(world.base), missing, "-o", str(tmp_path / "m")], missing,
                      "was not found")  # fmt: skip
    assert_user_error(capsys, ["pull", missing, "--cache-dir", str(tmp_path / "c")], missing)
    assert_user_error(capsys, ["info", missing, "--offline", "--cache-dir", str(tmp_path / "c")], "pull")

    repo = f"alice/cli-rev-{uuid.uuid4().hex[:8]}"
    HfApi(token=hub.token).create_repo(repo)
    HfApi(token=hub.token).upload_folder(repo_id=repo, folder_path=str(mixture))
    assert_user_error(capsys, ["info", repo, "--revision", "no-such-branch", "--cache-dir", str(tmp_path / "c")],
                      "no-such-branch", "--revision")  # fmt: skip
    assert_user_error(capsys, ["push", str(tmp_path / "no-mix"), repo, "--token", hub.token], "no-mix", "not a folder")


def test_bad_jsonl_is_a_user_error(mixture, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": "broken\n', encoding="utf-8")
    assert_user_error(capsys, ["train", str(mixture), "--data", str(bad)], "bad.jsonl, line 2", "not valid JSON")
    fields = tmp_path / "fields.jsonl"
    fields.write_text('{"question": "1+1", "answer": "2"}\n', encoding="utf-8")
    assert_user_error(capsys, ["train", str(mixture), "--data", str(fields)], "no `text` field")
    assert_user_error(capsys, ["train", "alice/some-mixture", "--data", str(fields)], "-o/--output")


def test_debug_shows_the_traceback(tmp_path, capsys):
    # The CLI prints the traceback itself (redacted, see test_secrets.py) instead of letting it escape main().
    assert main(["info", str(tmp_path / "no-mixture"), "--debug"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Traceback") and "InvalidMixtureError" in err and "does not exist" in err


def test_exit_codes_of_a_real_process(tmp_path):
    """The installed console script and ``python -m xlora_hub``: 1 + one line for a user error, 2 for bad usage."""
    script = Path(sys.executable).with_name("xlora-hub")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "xlora_hub"]
    result = subprocess.run(
        [*command, "info", str(tmp_path / "missing"), "--token", "hf_secret_never_printed"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip().splitlines() == [
        f"xlora-hub info: error: Mixture folder '{tmp_path / 'missing'}' does not exist."
    ]
    assert result.stdout == "" and "hf_secret_never_printed" not in result.stderr
    usage = subprocess.run([sys.executable, "-m", "xlora_hub", "create"], capture_output=True, text=True, timeout=300)
    assert usage.returncode == 2 and "usage: xlora-hub create" in usage.stderr and "Traceback" not in usage.stderr


def test_generate_on_a_self_contained_folder_from_another_directory(world, mixture, tmp_path, capsys, monkeypatch):
    # The embedded demo's layout: the base model (and its tokenizer) inside the mixture as ./base_model. The
    # tokenizer is found there, not in the working directory (issue 11: one tokenizer loader).
    folder = tmp_path / "selfcontained"
    shutil.copytree(mixture, folder)
    shutil.copytree(world.base, folder / "base_model")
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["base_model"] = {"repo_id": "./base_model"}
    (folder / CONFIG_NAME).write_text(json.dumps(config))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, out, err = run(capsys, "generate", folder, "2+1=", "--max-new-tokens", "4")
    assert code == 0, err

    from transformers import AutoTokenizer

    model = XLoraModel.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(world.base)
    encoded = tokenizer("2+1=", return_tensors="pt")
    output = model.generate(**encoded, max_new_tokens=4, do_sample=False)
    assert out.splitlines()[0] == tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
