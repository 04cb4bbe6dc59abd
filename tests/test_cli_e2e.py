"""The whole cycle through the ``xlora-hub`` command only (real processes), against the tests' Hub server:
create from pushed experts, train on a small JSONL, push, pull into a fresh ``HF_HOME``, ``info --json`` and
``generate --show-routing`` offline, the generated text and routing equal to what the library gives."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi
from transformers import AutoTokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from test_cli import ROUTED, make_world

from xlora_hub import XLoraModel

SHA = re.compile(r"^[0-9a-f]{40}$")
PROMPT = "3+1="
NEW_TOKENS = 8


def xlora_hub(*args: str | Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("xlora-hub")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "xlora_hub"]
    result = subprocess.run([*command, *map(str, args)], env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    transcript = f"$ xlora-hub {' '.join(map(str, args))}\n{result.stdout}{result.stderr}"
    print(transcript)  # shown with `pytest -s`: the transcript of the run
    assert result.returncode == 0, transcript
    return result


def upload(api: HfApi, repo_id: str, folder: Path, path_in_repo: str | None = None) -> None:
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), path_in_repo=path_in_repo)


@pytest.mark.slow  # ~30 s: six processes, each importing torch and transformers
def test_create_train_push_pull_info_generate(hub, tmp_path):
    world = make_world(tmp_path / "world")
    api = HfApi(token=hub.token)
    tag = uuid.uuid4().hex[:8]
    base_repo, math_repo, code_repo = f"alice/base-{tag}", f"alice/loras-{tag}", f"alice/lora-code-{tag}"
    mix_repo = f"alice/mixture-{tag}"
    upload(api, base_repo, world.base)
    upload(api, math_repo, world.math, path_in_repo="adapters/math")  # named "math" after its subfolder
    upload(api, code_repo, world.code)

    # --- author: a fresh HF_HOME, the token from HF_TOKEN
    env = hub.env(tmp_path / "author", token=hub.token)
    work = tmp_path / "work"
    work.mkdir()
    outputs = []
    out = xlora_hub(
        "create", base_repo, f"{math_repo}@main:adapters/math", "--name", f"code={code_repo}", "-o", "mix",
        "--top-k", "2", "--softmax-temperature", "0.5", env=env, cwd=work,
    )  # fmt: skip
    outputs.append(out)
    assert "Created an X-LoRA mixture of 2 experts" in out.stdout
    out = xlora_hub(
        "train", "mix", "--data", world.data, "--epochs", "2", "--batch-size", "4", "--max-length", "16",
        "--lr", "0.05", "--routing-loss-weight", "1.0", env=env, cwd=work,
    )  # fmt: skip
    outputs.append(out)
    assert re.search(r"Trained 8 steps \(2 epochs\)", out.stdout)
    outputs.append(out := xlora_hub("push", "mix", mix_repo, env=env, cwd=work))
    commit = re.search(r"commit ([0-9a-f]{40})", out.stdout).group(1)
    assert api.model_info(mix_repo).sha == commit

    # --- user: another fresh HF_HOME; pull, then everything else with no Hub at all
    user_env = hub.env(tmp_path / "user", token=hub.token)
    outputs.append(out := xlora_hub("pull", mix_repo, env=user_env, cwd=work))
    assert f"@ {commit}" in out.stdout and "expert math" in out.stdout and base_repo in out.stdout
    offline_env = {**user_env, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"}  # nothing to talk to
    outputs.append(out := xlora_hub("info", mix_repo, "--json", "--offline", env=offline_env, cwd=work))
    info = json.loads(out.stdout)
    assert info["commit"] == commit and info["n_experts"] == 2
    assert [(e["name"], e["repo_id"], e["subfolder"]) for e in info["experts"]] == [
        ("math", math_repo, "adapters/math"),
        ("code", code_repo, None),
    ]
    assert all(SHA.match(e["revision"]) and e["pinned"] for e in info["experts"])  # pinned when pushed
    assert info["base_model"]["repo_id"] == base_repo and SHA.match(info["base_model"]["revision"])
    assert info["settings"]["top_k_lora"] == 2 and info["settings"]["softmax_temperature"] == 0.5
    # offline, the sizes come from what `pull` put in the cache
    assert info["classifier_size_bytes"] == len(hub.server.get_file(mix_repo, "xlora_classifier.safetensors"))
    assert [e["size_bytes"] for e in info["experts"]] == [
        len(hub.server.get_file(math_repo, "adapters/math/adapter_model.safetensors")),
        len(hub.server.get_file(code_repo, "adapter_model.safetensors")),
    ]
    outputs.append(
        out := xlora_hub(
            "generate",
            mix_repo,
            PROMPT,
            "--max-new-tokens",
            NEW_TOKENS,
            "--show-routing",
            "--offline",
            env=offline_env,
            cwd=work,
        )  # fmt: skip
    )
    lines = out.stdout.splitlines()
    text, routing_line = lines[0], lines[3]
    assert lines[1] == "" and lines[2].startswith("routing (") and "\033[" not in out.stdout

    # --- the library, in this process, on its own cache: same text, same routing
    cache = tmp_path / "library-cache"
    model = XLoraModel.from_pretrained(mix_repo, token=hub.token, cache_dir=cache)
    base = model.xlora_config.base_model
    tokenizer = AutoTokenizer.from_pretrained(base.repo_id, revision=base.revision, token=hub.token, cache_dir=cache)
    encoded = tokenizer(PROMPT, return_tensors="pt")
    model.enable_scalings_logging()
    output = model.generate(**encoded, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    expected_text = tokenizer.decode(output[0, encoded["input_ids"].shape[1] :], skip_special_tokens=True)
    assert text == expected_text
    scalings = torch.cat(model.get_scalings_log(), dim=1)[0]  # prompt, then one entry per fed-back token
    expected_routing = [model.expert_names[i] for i in scalings.mean(dim=1).argmax(dim=-1).tolist()]
    assert ROUTED.findall(routing_line) == expected_routing
    assert len(expected_routing) == output.shape[1] - 1

    for result in outputs:  # the token came from HF_TOKEN and is never printed
        assert hub.token not in result.stdout + result.stderr
