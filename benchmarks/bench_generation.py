"""Benchmark: xlora-hub against peft's X-LoRA and the base model, measured side by side in one run.

Builds a Llama-style model from a config with seeded random weights, saves random LoRA experts with
peft, and wraps them twice over the same experts: peft's ``XLoraModel`` (the reference) and
``xlora_hub.XLoraModel`` with peft's classifier weights copied in. Before any timing it checks that
both give the same prefill logits and the same greedy tokens. Then it prints one table per section:

* ``prefill``:  one forward over the prompt (batch 1); time and FLOP ratios to the base model.
* ``generate``: greedy generation of each ``--new-tokens`` length (``min_new_tokens=max_new_tokens``).
* ``sweep``:    the prefill forward at each ``--sweep-experts`` count.
* ``memory``:   peak memory of each model and phase, each measured in a fresh subprocess.
* ``profile``:  (not in the default run) where xlora-hub's prefill and decode steps spend their time.
* ``quantized``: with ``--quantize`` (added to the run): the base quantized by transformers
  (bitsandbytes nf4 / int8, torchao int8 weight-only) against xlora-hub over that same quantized base:
  weight memory, peak memory (CUDA), prefill time and greedy tokens/s. peft's X-LoRA is not in this
  table: it cannot run on a bitsandbytes base.

Times are medians over ``--repeats`` after one warm-up call. Run ``--help`` for the flags;
``--quick`` runs the smallest sizes (the smoke test uses it).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SECTIONS = ("prefill", "generate", "sweep", "memory", "profile", "quantized")
QUANTIZE = ("none", "bnb-nf4", "bnb-int8", "torchao-int8")
DEFAULT_SECTIONS = ("prefill", "generate", "sweep", "memory")
QUICK = dict(
    hidden=64,
    intermediate=128,
    layers=2,
    heads=4,
    kv_heads=2,
    vocab=128,
    experts=2,
    rank=4,
    prompt_len=16,
    new_tokens=[4, 8],
    sweep_experts=[2, 4],
    repeats=1,
    prefill_repeats=1,
    check_tokens=4,
)


# ---------------------------------------------------------------------------------------------- arguments
def _int_list(value: str) -> list[int]:
    try:
        items = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {value!r}") from None
    if not items or any(v <= 0 for v in items):
        raise argparse.ArgumentTypeError(f"expected positive integers, got {value!r}")
    return items


def _sections(value: str) -> list[str]:
    items = [v.strip() for v in value.split(",") if v.strip()]
    unknown = [v for v in items if v not in SECTIONS]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}")
    return items


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help="smallest sizes, one repeat (smoke test); flags still apply")
    p.add_argument(
        "--sections", type=_sections, default=None, help=f"comma list of {SECTIONS} (default: all but profile)"
    )
    p.add_argument("--profile", action="store_true", help="also run the profile section")
    g = p.add_argument_group("model")
    g.add_argument("--hidden", type=int, default=256, help="default %(default)s")
    g.add_argument("--intermediate", type=int, default=None, help="MLP width (default 4 x hidden)")
    g.add_argument("--layers", type=int, default=4, help="default %(default)s")
    g.add_argument("--heads", type=int, default=8, help="default %(default)s")
    g.add_argument("--kv-heads", type=int, default=4, help="default %(default)s")
    g.add_argument("--vocab", type=int, default=1024, help="default %(default)s")
    g.add_argument("--experts", type=int, default=8, help="default %(default)s")
    g.add_argument("--rank", type=int, default=8, help="default %(default)s")
    g.add_argument("--alpha", type=int, default=None, help="LoRA alpha (default 2 x rank)")
    g.add_argument("--seed", type=int, default=0, help="default %(default)s")
    g = p.add_argument_group("workload")
    g.add_argument("--prompt-len", type=int, default=128, help="default %(default)s")
    g.add_argument("--batch", type=int, default=1, help="default %(default)s")
    g.add_argument(
        "--new-tokens", type=_int_list, default=[32, 128], help="comma list of generation lengths (default 32,128)"
    )
    g.add_argument(
        "--sweep-experts", type=_int_list, default=[2, 8, 32], help="expert counts of the sweep (default 2,8,32)"
    )
    g.add_argument(
        "--check-tokens", type=int, default=16, help="greedy tokens compared with peft before timing (default 16)"
    )
    g = p.add_argument_group("run")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="default float32")
    g.add_argument("--device", default="cpu", help="cpu or cuda[:i] (default cpu)")
    g.add_argument(
        "--repeats", type=int, default=3, help="timed calls per measurement (median), after one warm-up (default 3)"
    )
    g.add_argument(
        "--prefill-repeats",
        type=int,
        default=10,
        help="timed calls per prefill forward (median; cheap, so more than --repeats) (default 10)",
    )
    g.add_argument(
        "--peft-long-repeats",
        type=int,
        default=1,
        help="timed calls of peft's generation at lengths > the first --new-tokens (slow: no KV cache)",
    )
    g.add_argument("--threads", type=int, default=None, help="torch threads (default: all cores)")
    g.add_argument("--upcast-experts", action="store_true", help="keep experts in float32 (upcast_experts=True)")
    g.add_argument(
        "--quantize",
        choices=QUANTIZE,
        default="none",
        help="also time and measure the base quantized this way against xlora-hub on it (section 'quantized')",
    )
    g.add_argument("--workdir", default=None, help="where experts are saved (default: a temp folder)")
    p.add_argument("--memory-worker", default=None, help=argparse.SUPPRESS)  # internal: "model:phase,..."
    args = p.parse_args(argv)

    if args.quick:  # quick sizes replace the defaults only, never flags given explicitly
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--")}
        for key, value in QUICK.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
    if args.intermediate is None:
        args.intermediate = 4 * args.hidden
    if args.alpha is None:
        args.alpha = 2 * args.rank
    if args.threads is None:
        args.threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    if args.sections is None:
        args.sections = list(DEFAULT_SECTIONS)
    if args.profile and "profile" not in args.sections:
        args.sections.append("profile")
    if args.quantize != "none" and "quantized" not in args.sections:
        args.sections.append("quantized")
    if "quantized" in args.sections and args.quantize == "none":
        p.error("the 'quantized' section needs --quantize bnb-nf4, bnb-int8 or torchao-int8")
    args.torch_dtype = getattr(torch, args.dtype)
    args.new_tokens = sorted(set(args.new_tokens))
    return args


# ---------------------------------------------------------------------------------------------- models
def make_base(args: argparse.Namespace) -> torch.nn.Module:
    """The base model: same seed, same weights every call."""
    import transformers as tf

    torch.manual_seed(args.seed)
    config = tf.LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=max(256, args.prompt_len + max(args.new_tokens) + 8),
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        use_cache=True,
    )
    model = tf.LlamaForCausalLM(config).eval()
    model.generation_config.use_cache = True
    model.generation_config.pad_token_id = 0
    return model.to(device=args.device, dtype=args.torch_dtype)


def save_experts(args: argparse.Namespace, n: int, root: Path) -> list[Path]:
    """Save ``n`` peft LoRA adapters with random non-zero A and B (seeded per expert), in float32."""
    from peft import LoraConfig, get_peft_model

    dirs = [root / f"expert_{i}" for i in range(n)]
    if all((d / "adapter_config.json").is_file() for d in dirs):
        return dirs
    base_args = argparse.Namespace(**{**vars(args), "device": "cpu", "torch_dtype": torch.float32})
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGET_MODULES, lora_dropout=0.0)
    peft_model = get_peft_model(make_base(base_args), lora)
    scale = 0.03
    for i, path in enumerate(dirs):
        gen = torch.Generator().manual_seed(1000 * (args.seed + 1) + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
        peft_model.save_pretrained(str(path))
    return dirs


def make_peft(args: argparse.Namespace, dirs: list[Path]) -> torch.nn.Module:
    """peft's XLoraModel (experts named "0".."n-1" and ``use_cache=False``, as peft requires)."""
    from peft import XLoraConfig as PeftXLoraConfig
    from peft import get_peft_model

    base = make_base(args)
    base.config.use_cache = False
    config = PeftXLoraConfig(
        task_type="CAUSAL_LM", hidden_size=args.hidden, adapters={str(i): str(d) for i, d in enumerate(dirs)}
    )
    torch.manual_seed(args.seed + 1)  # the classifier's initial weights
    # Experts in the model's dtype unless upcast, as xlora-hub does, so both compute the same thing.
    model = get_peft_model(base, config, autocast_adapter_dtype=args.upcast_experts).eval()
    return model.to(args.device)


def make_ours(args: argparse.Namespace, dirs: list[Path], peft_model: torch.nn.Module | None) -> torch.nn.Module:
    """xlora-hub's XLoraModel over the same experts, with peft's classifier weights copied in (if given)."""
    from xlora_hub import XLoraConfig, XLoraModel

    config = XLoraConfig(experts={f"expert_{i}": str(d) for i, d in enumerate(dirs)}, hidden_size=args.hidden)
    model = XLoraModel.from_experts(make_base(args), config, upcast_experts=args.upcast_experts)
    if peft_model is not None:
        state = peft_model.base_model.internal_xlora_classifier.state_dict()
        model.classifier.load_state_dict({k: v.detach().clone() for k, v in state.items()})
    model.generation_config.use_cache = True
    return model.to(args.device).eval()


@dataclass
class Models:
    base: torch.nn.Module
    peft: torch.nn.Module
    ours: torch.nn.Module
    n_experts: int


def build_models(args: argparse.Namespace, dirs: list[Path]) -> Models:
    peft_model = make_peft(args, dirs)
    return Models(base=make_base(args), peft=peft_model, ours=make_ours(args, dirs, peft_model), n_experts=len(dirs))


def make_inputs(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(args.seed + 2)
    ids = torch.randint(3, args.vocab, (args.batch, args.prompt_len), generator=gen)
    return {"input_ids": ids.to(args.device), "attention_mask": torch.ones_like(ids).to(args.device)}


# ---------------------------------------------------------------------------------------------- calls
def forward_fn(name: str, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Callable[[], Any]:
    """One prefill forward. Base and xlora-hub fill their KV cache as generation does; peft cannot."""
    kwargs = dict(inputs) if name == "peft" else {**inputs, "use_cache": True}

    def call():
        with torch.no_grad():
            return model(**kwargs)

    return call


def generate_fn(name: str, model: torch.nn.Module, inputs: dict[str, torch.Tensor], n: int) -> Callable[[], Any]:
    """Greedy generation of exactly ``n`` tokens. Base and xlora-hub use their KV cache; peft forces it off."""
    kwargs = dict(inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
    if name != "peft":
        kwargs["use_cache"] = True

    def call():
        with torch.no_grad():
            return model.generate(**kwargs)

    return call


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@dataclass
class Job:
    """One thing to time: ``repeats`` timed calls, after one untimed warm-up call unless ``warmup=False``."""

    fn: Callable[[], Any]
    repeats: int
    warmup: bool = True


def timed(jobs: dict[str, Job], *, device: str) -> dict[str, tuple[float, Any]]:
    """Median wall time and last result of each job, the jobs' calls interleaved round-robin.

    Interleaving spreads any change of machine load over all the models alike, so the ratios
    between them stay fair even when the absolute times drift.
    """
    results: dict[str, Any] = {name: job.fn() for name, job in jobs.items() if job.warmup}
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for i in range(max(job.repeats for job in jobs.values())):
        for name, job in jobs.items():
            if i >= max(1, job.repeats):
                continue
            _sync(device)
            start = time.perf_counter()
            results[name] = job.fn()
            _sync(device)
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), results[name]) for name in jobs}


def count_flops(fn: Callable[[], Any]) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------- output
def print_table(title: str, headers: list[str], rows: list[list[Any]], notes: list[str] = ()) -> None:
    cells = [[_fmt(c) for c in row] for row in rows]
    numeric = [all(isinstance(row[i], (int, float)) for row in rows) for i in range(len(headers))]
    widths = [max(len(h), *(len(r[i]) for r in cells)) for i, h in enumerate(headers)]
    print(f"\n### {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(headers, widths)) + " |")
    print("|" + "|".join("-" * (w + 1) + (":" if num else "-") for w, num in zip(widths, numeric)) + "|")
    for row in cells:
        print("| " + " | ".join(c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric)) + " |")
    for note in notes:
        print(f"\n{note}")
    sys.stdout.flush()


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _load() -> str:
    if not hasattr(os, "getloadavg"):
        return "n/a"
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


# ---------------------------------------------------------------------------------------------- sections
def check_equivalence(args: argparse.Namespace, models: Models, inputs: dict[str, torch.Tensor]) -> None:
    """Same prefill logits and same greedy tokens as peft, before anything is timed."""
    with torch.no_grad():
        peft_logits = models.peft(**inputs).logits.float()
        ours_logits = models.ours(**inputs).logits.float()
    diff = (peft_logits - ours_logits).abs().max().item()
    exact = args.torch_dtype == torch.float32
    tol = 1e-4 if exact else 0.05 * peft_logits.abs().max().item()
    peft_tokens = generate_fn("peft", models.peft, inputs, args.check_tokens)()
    ours_tokens = generate_fn("ours", models.ours, inputs, args.check_tokens)()
    same = torch.equal(peft_tokens, ours_tokens)
    agree = (peft_tokens == ours_tokens).float().mean().item() if peft_tokens.shape == ours_tokens.shape else 0.0
    print(
        f"check vs peft ({models.n_experts} experts): max |logit diff| = {diff:.2e} (tolerance {tol:.1e}); "
        f"{args.check_tokens} greedy tokens {'identical' if same else f'differ ({agree:.0%} agree)'}"
    )
    if diff > tol:
        raise SystemExit(f"xlora-hub's logits differ from peft's by {diff:.3e} > {tol:.1e}: not benchmarking.")
    if not same and exact:
        raise SystemExit("xlora-hub's greedy tokens differ from peft's in float32: not benchmarking.")
    if not same:
        print(f"  note: {args.dtype} rounding differs between the stacked and per-expert sums; tokens may drift.")


def measure_prefill(args: argparse.Namespace, models: Models, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    fns = {name: forward_fn(name, getattr(models, name), inputs) for name in ("base", "peft", "ours")}
    timings = timed({name: Job(fn, args.prefill_repeats) for name, fn in fns.items()}, device=args.device)
    out: dict[str, Any] = {name: timings[name][0] for name in fns}
    for name, fn in fns.items():
        out[f"{name}_flops"] = count_flops(fn)
    return out


def section_prefill(args: argparse.Namespace, models: Models, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    r = measure_prefill(args, models, inputs)
    rows = []
    for name, label in (("base", "base model"), ("peft", "peft X-LoRA"), ("ours", "xlora-hub")):
        t_ratio = r[name] / r["base"]
        f_ratio = r[f"{name}_flops"] / r["base_flops"]
        rows.append([label, r[name] * 1e3, t_ratio, r[f"{name}_flops"] / 1e9, f_ratio, t_ratio / f_ratio])
    q = rows[2][5]
    print_table(
        f"Prefill forward ({args.batch}x{args.prompt_len} tokens, {models.n_experts} experts)",
        ["model", "ms", "time x base", "GFLOP", "FLOP x base", "time ratio / FLOP ratio"],
        rows,
        [
            f"target: xlora-hub time ratio within 15% of its FLOP ratio (quotient <= 1.15): {q:.2f} -> {_verdict(q <= 1.15)}"
        ],
    )
    return r


def section_generate(args: argparse.Namespace, models: Models, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
    results: dict[tuple[str, int], float] = {}
    outputs: dict[tuple[str, int], torch.Tensor] = {}
    first = args.new_tokens[0]
    for n in args.new_tokens:
        jobs = {}
        for name in ("base", "peft", "ours"):
            fn = generate_fn(name, getattr(models, name), inputs, n)
            slow = name == "peft" and n > first
            # peft's long runs reuse the warm-up of its first length (same code path, just longer).
            jobs[name] = Job(fn, args.peft_long_repeats if slow else args.repeats, warmup=not slow)
        for name, (seconds, output) in timed(jobs, device=args.device).items():
            results[name, n], outputs[name, n] = seconds, output
            if outputs[name, n].shape[1] != inputs["input_ids"].shape[1] + n:
                raise SystemExit(f"{name} generated {outputs[name, n].shape[1] - args.prompt_len} tokens, not {n}.")
    for n in args.new_tokens:
        if args.torch_dtype == torch.float32 and not torch.equal(outputs["peft", n], outputs["ours", n]):
            raise SystemExit(f"xlora-hub's {n} greedy tokens differ from peft's.")
    rows = []
    for n in args.new_tokens:
        for name, label in (
            ("base", "base model (KV cache)"),
            ("peft", "peft X-LoRA (no cache)"),
            ("ours", "xlora-hub"),
        ):
            t = results[name, n]
            tps = args.batch * n / t
            reps = args.peft_long_repeats if (name == "peft" and n > first) else args.repeats
            rows.append(
                [
                    label,
                    n,
                    reps,
                    t,
                    tps,
                    t / n * 1e3,
                    results["peft", n] / t,
                    results["base", n] / t,
                ]
            )
    notes = []
    if len(args.new_tokens) > 1:
        lo, hi = args.new_tokens[0], args.new_tokens[-1]
        parts = []
        for name, label in (("base", "base"), ("peft", "peft"), ("ours", "xlora-hub")):
            marginal = (results[name, hi] - results[name, lo]) / (hi - lo) * 1e3
            parts.append(
                f"{label} {results[name, lo] / lo * 1e3:.1f} -> {results[name, hi] / hi * 1e3:.1f} "
                f"(marginal {marginal:.1f})"
            )
        notes.append(
            f"ms/token at {lo} -> {hi} new tokens (marginal = extra time per extra token): " + "; ".join(parts)
        )
    n = args.new_tokens[-1]
    vs_peft = results["peft", n] / results["ours", n]
    vs_base = results["base", n] / results["ours", n]
    notes.append(
        f"targets at {n} new tokens: xlora-hub >= 8x peft tokens/s: {vs_peft:.1f}x -> {_verdict(vs_peft >= 8)}; "
        f">= 0.38x base tokens/s: {vs_base:.2f}x -> {_verdict(vs_base >= 0.38)}"
    )
    if args.peft_long_repeats < args.repeats and len(args.new_tokens) > 1:
        notes.append(
            f"peft at > {first} new tokens is timed {args.peft_long_repeats}x (no warm-up: it reuses the "
            f"{first}-token warm-up); all other rows are medians of {args.repeats} after a warm-up."
        )
    print_table(
        f"Greedy generation ({args.batch}x{args.prompt_len}-token prompt, {models.n_experts} experts; "
        "time includes the prompt's prefill)",
        ["model", "new tokens", "runs", "s", "tokens/s", "ms/token", "x peft tokens/s", "x base tokens/s"],
        rows,
        notes,
    )
    return {"results": results}


def section_sweep(args: argparse.Namespace, inputs: dict[str, torch.Tensor], dirs: list[Path]) -> None:
    rows = []
    for n in args.sweep_experts:
        models = build_models(args, dirs[:n])
        with torch.no_grad():
            diff = (models.peft(**inputs).logits.float() - models.ours(**inputs).logits.float()).abs().max().item()
        r = measure_prefill(args, models, inputs)
        f_ratio = r["ours_flops"] / r["base_flops"]
        t_ratio = r["ours"] / r["base"]
        rows.append(
            [
                n,
                r["base"] * 1e3,
                r["peft"] * 1e3,
                r["peft"] / r["base"],
                r["ours"] * 1e3,
                t_ratio,
                f_ratio,
                t_ratio / f_ratio,
                f"{diff:.1e}",
            ]
        )
        del models
    print_table(
        f"Expert-count sweep, prefill forward ({args.batch}x{args.prompt_len} tokens)",
        [
            "experts",
            "base ms",
            "peft ms",
            "peft x base",
            "xlora-hub ms",
            "xlora-hub x base",
            "FLOP x base",
            "time/FLOP ratio",
            "max |logit diff| vs peft",
        ],
        rows,
        ["target: time/FLOP ratio <= 1.15 at 8 and 32 experts"],
    )


# ---------------------------------------------------------------------------------------------- memory
MEMORY_PHASES = [(m, p) for p in ("prefill", "generate") for m in ("base", "peft", "ours")]


def _rss_mib() -> tuple[float, float]:
    """Current and peak (since the last reset) resident set size of this process, MiB."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                values[line.split(":")[0]] = int(line.split()[1]) / 1024
    return values["VmRSS"], values["VmHWM"]


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM (peak RSS) to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def memory_worker(args: argparse.Namespace) -> None:
    """Subprocess: build one model, run its phases, print one JSON line per phase."""
    import gc

    cuda = str(args.device).startswith("cuda")
    dirs = save_experts(args, args.experts, Path(args.workdir))
    inputs = make_inputs(args)
    rss_import = _rss_mib()[0]
    for spec in args.memory_worker.split(","):
        model_name, phase = spec.split(":")
        model = {
            "base": lambda: make_base(args),
            "peft": lambda: make_peft(args, dirs),
            "ours": lambda: make_ours(args, dirs, None),
        }[model_name]()
        if phase == "prefill":
            fn = forward_fn(model_name, model, inputs)
        else:
            fn = generate_fn(model_name, model, inputs, args.new_tokens[0])
        params = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
        gc.collect()
        if cuda:
            torch.cuda.synchronize()
            before = torch.cuda.memory_allocated() / 2**20
            torch.cuda.reset_peak_memory_stats()
            fn()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated() / 2**20
            record = dict(
                model=model_name, phase=phase, params_mib=params / 2**20, after_build=before, peak=peak, kind="cuda"
            )
        else:
            before = _rss_mib()[0]
            exact = _reset_peak()
            fn()
            peak = _rss_mib()[1] if exact else _ru_maxrss_mib()
            record = dict(
                model=model_name,
                phase=phase,
                params_mib=params / 2**20,
                after_build=before - rss_import,
                peak=peak,
                before=before,
                kind="rss" if exact else "ru_maxrss",
            )
        print("MEMORY " + json.dumps(record), flush=True)
        del model, fn  # collected before the next phase is measured


def _ru_maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _worker_argv(args: argparse.Namespace, specs: list[str]) -> list[str]:
    argv = [sys.executable, os.path.abspath(__file__), "--memory-worker", ",".join(specs), "--workdir", args.workdir]
    for key in (
        "hidden",
        "intermediate",
        "layers",
        "heads",
        "kv_heads",
        "vocab",
        "experts",
        "rank",
        "alpha",
        "seed",
        "prompt_len",
        "batch",
        "dtype",
        "device",
        "threads",
    ):
        argv += ["--" + key.replace("_", "-"), str(getattr(args, key))]
    argv += ["--new-tokens", ",".join(map(str, args.new_tokens))]
    if args.upcast_experts:
        argv.append("--upcast-experts")
    return argv


def section_memory(args: argparse.Namespace) -> None:
    specs = [f"{m}:{p}" for m, p in MEMORY_PHASES]
    # One fresh process per phase, so no phase inherits another's allocator pools; --quick shares one.
    groups = [specs] if args.quick else [[s] for s in specs]
    records = []
    for group in groups:
        proc = subprocess.run(_worker_argv(args, group), capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise SystemExit(f"memory worker {group} failed:\n{proc.stderr[-3000:]}")
        records += [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("MEMORY ")]
    labels = {"base": "base model", "peft": "peft X-LoRA", "ours": "xlora-hub"}
    cuda = records and records[0]["kind"] == "cuda"
    rows = []
    for r in records:
        phase = "prefill" if r["phase"] == "prefill" else f"generate {args.new_tokens[0]}"
        if cuda:
            rows.append(
                [labels[r["model"]], phase, r["params_mib"], r["after_build"], r["peak"], r["peak"] - r["after_build"]]
            )
        else:
            rows.append(
                [labels[r["model"]], phase, r["params_mib"], r["after_build"], r["peak"] - r["before"], r["peak"]]
            )
    if cuda:
        headers = ["model", "phase", "weights MiB", "allocated after build MiB", "peak allocated MiB", "peak - before"]
        notes = ["torch.cuda.max_memory_allocated during the first call, one fresh process per phase."]
    else:
        headers = ["model", "phase", "weights MiB", "RSS of build MiB", "peak RSS rise MiB", "peak RSS MiB"]
        how = "VmHWM reset before the call" if records and records[0]["kind"] == "rss" else "ru_maxrss (no reset)"
        notes = [
            "Each phase runs in a fresh process ("
            + ("--quick: one process for all" if args.quick else "one per row")
            + f"). weights = parameters + buffers; RSS of build = RSS after building the model minus RSS after the "
            f"imports; peak RSS rise = peak RSS during the first (cold) call minus RSS just before it ({how}); "
            "peak RSS = the whole process, interpreter and libraries included."
        ]
    print_table(
        f"Peak memory ({args.experts} experts, {args.batch}x{args.prompt_len}-token prompt)", headers, rows, notes
    )


# ---------------------------------------------------------------------------------------------- profile
def section_profile(args: argparse.Namespace, models: Models, inputs: dict[str, torch.Tensor]) -> None:
    from torch.profiler import ProfilerActivity, profile
    from transformers import DynamicCache

    from xlora_hub import XLoraCache

    ours = models.ours
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if str(args.device).startswith("cuda") else [])
    sort = "self_cuda_time_total" if str(args.device).startswith("cuda") else "self_cpu_time_total"
    prefill = forward_fn("ours", ours, inputs)
    prefill()
    with profile(activities=activities) as prof:
        prefill()
    print(
        f"\n### Profile: xlora-hub prefill forward ({args.batch}x{args.prompt_len} tokens), top 10 ops by self time\n"
    )
    print(prof.key_averages().table(sort_by=sort, row_limit=10))

    steps = 8
    walls = {}
    for name in ("base", "ours"):
        model = getattr(models, name)
        cache = XLoraCache(config=ours.config) if name == "ours" else DynamicCache(config=model.config)
        step = _decoder(model, cache, inputs)
        step(2)  # warm-up
        walls[name] = statistics.median(step(1) for _ in range(steps))
        if name == "ours":
            with profile(activities=activities) as prof:
                step(steps)
    averages = prof.key_averages()
    op_ms = sum(e.self_cpu_time_total for e in averages) / 1e3 / steps
    print(f"\n### Profile: xlora-hub decode steps (forward with KV cache), {steps} steps, top 10 ops by self time\n")
    print(averages.table(sort_by=sort, row_limit=10))
    print(
        f"decode step wall time (no profiler, median of {steps}): base {walls['base'] * 1e3:.2f} ms, xlora-hub "
        f"{walls['ours'] * 1e3:.2f} ms ({walls['ours'] / walls['base']:.2f}x); xlora-hub's op self time in the "
        f"profile: {op_ms:.2f} ms/step (the rest of a step is Python and dispatch)"
    )

    n = args.new_tokens[0]
    gen = generate_fn("ours", ours, inputs, n)
    gen()
    profiler = cProfile.Profile()
    profiler.enable()
    gen()
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stats.sort_stats("tottime").print_stats(15)
    stream.write("\n--- xlora_hub's own functions by cumulative time ---\n")
    stats.sort_stats("cumtime").print_stats("xlora_hub", 10)
    print(f"\n### Profile: xlora-hub generate({n} new tokens), Python functions by own time (cProfile)\n")
    print("\n".join(line for line in stream.getvalue().splitlines() if line.strip()))


def _decoder(model: torch.nn.Module, cache: Any, inputs: dict[str, torch.Tensor]) -> Callable[[int], float]:
    """Prefill ``cache`` with the prompt; return ``step(n)``: n greedy decode forwards, wall seconds per step."""
    state = {"mask": inputs["attention_mask"]}
    with torch.no_grad():
        state["token"] = model(**inputs, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)

    def step(n: int) -> float:
        with torch.no_grad():
            _sync(str(state["token"].device))
            start = time.perf_counter()
            for _ in range(n):
                state["mask"] = torch.cat([state["mask"], torch.ones_like(state["token"])], dim=1)
                out = model(
                    input_ids=state["token"], attention_mask=state["mask"], past_key_values=cache, use_cache=True
                )
                state["token"] = out.logits[:, -1:].argmax(-1)
            _sync(str(state["token"].device))
            return (time.perf_counter() - start) / n

    return step


# ---------------------------------------------------------------------------------------------- quantized
def quantization_config(args: argparse.Namespace) -> Any:
    """transformers' quantization config for ``--quantize`` (compute dtype: ``--dtype``)."""
    import transformers as tf

    if args.quantize == "bnb-nf4":
        return tf.BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=args.torch_dtype
        )
    if args.quantize == "bnb-int8":
        return tf.BitsAndBytesConfig(load_in_8bit=True)
    from torchao.quantization import Int8WeightOnlyConfig

    return tf.TorchAoConfig(quant_type=Int8WeightOnlyConfig())


def make_quantized_base(args: argparse.Namespace) -> torch.nn.Module:
    """The benchmark's base (same seed), saved once and loaded back quantized by transformers, as users load one."""
    import transformers as tf

    folder = Path(args.workdir) / "base_model"
    if not (folder / "config.json").is_file():
        make_base(argparse.Namespace(**{**vars(args), "device": "cpu", "torch_dtype": torch.float32})).save_pretrained(
            folder
        )
    model = tf.AutoModelForCausalLM.from_pretrained(
        folder, quantization_config=quantization_config(args), dtype=args.torch_dtype, device_map=args.device
    ).eval()
    model.generation_config.use_cache = True
    model.generation_config.pad_token_id = 0
    return model


def storage_mib(module: torch.nn.Module) -> float:
    """Bytes held by parameters and buffers, quantized ones by their real storage (tensor subclasses flattened)."""

    def nbytes(t: torch.Tensor) -> int:
        flatten = getattr(t, "__tensor_flatten__", None)
        if flatten is not None and type(t) not in (torch.Tensor, torch.nn.Parameter):
            names, _ = flatten()
            return sum(nbytes(getattr(t, name)) for name in names)
        return t.numel() * t.element_size()

    return sum(nbytes(t) for t in list(module.parameters()) + list(module.buffers())) / 2**20


def section_quantized(args: argparse.Namespace, dirs: list[Path], inputs: dict[str, torch.Tensor]) -> None:
    """Quantized base against xlora-hub on it: memory, prefill time and tokens/s, timed interleaved."""
    from xlora_hub import XLoraConfig, XLoraModel

    cuda = str(args.device).startswith("cuda")
    peaks: dict[str, float] = {}
    models: dict[str, torch.nn.Module] = {}
    for name in ("base", "ours"):
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        model = make_quantized_base(args)
        if name == "ours":
            config = XLoraConfig(experts={f"expert_{i}": str(d) for i, d in enumerate(dirs)}, hidden_size=args.hidden)
            model = XLoraModel.from_experts(model, config, upcast_experts=args.upcast_experts).eval()
            model.generation_config.use_cache = True
        generate_fn(name, model, inputs, args.new_tokens[0])()  # warm-up, and the peak of a first generation
        if cuda:
            torch.cuda.synchronize()
            peaks[name] = torch.cuda.max_memory_allocated() / 2**20
        models[name] = model
    with torch.no_grad():
        ours_logits = models["ours"](**inputs).logits.float()
        with models["ours"].disable_adapter():
            base_logits = models["ours"](**inputs).logits.float()
    quantization = (
        models["ours"].xlora_config.base_model.quantization if models["ours"].xlora_config.base_model else None
    )
    prefill = timed(
        {name: Job(forward_fn(name, m, inputs), args.prefill_repeats) for name, m in models.items()}, device=args.device
    )
    rows = []
    for n in args.new_tokens:
        gen = timed(
            {name: Job(generate_fn(name, m, inputs, n), args.repeats) for name, m in models.items()}, device=args.device
        )
        for name, label in (("base", f"{args.quantize} base model"), ("ours", f"xlora-hub on {args.quantize}")):
            weights = storage_mib(models[name])
            tps = args.batch * n / gen[name][0]
            rows.append(
                [
                    label,
                    n,
                    weights,
                    peaks.get(name),
                    prefill[name][0] * 1e3,
                    prefill[name][0] / prefill["base"][0],
                    tps,
                    gen["base"][0] / gen[name][0],
                ]
            )
    full = storage_mib(make_base(args))
    print_table(
        f"Quantized base ({args.quantize}, recorded as {quantization!r}; {len(dirs)} experts, "
        f"{args.batch}x{args.prompt_len}-token prompt)",
        [
            "model",
            "new tokens",
            "weights MiB",
            "peak allocated MiB",
            "prefill ms",
            "prefill x base",
            "tokens/s",
            "x base tokens/s",
        ],
        rows,
        [
            f"full-precision ({args.dtype}) base weights: {full:.2f} MiB. Peak allocated: CUDA only "
            "(torch.cuda.max_memory_allocated over building the model and its first generation). "
            f"xlora-hub's experts change the logits by up to {(ours_logits - base_logits).abs().max().item():.2e}."
        ],
    )


# ---------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.memory_worker:
        memory_worker(args)
        return 0
    import warnings

    import peft
    import transformers

    import xlora_hub

    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="xlora-bench-") as tmp:
        if args.workdir is None:
            args.workdir = tmp
        root = Path(args.workdir)
        print(
            f"xlora-hub {xlora_hub.__version__} | peft {peft.__version__} | transformers {transformers.__version__} | "
            f"torch {torch.__version__} | {args.device} {args.dtype} | {args.threads} threads | "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} | load avg 1/5/15 min {_load()}"
        )
        print(
            f"Llama: hidden {args.hidden}, MLP {args.intermediate}, {args.layers} layers, {args.heads} heads "
            f"({args.kv_heads} kv), vocab {args.vocab}; experts: {args.experts} x rank {args.rank} (alpha "
            f"{args.alpha}) on {', '.join(TARGET_MODULES)}; prompt {args.batch}x{args.prompt_len}; "
            f"medians of {args.prefill_repeats} (prefill) / {args.repeats} (generation) timed calls after a warm-up"
            + ("; --upcast-experts" if args.upcast_experts else "")
        )
        counts = [args.experts] + (args.sweep_experts if "sweep" in args.sections else [])
        dirs = save_experts(args, max(counts), root)
        inputs = make_inputs(args)
        needs_models = {"prefill", "generate", "profile"} & set(args.sections)
        models = build_models(args, dirs[: args.experts]) if needs_models else None
        if models is not None:
            check_equivalence(args, models, inputs)
        if "prefill" in args.sections:
            section_prefill(args, models, inputs)
        if "generate" in args.sections:
            section_generate(args, models, inputs)
        if "sweep" in args.sections:
            section_sweep(args, inputs, dirs)
        if "memory" in args.sections:
            section_memory(args)
        if "profile" in args.sections:
            section_profile(args, models, inputs)
        if "quantized" in args.sections:
            section_quantized(args, dirs[: args.experts], inputs)
    print(f"\ntotal time: {time.perf_counter() - started:.0f} s | load avg 1/5/15 min at the end {_load()}")
    print(
        "(a load average above the thread count means other processes shared the cores: absolute times are then "
        "inflated; the models are timed interleaved, so their ratios are less affected)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
