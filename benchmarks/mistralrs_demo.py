"""The demo mixture exported with ``xlora-hub convert MIX OUT --to mistralrs`` and run, as written, in mistral.rs.

Issue 14's closing check: the export of the demo mixture (as ``xlora_hub.demo`` builds it, from the cache) is loaded
by ``tests/mistralrs_runner.py`` in each mistral.rs version's own interpreter, and its greedy tokens are compared
with xlora-hub's (``generate`` with the options ``evaluate_demo_mixture`` scores: up to 8 new tokens, KV cache):

* mistral.rs 0.9.5 on one-token prompts (its X-LoRA fails on longer prompts upstream; the task prompts are run
  too, to show it), with the largest log-prob difference over the generations that are equal;
* mistral.rs 0.6.0 with ``arch=Mistral`` on the task prompts (its ``logprob`` field is not a log-probability:
  where a generation differs, xlora-hub's gap between its best token and mistral.rs's choice is shown instead),
  and the task exact match of both.

The demo's base has no chat template; the runner is given a prompt-only one (a file outside the export), so the
export and the base load unchanged. Prints Markdown tables.

    XLORA_HUB_CACHE=... python benchmarks/mistralrs_demo.py --python-095 VENV/bin/python --python-060 VENV2/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from xlora_hub.cli import main as cli_main
from xlora_hub.demo import TASKS, build_demo_mixture, deterministic_torch, load_demo_mixture, make_task_examples
from xlora_hub.jsonfile import parse_json_object, read_json_object

RUNNER = Path(__file__).resolve().parents[1] / "tests" / "mistralrs_runner.py"
PROMPT_ONLY = "{% for message in messages %}{{ message['content'] }}{% endfor %}"
ONE_TOKEN_PROMPTS = ["a", "k", "z", "A", "Q", "0", "5", "9", "+", "=", ":", "c"]
MAX_TOKENS = 8


def ours(model, tokenizer, prompts: list[str]) -> dict[str, dict]:
    """xlora-hub's greedy tokens (EOS included), their log-probs and every step's log-softmax, per prompt."""
    options = dict(max_new_tokens=MAX_TOKENS, do_sample=False, use_cache=True, return_dict_in_generate=True)
    options.update(output_logits=True, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = {}
    with deterministic_torch():
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            result = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
            tokens = result.sequences[0, ids.shape[1] :].tolist()
            logp = [torch.log_softmax(step[0].double(), -1) for step in result.logits]
            out[prompt] = {"tokens": tokens, "logprobs": [float(lp[t]) for lp, t in zip(logp, tokens)], "logp": logp}
    return out


def run(python: str, folder: Path, base: Path, jinja: Path, prompts: list[str]) -> dict:
    """The runner's answer (``{"version": ..., "results": [...]}``) for ``prompts``, ``arch=Mistral``, f32."""
    args = {"folder": str(folder), "base": str(base), "arch": "Mistral", "prompts": prompts, "jinja": str(jinja)}
    args["max_tokens"] = MAX_TOKENS
    env = {**os.environ, "MISTRALRS_CPU_KV_F32": "1", "HF_HUB_OFFLINE": "1", "RUST_BACKTRACE": "0"}
    env.setdefault("RAYON_NUM_THREADS", "1")
    result = subprocess.run(
        [python, str(RUNNER), json.dumps(args)], capture_output=True, text=True, timeout=1800, env=env
    )
    if result.returncode != 0:
        sys.exit(f"mistral.rs runner failed ({python}):\n{result.stderr[-3000:]}")
    return parse_json_object(result.stdout.strip().splitlines()[-1], what="the mistral.rs runner's output")


def compare(mine: dict[str, dict], answer: dict, tokenizer, gold: dict[str, str]) -> dict:
    """Counts over the answered prompts: equal whole generations, equal first tokens, errors, the largest log-prob
    difference over the equal generations, xlora-hub's log-prob gap at each first difference, exact matches."""
    row = {"version": answer["version"], "prompts": len(answer["results"]), "errors": 0, "equal": 0, "first": 0}
    row.update(max_diff=None, gaps=[], em_ours=0, em_theirs=0, scored=0, error_example=None)
    for result in answer["results"]:
        m = mine[result["prompt"]]
        if "error" in result:
            row["errors"] += 1
            row["error_example"] = row["error_example"] or result["error"]
            continue
        theirs = result["tokens"][: len(m["tokens"])]  # 0.6.0 makes one token more than asked
        row["first"] += theirs[:1] == m["tokens"][:1]
        if theirs == m["tokens"]:
            row["equal"] += 1
            if answer["version"] != "0.6.0":  # 0.6.0's logprob field is not a log-probability
                diff = max(abs(a - b) for a, b in zip(m["logprobs"], result["logprobs"]))
                row["max_diff"] = diff if row["max_diff"] is None else max(row["max_diff"], diff)
        else:
            at = next(i for i, (a, b) in enumerate(zip(m["tokens"], theirs + [-1] * MAX_TOKENS)) if a != b)
            logp = m["logp"][at]
            row["gaps"].append(
                (result["prompt"], at, float(logp.max() - logp[theirs[at]]) if at < len(theirs) else None)
            )
        if result["prompt"] in gold:
            row["scored"] += 1
            row["em_ours"] += tokenizer.decode(m["tokens"], skip_special_tokens=True) == gold[result["prompt"]]
            row["em_theirs"] += tokenizer.decode(theirs, skip_special_tokens=True) == gold[result["prompt"]]
    return row


def other_formats(folder: Path, model, tokenizer, prompts: list[str], tmp: Path) -> list[str]:
    """``--to peft`` (loaded by peft alone) and ``--to xlora`` (read back by xlora-hub): the largest |logit
    difference| against the mixture over ``prompts``, teacher-forced on the prompt."""
    from peft import PeftModel

    from xlora_hub.convert import import_mixture
    from xlora_hub.demo.build import load_base_model

    def max_diff(other) -> float:
        worst = 0.0
        for prompt in prompts:
            ids = torch.tensor([tokenizer(prompt)["input_ids"]])
            with torch.no_grad():
                worst = max(worst, float((other(input_ids=ids).logits - model(input_ids=ids).logits).abs().max()))
        return worst

    base = str(folder / "base_model")
    assert cli_main(["convert", str(folder), str(tmp / "peft"), "--to", "peft", "-q"]) == 0
    assert cli_main(["convert", str(folder), str(tmp / "xlora"), "--to", "xlora", "--base-model-id", base, "-q"]) == 0
    lines = []
    with deterministic_torch():
        peft_base = load_base_model(folder)
        peft_base.config.use_cache = False
        by_peft = PeftModel.from_pretrained(peft_base, str(tmp / "peft")).eval()
        lines.append(f"--to peft, loaded by PeftModel.from_pretrained: max |logit diff| {max_diff(by_peft):.1e}")
        back = import_mixture(tmp / "xlora", base_model=load_base_model(folder)).eval()
        lines.append(f"--to xlora (--base-model-id {base}), read back by import_mixture: max |logit diff| "
                     f"{max_diff(back):.1e}")  # fmt: skip
    return [f"{line} over {len(prompts)} task prompts" for line in lines]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-per-task", type=int, default=100, help="task prompts per task (evaluation draw)")
    parser.add_argument("--python-095", default=sys.executable, help="interpreter with mistralrs 0.9.5")
    parser.add_argument("--python-060", required=True, help="interpreter with mistralrs 0.6.0 (its own venv)")
    args = parser.parse_args()

    folder = build_demo_mixture(seed=args.seed, progress=False)
    digest = read_json_object(folder / "demo_build.json", what="the demo build record").get("weights_sha256")
    model, tokenizer = load_demo_mixture(seed=args.seed, progress=False)
    examples = {t: make_task_examples(t, args.n_per_task, seed=args.seed + 2) for t in TASKS}
    gold = {e["prompt"]: e["completion"] for t in TASKS for e in examples[t]}
    prompts = [e["prompt"] for t in TASKS for e in examples[t]]
    mine = ours(model, tokenizer, ONE_TOKEN_PROMPTS + list(dict.fromkeys(prompts)))
    with tempfile.TemporaryDirectory() as tmp:
        out, jinja = Path(tmp) / "rs", Path(tmp) / "prompt_only.jinja"
        assert cli_main(["convert", str(folder), str(out), "--to", "mistralrs", "-q"]) == 0
        jinja.write_text(PROMPT_ONLY)
        base = Path(read_json_object(out / "xlora_config.json", what="the export's xlora_config.json")["base_model_id"])
        answers = {
            (version, kind): run(python, out, base, jinja, batch)
            for version, python in (("0.9.5", args.python_095), ("0.6.0", args.python_060))
            for kind, batch in (("one-token prompts", ONE_TOKEN_PROMPTS), ("task prompts", prompts))
        }
        files = sorted(p.name for p in out.iterdir())
        formats = other_formats(
            folder, model, tokenizer, [e["prompt"] for t in TASKS for e in examples[t][:10]], Path(tmp)
        )
    print(f"demo {folder.name}, weights sha256 {digest}; export files: {', '.join(files)}")
    print()
    for line in formats:
        print(f"* {line}")
    print()
    rows = [(v, k, compare(mine, a, tokenizer, gold)) for (v, k), a in answers.items()]
    for task in TASKS:  # 0.6.0 on each task's prompts
        answer = answers[("0.6.0", "task prompts")]
        mine_task = {e["prompt"] for e in examples[task]}
        subset = {**answer, "results": [r for r in answer["results"] if r["prompt"] in mine_task]}
        rows.append(("0.6.0", f"task prompts: {task}", compare(mine, subset, tokenizer, gold)))
    print("| mistral.rs | prompts | n | failed | equal whole generations | equal first tokens |"
          " largest log-prob difference | mixture exact match | mistral.rs exact match |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for version, kind, r in rows:
        answered = r["prompts"] - r["errors"]
        diff = f"{r['max_diff']:.1e}" if r["max_diff"] is not None else "n/a"
        em = (f"{r['em_ours']}/{r['scored']}", f"{r['em_theirs']}/{r['scored']}") if r["scored"] else ("-", "-")
        print(f"| {version} | {kind} | {r['prompts']} | {r['errors']} | {r['equal']}/{answered} | {r['first']}/{answered}"
              f" | {diff} | {em[0]} | {em[1]} |")  # fmt: skip
    print()
    for version, kind, r in rows[:4]:
        if r["error_example"]:
            print(f"* {version}, {kind}: {r['errors']} failed, e.g. `{r['error_example']}`")
        for prompt, at, gap in r["gaps"]:
            gap_text = f"{gap:.4f}" if gap is not None else "n/a (mistral.rs stopped)"
            print(f"* {version}, {kind}: {prompt!r} differs at new token {at}; xlora-hub's log-prob gap between its"
                  f" token and mistral.rs's: {gap_text}")  # fmt: skip


if __name__ == "__main__":
    main()
