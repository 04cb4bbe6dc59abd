"""`examples/train_with_trainer.py` under DDP: two CPU processes (torchrun, gloo) train like one process does.

The example is what the README points `accelerate launch` / `torchrun` users to, so it is run as a user
would run it, on a mixture folder whose base model is referenced by path.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers as tf
from factories import save_expert

from xlora_hub import XLoraConfig, XLoraModel
from xlora_hub.demo import build_tokenizer
from xlora_hub.training import evaluate_loss

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_with_trainer.py"
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    tokenizer = build_tokenizer()

    def base():
        torch.manual_seed(0)
        config = tf.LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        return tf.LlamaForCausalLM(config).eval()

    base().save_pretrained(root / "base")
    tokenizer.save_pretrained(root / "base")
    experts = {
        name: str(save_expert(base, root / name, target_modules=["q_proj", "v_proj", "down_proj"], seed=s, scale=0.4))
        for name, s in (("a", 1), ("b", 2))
    }
    model = XLoraModel.from_experts(
        tf.AutoModelForCausalLM.from_pretrained(root / "base"), XLoraConfig(experts=experts)
    )
    model.save_pretrained(root / "mix")
    rng = random.Random(0)
    lines = []
    for _ in range(64):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        lines.append(json.dumps({"prompt": f"add:{a}+{b}=", "completion": str(a + b)}))
    (root / "train.jsonl").write_text("\n".join(lines) + "\n")
    initial = evaluate_loss(model, root / "train.jsonl", tokenizer=tokenizer)
    return root, tokenizer, initial


def _train(root: Path, output: str, *, processes: int, batch_size: int) -> dict:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
    command = [*launcher, str(SCRIPT), str(root / "mix"), "--data", str(root / "train.jsonl")]
    command += ["--eval-data", str(root / "train.jsonl"), "--output", str(root / output), "--cpu", "--lr", "3e-2"]
    command += ["--max-steps", "16", "--batch-size", str(batch_size)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_two_processes_train_like_one(setup):
    root, tokenizer, initial = setup
    single = _train(root, "single", processes=1, batch_size=8)
    ddp = _train(root, "ddp", processes=2, batch_size=4)  # the same global batch of 8
    print(f"initial loss {initial:.4f}\none process: {single}\ntwo processes: {ddp}")  # shown with `pytest -s`
    assert single["world_size"] == 1 and ddp["world_size"] == 2
    assert ddp["global_step"] == single["global_step"] == 16
    # The loss the Trainer logs is the real per-token loss, not divided by the number of processes.
    assert ddp["first_logged_loss"] == pytest.approx(initial, rel=0.05)
    assert ddp["eval_loss"] < initial and single["eval_loss"] < initial
    assert ddp["eval_loss"] == pytest.approx(single["eval_loss"], rel=0.02)
    # The saved mixture is the trained one: reloaded, it scores the eval loss the run reported.
    reloaded = XLoraModel.from_pretrained(root / "ddp")
    assert evaluate_loss(reloaded, root / "train.jsonl", tokenizer=tokenizer) == pytest.approx(
        ddp["eval_loss"], rel=1e-3
    )
