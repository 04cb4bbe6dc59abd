"""Fidelity of the flattened demo mixture (``convert --to lora``) on the demo's task prompts.

Calibrates on a draw of task examples (prompt + answer), flattens, loads the adapter with peft alone on a fresh copy
of the demo's base model, and compares on the evaluation draw that :func:`xlora_hub.demo.evaluate_demo_mixture` uses
(``seed + 2``): greedy completions of the adapter against the mixture's and against the task answers, and the mean
KL(mixture || adapter) of the next-token distributions over the prompt and answer tokens. Prints a Markdown table.

    XLORA_HUB_CACHE=... python benchmarks/flatten_demo.py [--n-per-task 100] [--calibration-per-task 50]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from peft import PeftModel

from xlora_hub.convert import flatten_to_lora, parse_weights
from xlora_hub.demo import TASKS, build_demo_mixture, deterministic_torch, load_demo_mixture, make_task_examples
from xlora_hub.demo.build import load_base_model


def mean_kl(mixture, adapter, tokenizer, examples) -> tuple[float, float]:
    """Mean KL(mixture || adapter) per next-token position: over every token, and over the answer tokens only."""
    total = answer = 0.0
    n_total = n_answer = 0
    for example in examples:
        prompt = tokenizer(example["prompt"])["input_ids"]
        ids = torch.tensor([prompt + tokenizer(example["completion"], add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            p = torch.log_softmax(mixture(input_ids=ids).logits[0].double(), -1)
            q = torch.log_softmax(adapter(input_ids=ids).logits[0].double(), -1)
        kl = (p.exp() * (p - q)).sum(-1)
        total += float(kl.sum())
        n_total += kl.numel()
        answer += float(kl[len(prompt) - 1 : -1].sum())  # the positions that predict the answer's tokens
        n_answer += ids.shape[1] - len(prompt)
    return total / n_total, answer / n_answer


def completions(model, examples, tokenizer, options) -> list[str]:
    """Each prompt's greedy completion (up to EOS), in the order of ``examples`` (scored as ``exact_match`` does)."""
    out: dict[int, str] = {}
    for i, example in enumerate(examples):
        ids = torch.tensor([tokenizer(example["prompt"])["input_ids"]])
        row = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)[0]
        out[i] = tokenizer.decode(row[ids.shape[1] :], skip_special_tokens=True)
    return [out[i] for i in range(len(examples))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-per-task", type=int, default=100)
    parser.add_argument("--calibration-per-task", type=int, default=50)
    parser.add_argument("--weights", help="NAME=W,... : flatten with this weighting instead of the calibrated one")
    args = parser.parse_args()

    folder = build_demo_mixture(seed=args.seed, progress=False)
    mixture, tokenizer = load_demo_mixture(seed=args.seed, progress=False)
    calibration = [e for t in TASKS for e in make_task_examples(t, args.calibration_per_task, seed=args.seed + 1)]
    options = dict(max_new_tokens=8, do_sample=False, use_cache=True)
    options.update(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    rows = []
    with deterministic_torch(), tempfile.TemporaryDirectory() as tmp:
        weights = parse_weights(args.weights) if args.weights else None
        out = flatten_to_lora(
            mixture, Path(tmp) / "flat", calibration=calibration, weights=weights, tokenizer=tokenizer
        )
        card = (out / "README.md").read_text()
        adapter = PeftModel.from_pretrained(load_base_model(folder), str(out)).eval()
        for task in TASKS:
            examples = make_task_examples(task, args.n_per_task, seed=args.seed + 2)
            ours = completions(mixture, examples, tokenizer, options)
            theirs = completions(adapter, examples, tokenizer, options)
            gold = [e["completion"] for e in examples]
            mixture_em = sum(a == g for a, g in zip(ours, gold)) / len(gold)
            flat_em = sum(a == g for a, g in zip(theirs, gold)) / len(gold)
            flat_vs_mixture = sum(a == b for a, b in zip(theirs, ours)) / len(gold)
            kl_all, kl_answer = mean_kl(mixture, adapter, tokenizer, examples)
            # the same flattening calibrated on this task's own draw: a LoRA for a known traffic mix
            own = [e for e in calibration if e["expert"] == task]
            own_out = flatten_to_lora(mixture, Path(tmp) / task, calibration=own, tokenizer=tokenizer)
            own_adapter = PeftModel.from_pretrained(load_base_model(folder), str(own_out)).eval()
            own_em = sum(a == g for a, g in zip(completions(own_adapter, examples, tokenizer, options), gold)) / len(
                gold
            )
            rows.append((task, len(examples), mixture_em, flat_em, flat_vs_mixture, kl_all, kl_answer, own_em))
    print("| task | n | mixture vs answers | flattened vs answers | flattened vs mixture | mean KL (all tokens) |"
          " mean KL (answer tokens) | flattened on the task's own prompts vs answers |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for task, n, m, f, fm, kl_all, kl_answer, own in rows:
        print(f"| {task} | {n} | {100 * m:.1f}% | {100 * f:.1f}% | {100 * fm:.1f}% | {kl_all:.4f} | {kl_answer:.4f} |"
              f" {100 * own:.1f}% |")  # fmt: skip
    total = sum(r[1] for r in rows)
    mean = [sum(r[1] * r[i] for r in rows) / total for i in range(2, 8)]
    print(f"| all | {total} | {100 * mean[0]:.1f}% | {100 * mean[1]:.1f}% | {100 * mean[2]:.1f}% | {mean[3]:.4f} |"
          f" {mean[4]:.4f} | {100 * mean[5]:.1f}% |")  # fmt: skip
    print()
    print(card[card.index("## Weighting") : card.index("## Usage")])


if __name__ == "__main__":
    main()
