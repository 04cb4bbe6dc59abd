"""Benchmark: xlora-hub against peft's X-LoRA and the base model, measured side by side in one run.

Builds a Llama-style model from a config with seeded random weights, saves random LoRA experts with
peft, and wraps them twice over the same experts: peft's ``XLoraModel`` (the reference) and
``xlora_hub.XLoraModel`` with peft's classifier weights copied in. Before any timing it checks that
both give the same prefill logits and the same greedy tokens. Then it prints one table per section:

* ``prefill``:  one forward over the prompt (batch 1); time and FLOP ratios to the base model.
* ``generate``: greedy generation of each ``--new-tokens`` length (``min_new_tokens=max_new_tokens``).
* ``sweep``:    the prefill forward at each ``--sweep-experts`` count.
* ``memory``:   peak memory of each model and phase, each measured in a fresh subprocess.
* ``static``:   greedy generation with ``cache_implementation="static"``, xlora-hub against the base model on it.
* ``compiled``: the same with transformers' auto-compile (``compile_config``), each against the base model compiled.
* ``lookahead``: xlora-hub's exact look-ahead scaling pass (``scaling_lookahead=``), its acceptance rate, against the
  base model with the same cache.
* ``demo``:     the embedded demo mixture (``xlora_hub.demo``), one thread: base model and xlora-hub per decoding mode.
* ``mistralrs``: mistral.rs 0.6.0's X-LoRA on the demo mixture (exported by ``xlora_hub.convert``), run in a
  subprocess with ``--mistralrs-python``, beside the base model and xlora-hub; skipped with the reason when absent.
* ``profile``:  (not in the default run) where xlora-hub's prefill and decode steps spend their time.
* ``quantized``: with ``--quantize`` (added to the run): the base quantized by transformers
  (bitsandbytes nf4 / int8, torchao int8 weight-only) against xlora-hub over that same quantized base:
  weight memory, peak memory (CUDA), prefill time and greedy tokens/s. peft's X-LoRA is not in this
  table: it cannot run on a bitsandbytes base.

Times are medians over ``--repeats`` after one warm-up call. A decoding feature that the installed xlora-hub
lacks (it raises on the first call) prints ``n/a (reason)`` in its row instead of a number, so the script runs on
any branch. The run ends with issue 13's targets: today's figures, this run's, the target. Run ``--help`` for the
flags; ``--quick`` runs the smallest sizes (the smoke test uses it).
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
SECTIONS = (
    "prefill",
    "generate",
    "static",
    "compiled",
    "lookahead",
    "sweep",
    "memory",
    "demo",
    "mistralrs",
    "profile",
    "quantized",
)
QUANTIZE = ("none", "bnb-nf4", "bnb-int8", "torchao-int8")
DEFAULT_SECTIONS = SECTIONS[:-2]
TARGET_SECTIONS = {"prefill", "generate", "static", "compiled", "lookahead", "sweep", "demo", "mistralrs"}
"""The sections that issue 13's targets table reports on: it is printed when one of them ran."""
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
    compile_backend="eager",  # dynamo traces the step (graph breaks still fail), without inductor's minute of codegen
    demo_recipe="small",
    demo_new_tokens=8,
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


def _fraction(value: str) -> float:
    """``--expert-scale``: a fraction strictly between 0 and 1."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number such as 0.03, got {value!r}") from None
    if not 0 < number < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction between 0 and 1 (such as 0.03), got {value!r}")
    return number


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
    g.add_argument(
        "--expert-scale",
        type=_fraction,
        default=None,
        help="rescale each expert's B factor so that its delta is about this fraction of each projection's output "
        "norm on the prompt (real fine-tunes: 0.02-0.05), for a realistic look-ahead acceptance; default: the "
        "random factors as drawn (the measured ratio is printed either way)",
    )
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
    g.add_argument(
        "--compile-backend",
        default="inductor",
        help="torch.compile backend of the 'compiled' section (default inductor; --quick: eager, which skips codegen)",
    )
    g.add_argument("--workdir", default=None, help="where experts are saved (default: a temp folder)")
    g = p.add_argument_group("demo mixture (sections demo, mistralrs)")
    g.add_argument(
        "--demo-cache",
        default=None,
        help="where the demo mixture is built and cached (default $XLORA_HUB_CACHE, else ~/.cache/xlora-hub)",
    )
    g.add_argument(
        "--demo-recipe",
        choices=["default", "small"],
        default="default",
        help="'small': a few training steps (seconds to build; its text is poor, its speed is the same model's)",
    )
    g.add_argument("--demo-new-tokens", type=int, default=64, help="default %(default)s")
    g.add_argument("--demo-prompt-chars", type=int, default=32, help="prompt length in characters (default 32)")
    g.add_argument("--demo-threads", type=int, default=1, help="torch (and mistral.rs) threads (default 1)")
    g.add_argument(
        "--mistralrs-python",
        default=None,
        help="interpreter that can import mistralrs 0.6.0 (e.g. its own venv's bin/python; default: this one)",
    )
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


def expert_dirs(args: argparse.Namespace, n: int, root: Path) -> list[Path]:
    """Where the ``n`` experts are saved: rescaled experts (``--expert-scale``) get folders of their own."""
    suffix = "" if args.expert_scale is None else f"_scale{args.expert_scale:g}"
    return [root / f"expert_{i}{suffix}" for i in range(n)]


def save_experts(args: argparse.Namespace, n: int, root: Path) -> list[Path]:
    """Save ``n`` peft LoRA adapters with random non-zero A and B (seeded per expert), in float32.

    With ``--expert-scale S`` each module's B is then rescaled so that the expert's delta is S of the
    projection's output norm on the prompt (real fine-tunes move a projection by a few percent; random factors
    move it by about a quarter, which makes the base model a poor guess of the mixture's next token).
    """
    from peft import LoraConfig, get_peft_model

    dirs = expert_dirs(args, n, root)
    if all((d / "adapter_config.json").is_file() for d in dirs):
        return dirs
    base_args = argparse.Namespace(**{**vars(args), "device": "cpu", "torch_dtype": torch.float32})
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules=TARGET_MODULES, lora_dropout=0.0)
    peft_model = get_peft_model(make_base(base_args), lora).eval()
    inputs = make_inputs(base_args)
    scale = 0.03
    for i, path in enumerate(dirs):
        gen = torch.Generator().manual_seed(1000 * (args.seed + 1) + i)
        with torch.no_grad():
            for name, param in peft_model.named_parameters():
                if "lora_" in name:
                    param.copy_(torch.randn(param.shape, generator=gen) * scale)
            if args.expert_scale is not None:
                for module, ratio in lora_delta_ratios(peft_model, inputs).items():
                    module.lora_B["default"].weight.mul_(args.expert_scale / ratio)
        peft_model.save_pretrained(str(path))
    return dirs


def lora_delta_ratios(peft_model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> dict[torch.nn.Module, float]:
    """Each LoRA module's ``|delta| / |base output|`` (Frobenius norms over the prompt's tokens).

    Measured on the base model's own activations (adapters disabled), so one module's delta does not move
    another's inputs: a rescaling by ``S / ratio`` then gives each module the ratio ``S`` on these inputs.
    """
    ratios: dict[torch.nn.Module, float] = {}

    def hook(module: torch.nn.Module, hook_args: tuple, output: torch.Tensor) -> None:
        x = hook_args[0].to(module.lora_A["default"].weight.dtype)
        delta = module.lora_B["default"](module.lora_A["default"](x)) * module.scaling["default"]
        ratios[module] = (delta.norm() / module.base_layer(x).norm().clamp_min(1e-12)).item()

    modules = [m for m in peft_model.modules() if hasattr(m, "lora_A") and "default" in getattr(m, "lora_A", {})]
    handles = [m.register_forward_hook(hook) for m in modules]
    try:
        with torch.no_grad(), peft_model.disable_adapter():
            peft_model(**inputs)
    finally:
        for handle in handles:
            handle.remove()
    return ratios


def expert_ratio_summary(args: argparse.Namespace, dirs: list[Path]) -> str:
    """One line: the saved experts' delta / output norm ratios on the prompt (median and range), as loaded back."""
    from peft import PeftModel

    base_args = argparse.Namespace(**{**vars(args), "device": "cpu", "torch_dtype": torch.float32})
    inputs = make_inputs(base_args)
    values: list[float] = []
    for path in dirs:
        model = PeftModel.from_pretrained(make_base(base_args), str(path)).eval()
        values += lora_delta_ratios(model, inputs).values()
    how = (
        f"B rescaled by --expert-scale {args.expert_scale:g}"
        if args.expert_scale is not None
        else "random factors as drawn (--expert-scale S makes it S)"
    )
    return (
        f"expert delta / projection output norm on the prompt: median {statistics.median(values):.3f} "
        f"(range {min(values):.3f}-{max(values):.3f}, {len(values)} expert-projections; {how})"
    )


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
    return {"results": results, "ratio": vs_base}


def section_sweep(args: argparse.Namespace, inputs: dict[str, torch.Tensor], dirs: list[Path]) -> dict[int, float]:
    """The prefill at each expert count; returns each count's time ratio / FLOP ratio."""
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
        ["target: time/FLOP ratio <= 1.15 at 8 and 32 experts (issue 13: <= 1.05)"],
    )
    return {row[0]: row[7] for row in rows}


# ---------------------------------------------------------------------------------------------- decoding modes
@dataclass(frozen=True)
class NA:
    """A cell whose feature could not run here (not on this branch, or refused): printed ``n/a (reason)``."""

    reason: str

    def __str__(self) -> str:
        return f"n/a ({self.reason})"


def not_available(exc: BaseException) -> NA:
    """Why a call failed, short enough for a table cell: the exception's type and the start of its message."""
    lines = str(exc).strip().splitlines()
    message = lines[0] if lines else ""
    if len(message) > 90:
        message = message[:87] + "..."
    return NA(f"{type(exc).__name__}: {message}" if message else type(exc).__name__)


@dataclass(frozen=True)
class Mode:
    """One way of decoding: which model (``"base"`` or ``"ours"``), its cache, compiled or not, and look-ahead.

    ``lookahead=None`` passes no ``scaling_lookahead`` argument (the default path of the installed xlora-hub).
    """

    model: str
    cache: str = "dynamic"
    compiled: bool = False
    lookahead: bool | str | None = None

    @property
    def label(self) -> str:
        if self.model == "base":
            return "base model"
        return "xlora-hub" if self.lookahead is None else f"xlora-hub look-ahead={self.lookahead}"

    @property
    def setting(self) -> tuple[str, bool]:
        """What the base model must share with a row for a fair ratio: the cache and the compile setting."""
        return self.cache, self.compiled


@dataclass
class Decoded:
    """One mode's measurement: median seconds (or why none), first call (warm-up, compile), tokens, acceptance."""

    seconds: float | NA
    first: float | None = None
    tokens: torch.Tensor | None = None
    acceptance: float | None = None
    compiled: bool = False


def compile_config(args: argparse.Namespace) -> Any:
    """transformers' auto-compile settings: ``fullgraph=True, dynamic=False``, also on CPU (the contract's call)."""
    import transformers as tf

    kwargs: dict[str, Any] = dict(fullgraph=True, dynamic=False, backend=args.compile_backend)
    if args.compile_backend != "inductor":
        kwargs["mode"] = None  # "reduce-overhead" (CUDA graphs) is an inductor mode
    config = tf.CompileConfig(**kwargs)
    config._compile_all_devices = True  # transformers compiles on CPU only when told to
    return config


def decode_kwargs(args: argparse.Namespace, mode: Mode, n: int, pad_token_id: int) -> dict[str, Any]:
    """``generate`` arguments of ``mode``: exactly ``n`` greedy tokens."""
    kwargs: dict[str, Any] = dict(
        max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_token_id, use_cache=True
    )
    if mode.cache == "static":
        kwargs["cache_implementation"] = "static"
    if mode.compiled:
        kwargs["compile_config"] = compile_config(args)
    else:
        kwargs["disable_compile"] = True  # on CUDA transformers would compile a static cache's steps by itself
    if mode.lookahead is not None:
        kwargs["scaling_lookahead"] = mode.lookahead
    return kwargs


def _captured_graphs() -> int:
    """How many graphs torch.compile (dynamo) has captured in this process so far."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def run_modes(
    args: argparse.Namespace,
    models: dict[str, torch.nn.Module],
    inputs: dict[str, torch.Tensor],
    n: int,
    modes: list[Mode],
    *,
    pad_token_id: int = 0,
) -> dict[Mode, Decoded]:
    """Time each mode's generation of ``n`` tokens, interleaved; a mode whose first call raises gets ``n/a``.

    The first call of each mode is its warm-up (and its compile, timed and reported on its own); a compiled mode
    whose first call captures no graph is reported as not compiled.
    """
    results: dict[Mode, Decoded] = {}
    jobs: dict[Mode, Job] = {}
    for mode in modes:
        model = models[mode.model]
        kwargs = {**inputs, **decode_kwargs(args, mode, n, pad_token_id)}

        def call(model: torch.nn.Module = model, kwargs: dict[str, Any] = kwargs) -> tuple[torch.Tensor, Any]:
            with torch.no_grad():
                out = model.generate(**kwargs)
            return out, getattr(model, "lookahead_acceptance", None)

        _sync(args.device)
        graphs = _captured_graphs()
        start = time.perf_counter()
        try:
            call()
        except Exception as exc:  # a feature missing on this branch, or refused: the row says why
            results[mode] = Decoded(not_available(exc))
            continue
        _sync(args.device)
        # compiled: torch.compile captured a graph during this mode's first call (a mode's first call compiles)
        results[mode] = Decoded(0.0, first=time.perf_counter() - start, compiled=_captured_graphs() > graphs)
        jobs[mode] = Job(call, args.repeats, warmup=False)
    if jobs:
        for mode, (seconds, (tokens, acceptance)) in timed(jobs, device=args.device).items():
            results[mode].seconds, results[mode].tokens, results[mode].acceptance = seconds, tokens, acceptance
    return results


def reference_tokens(
    models: dict[str, torch.nn.Module], inputs: dict[str, torch.Tensor], n: int, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """Each model's greedy tokens on the plain dynamic-cache path (what every mode must reproduce)."""
    kwargs = dict(inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad_token_id)
    with torch.no_grad():
        return {name: model.generate(**kwargs, use_cache=True) for name, model in models.items()}


def _same_tokens(result: Decoded, reference: torch.Tensor) -> str:
    """``yes`` when a mode reproduced the plain path's tokens, else how much of them it did."""
    if result.tokens is None:
        return "-"
    if result.tokens.shape == reference.shape and torch.equal(result.tokens.cpu(), reference.cpu()):
        return "yes"
    if result.tokens.shape != reference.shape:
        return f"NO (shape {tuple(result.tokens.shape)})"
    return f"NO ({(result.tokens.cpu() == reference.cpu()).float().mean().item():.0%} agree)"


def mode_rows(
    args: argparse.Namespace,
    results: dict[Mode, Decoded],
    references: dict[str, torch.Tensor],
    n: int,
    batch: int,
) -> list[list[Any]]:
    """Table rows: one per mode, its tokens/s and its ratio to the base model with the same cache and compile."""
    base = {mode.setting: r for mode, r in results.items() if mode.model == "base"}
    rows = []
    for mode, r in results.items():
        cache = mode.cache + (" + compiled" if mode.compiled else "")
        if isinstance(r.seconds, NA):
            rows.append([mode.label, cache, n, "-", r.seconds, "-", "-", "-", "-", "-"])
            continue
        ref = base.get(mode.setting)
        ratio = ref.seconds / r.seconds if ref is not None and not isinstance(ref.seconds, NA) else "-"
        compiled = ("yes" if r.compiled else "NOT compiled") if mode.compiled else "-"
        rows.append(
            [
                mode.label,
                cache,
                n,
                r.first,
                batch * n / r.seconds,
                r.seconds / n * 1e3,
                ratio,
                r.acceptance,
                compiled,
                _same_tokens(r, references[mode.model]),
            ]
        )
    return rows


MODE_HEADERS = [
    "model",
    "cache",
    "new tokens",
    "first call s",
    "tokens/s",
    "ms/token",
    "x base (same cache)",
    "acceptance",
    "compiled",
    "same tokens as dynamic",
]


def _mode_notes(args: argparse.Namespace) -> list[str]:
    """What the columns of a decoding-mode table mean (printed under each)."""
    return [
        f"tokens/s: median of {args.repeats} generate calls after the first (warm-up; compile when compiled), time "
        "including the prompt's prefill; x base: against the base model with the same cache and compile setting, "
        "timed interleaved in this run; acceptance: `lookahead_acceptance` after the call (look-ahead only); same "
        "tokens: against the same model's plain dynamic-cache tokens. n/a: the call raised (feature not on this "
        "branch, or refused), with the reason."
    ]


def section_decoding(
    args: argparse.Namespace, models: Models, inputs: dict[str, torch.Tensor], which: str, summary: dict[str, Any]
) -> None:
    """The ``static``, ``compiled`` or ``lookahead`` table: xlora-hub's decoding modes against the base model's."""
    n = args.new_tokens[-1]
    if which == "static":
        modes = [Mode("base"), Mode("ours"), Mode("base", "static"), Mode("ours", "static")]
        title = "Static cache"
    elif which == "compiled":
        modes = [Mode("base", "static", True), Mode("ours", "static", True), Mode("ours", "static", True, True)]
        title = f"Compiled decoding (transformers auto-compile, backend {args.compile_backend}, fullgraph)"
    else:
        modes = [
            Mode("base"),
            Mode("ours", lookahead=False),
            Mode("ours", lookahead=True),
            Mode("ours", lookahead="auto"),
            Mode("base", "static"),
            Mode("ours", "static", lookahead=True),
        ]
        title = "Look-ahead scaling pass"
    pair = {"base": models.base, "ours": models.ours}
    results = run_modes(args, pair, inputs, n, modes)
    summary[which] = results
    rows = mode_rows(args, results, reference_tokens(pair, inputs, n, 0), n, args.batch)
    print_table(
        f"{title} ({args.batch}x{args.prompt_len}-token prompt, {models.n_experts} experts, greedy)",
        MODE_HEADERS,
        rows,
        _mode_notes(args),
    )


# ---------------------------------------------------------------------------------------------- demo mixture


@dataclass
class Demo:
    """The demo mixture as the demo and mistralrs sections use it."""

    folder: Path
    base: torch.nn.Module
    ours: torch.nn.Module
    tokenizer: Any
    prompt: str
    inputs: dict[str, torch.Tensor]


def demo_prompt(chars: int) -> str:
    """A deterministic prompt of ``chars`` characters: solved task examples (one task after another, space-separated)
    ending with an unsolved one, cut at the front, so the first generated tokens are an answer."""
    from xlora_hub.demo import TASKS, make_task_examples

    examples = {task: make_task_examples(task, chars, seed=123) for task in TASKS}
    text = ""
    i = 0
    while True:
        example = examples[TASKS[i % len(TASKS)]][i // len(TASKS)]
        if len(text) + len(example["prompt"]) >= chars:
            return (text + example["prompt"])[-chars:]
        text += example["prompt"] + example["completion"] + " "
        i += 1


def load_demo(args: argparse.Namespace) -> Demo:
    """Build (once, cached) and load the demo mixture, and a separate copy of its base model."""
    from transformers import AutoModelForCausalLM

    from xlora_hub.demo import BASE_MODEL_DIR, SMALL_RECIPE, build_demo_mixture, load_demo_mixture

    recipe = SMALL_RECIPE if args.demo_recipe == "small" else None
    started = time.perf_counter()
    folder = build_demo_mixture(cache_dir=args.demo_cache, recipe=recipe, progress=False)
    ours, tokenizer = load_demo_mixture(cache_dir=args.demo_cache, recipe=recipe, progress=False)
    base = AutoModelForCausalLM.from_pretrained(folder / BASE_MODEL_DIR).eval()
    for model in (ours, base):
        model.generation_config.use_cache = True
    prompt = demo_prompt(args.demo_prompt_chars)
    encoded = tokenizer(prompt, return_tensors="pt")
    inputs = {"input_ids": encoded["input_ids"], "attention_mask": encoded["attention_mask"]}
    print(
        f"\ndemo mixture: {folder} ({args.demo_recipe} recipe; ready in {time.perf_counter() - started:.0f} s); "
        f"prompt {prompt!r} ({inputs['input_ids'].shape[1]} tokens)"
    )
    return Demo(folder, base, ours, tokenizer, prompt, inputs)


def demo_answers(demo: Demo, models: dict[str, torch.nn.Module], n: int) -> dict[str, str]:
    """Each model's greedy answer to the demo prompt, up to its EOS (no ``min_new_tokens``), as text."""
    prompt_len = demo.inputs["input_ids"].shape[1]
    answers = {}
    with torch.no_grad():
        for name, model in models.items():
            out = model.generate(**demo.inputs, max_new_tokens=n, do_sample=False, use_cache=True)
            answers[name] = demo.tokenizer.decode(out[0, prompt_len:], skip_special_tokens=True)
    return answers


def section_demo(args: argparse.Namespace, demo: Demo, summary: dict[str, Any]) -> None:
    """The demo mixture on ``--demo-threads`` threads: the base model and xlora-hub in each decoding mode."""
    n = args.demo_new_tokens
    pad = demo.tokenizer.pad_token_id
    modes = [
        Mode("base"),
        Mode("ours"),
        Mode("base", "static"),
        Mode("ours", "static"),
        Mode("ours", lookahead=True),
        Mode("ours", "static", lookahead=True),
    ]
    pair = {"base": demo.base, "ours": demo.ours}
    threads = torch.get_num_threads()
    torch.set_num_threads(args.demo_threads)
    try:
        results = run_modes(args, pair, demo.inputs, n, modes, pad_token_id=pad)
        references = reference_tokens(pair, demo.inputs, n, pad)
    finally:
        torch.set_num_threads(threads)
    summary["demo"] = results
    summary["demo_answers"] = demo_answers(demo, pair, n)
    print_table(
        f"Demo mixture ({demo.inputs['input_ids'].shape[1]}-token prompt, {n} new tokens, {args.demo_threads} thread"
        f"{'s' if args.demo_threads != 1 else ''}, greedy)",
        MODE_HEADERS,
        mode_rows(args, results, references, n, 1),
        _mode_notes(args) + [f"greedy answers (to EOS): {summary['demo_answers']}"],
    )


# ---------------------------------------------------------------------------------------------- mistral.rs
MISTRALRS_VERSION = "0.6.0"
MISTRALRS_WORKER = Path(__file__).resolve().parent / "mistralrs_timing.py"


def mistralrs_version(python: str) -> str | NA:
    """The mistralrs version ``python`` imports, or why it cannot run the benchmark's X-LoRA."""
    code = "import importlib.metadata as m, mistralrs; print(m.version('mistralrs'))"
    try:
        proc = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return NA(f"cannot run {python}: {exc}")
    if proc.returncode != 0:
        return NA(
            f"mistralrs is not importable by {python}; install mistralrs=={MISTRALRS_VERSION} into a venv and pass "
            "--mistralrs-python VENV/bin/python"
        )
    version = proc.stdout.strip().splitlines()[-1]
    if not version.startswith("0.6."):
        return NA(
            f"mistralrs {version}: its X-LoRA fails on prompts longer than one token since 0.8.2 (issue 14); "
            f"pass --mistralrs-python of a venv with mistralrs=={MISTRALRS_VERSION}"
        )
    return version


def run_mistralrs(python: str, spec: dict[str, Any], threads: int) -> dict[str, Any] | NA:
    """Run the timing worker in ``python``; its record, or why it failed (the last line of its error)."""
    from xlora_hub.jsonfile import parse_json_object

    env = {**os.environ, "RAYON_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads), "RUST_BACKTRACE": "0"}
    try:
        proc = subprocess.run(
            [python, str(MISTRALRS_WORKER), json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=600,
            env=env,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return NA("mistral.rs did not finish within 600 s")
    for line in proc.stdout.splitlines():
        if line.startswith("MISTRALRS "):
            return parse_json_object(line[len("MISTRALRS ") :], what="mistral.rs worker output")
    errors = [line.strip() for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
    interesting = [e for e in errors if "panicked at" in e or "Error" in e or "error" in e]
    return NA(("did not load: " if "LOADED" not in proc.stdout else "failed: ") + (interesting or errors or ["?"])[-1])


def mistralrs_export(demo: Demo, work: Path) -> tuple[Path, list[str]]:
    """The demo mixture exported for mistral.rs, as ``xlora-hub convert MIX OUT --to mistralrs`` writes it."""
    import inspect

    from xlora_hub.convert import export_mistralrs

    base = (demo.folder / "base_model").resolve()
    options: dict[str, Any] = dict(base_model_id=str(base), overwrite=True)
    notes = []
    if "lossy" in inspect.signature(export_mistralrs).parameters:
        options["lossy"] = True  # the demo's experts also adapt embed_tokens, which mistral.rs drops anyway
        notes.append(
            "exported with lossy=True: LoRA that mistral.rs cannot run (e.g. on embed_tokens) left out, if any"
        )
    return export_mistralrs(demo.ours, work / "export", **options), notes


def temporary_mistralrs_fixes(export: Path, base: Path, work: Path) -> tuple[Path, Path, list[str]]:
    """TEMPORARY, until branch s3-mistralrs (issue 14) makes the export load as written: issue 14's hand fixes.

    Applied to copies in ``work`` (never to the export or the demo's files), and only when the export as
    written did not load. Returns the fixed mixture folder, the fixed base folder and what was changed.
    """
    import shutil

    from xlora_hub.jsonfile import read_json_object

    fixes = []
    new_base = work / "fixed_base_model"
    shutil.copytree(base, new_base, dirs_exist_ok=True)
    config = read_json_object(new_base / "config.json")
    if "rope_theta" not in config:
        config["rope_theta"] = (config.get("rope_parameters") or {}).get("rope_theta", 10000.0)
        (new_base / "config.json").write_text(json.dumps(config, indent=2))
        fixes.append("top-level rope_theta in the base config.json")
    tokenizer = read_json_object(new_base / "tokenizer.json", max_bytes=64 * 2**20)
    if (tokenizer.get("decoder") or {}).get("type") == "Fuse":
        tokenizer["decoder"] = {"type": "Sequence", "decoders": [{"type": "ByteFallback"}, {"type": "Fuse"}]}
        (new_base / "tokenizer.json").write_text(json.dumps(tokenizer))
        fixes.append("tokenizer decoder Fuse -> Sequence[ByteFallback, Fuse]")
    fixed = work / "fixed_export"
    fixed.mkdir(exist_ok=True)
    ordering = read_json_object(export / "ordering.json")
    names = list(ordering["order"])
    for name in names:
        if (export / name).is_dir():
            for file in (export / name).iterdir():
                shutil.copy2(file, fixed / f"{name}_{file.name}")
    if any((export / name).is_dir() for name in names):
        fixes.append("flat expert files <name>_adapter_config.json / <name>_adapter_model.safetensors")
    flat = {f"{n}_{f}" for n in names for f in ("adapter_config.json", "adapter_model.safetensors")}
    for file in export.iterdir():  # mistral.rs reads any file whose name holds an expert's name as that expert's
        if (
            file.is_file()
            and file.name != "ordering.json"
            and (file.name in flat or not any(n in file.name for n in names))
        ):
            shutil.copy2(file, fixed / file.name)
    layers = sorted(ordering["layers"], key=ordering["layers"].get)
    kept = [name for name in layers if not name.endswith(("embed_tokens", "lm_head"))]
    if kept != layers or [ordering["layers"][k] for k in kept] != list(range(len(kept))):
        fixes.append(f"ordering layers: {len(layers) - len(kept)} embedding/lm_head entries dropped, renumbered from 0")
    ordering["layers"] = {name: i for i, name in enumerate(kept)}
    ordering["base_model_id"] = str(new_base)
    (fixed / "ordering.json").write_text(json.dumps(ordering, indent=2))
    xconfig = read_json_object(fixed / "xlora_config.json")
    before = dict(xconfig)
    xconfig["base_model_id"] = str(new_base)
    xconfig["xlora_dropout_p"] = 0.0
    xconfig.setdefault("xlora_size", xconfig["hidden_size"])
    (fixed / "xlora_config.json").write_text(json.dumps(xconfig, indent=2))
    fixes.append("base_model_id: the fixed base's absolute path in both files")
    if before.get("xlora_dropout_p") != 0.0 or "xlora_size" not in before:
        fixes.append("xlora_dropout_p 0.0 and xlora_size written")
    return fixed, new_base, fixes


def timing_copies(export: Path, base: Path, work: Path, positions: int) -> tuple[Path, Path]:
    """Copies for timing only: a base whose EOS does not stop generation and whose RoPE table covers ``positions``.

    mistral.rs 0.6.0 ignores ``logit_bias``, so banning EOS (what ``min_new_tokens`` does in transformers) is not
    possible; without a stop token it generates exactly ``max_tokens`` tokens, as the transformers rows do. It
    also sizes its RoPE table by ``max_position_embeddings`` (the demo's is 64) and fails past it, where
    transformers computes positions as they come. Neither change touches a weight.
    """
    import shutil

    from xlora_hub.jsonfile import read_json_object

    new_base = work / "timing_base_model"
    shutil.copytree(base, new_base, dirs_exist_ok=True)
    for name, change in (
        (
            "config.json",
            lambda c: c.update(max_position_embeddings=max(c.get("max_position_embeddings", 0), positions)),
        ),
        ("generation_config.json", lambda c: c.update(eos_token_id=[])),
        ("tokenizer_config.json", lambda c: c.pop("eos_token", None)),
    ):
        if (new_base / name).is_file():
            config = read_json_object(new_base / name)
            change(config)
            (new_base / name).write_text(json.dumps(config, indent=2))
    new_export = work / "timing_export"
    shutil.copytree(export, new_export, dirs_exist_ok=True)
    for name in ("xlora_config.json", "ordering.json"):
        config = read_json_object(new_export / name)
        config["base_model_id"] = str(new_base)
        (new_export / name).write_text(json.dumps(config, indent=2))
    return new_export, new_base


def mistralrs_spec(kind: str, export: Path, base: Path, prompt: str, max_tokens: int, repeats: int) -> dict:
    """The timing worker's argument (see ``mistralrs_timing.py``): ``arch=Mistral``, as 0.6.0 runs X-LoRA right."""
    return dict(
        kind=kind,
        arch="Mistral",
        prompt=prompt,
        max_tokens=max_tokens,
        repeats=repeats,
        xlora_model_id=str(export),
        order=str(export / "ordering.json"),
        model_id=str(base),
    )


def measure_mistralrs(
    args: argparse.Namespace, demo: Demo, python: str, version: str
) -> tuple[dict[str, dict[str, Any] | NA], dict[str, str | NA], list[str]]:
    """mistral.rs' timings (X-LoRA and plain), its greedy answers (stopping at EOS), and notes on what was changed."""
    n = args.demo_new_tokens
    work = Path(tempfile.mkdtemp(prefix="mistralrs-", dir=args.workdir))
    export, notes = mistralrs_export(demo, work)
    base = (demo.folder / "base_model").resolve()
    answers: dict[str, str | NA] = {}

    def answer(kind: str) -> dict[str, Any] | NA:
        r = run_mistralrs(python, mistralrs_spec(kind, export, base, demo.prompt, n, 0), args.demo_threads)
        answers[kind] = r if isinstance(r, NA) else r["text"]
        return r

    if isinstance(answer("xlora"), NA) and answers["xlora"].reason.startswith("did not load"):
        notes.append(f"the export as written does not load in mistral.rs {version}: {answers['xlora'].reason}")
        export, base, fixes = temporary_mistralrs_fixes(export, base, work)
        notes.append("TEMPORARY hand fixes on a copy (issue 14; remove once the export loads): " + "; ".join(fixes))
        answer("xlora")
    answer("plain")
    positions = demo.inputs["input_ids"].shape[1] + n + 8
    timing_export, timing_base = timing_copies(export, base, work, positions)
    notes.append(
        "timed on copies whose EOS does not stop generation (mistral.rs 0.6.0 ignores logit_bias) and whose "
        f"max_position_embeddings is {positions} (its RoPE table; transformers has none): no weight changes"
    )
    timings: dict[str, dict[str, Any] | NA] = {}
    for kind in ("xlora", "plain"):
        if isinstance(answers[kind], NA):
            timings[kind] = answers[kind]
            continue
        spec = mistralrs_spec(kind, timing_export, timing_base, demo.prompt, n, args.repeats)
        timings[kind] = run_mistralrs(python, spec, args.demo_threads)
    return timings, answers, notes


def section_mistralrs(args: argparse.Namespace, demo: Demo, summary: dict[str, Any]) -> None:
    """mistral.rs 0.6.0's X-LoRA (``arch=Mistral``) and its plain base model, beside xlora-hub, on the demo."""
    python = args.mistralrs_python or sys.executable
    n = args.demo_new_tokens
    version = mistralrs_version(python)
    if isinstance(version, NA):
        timings: dict[str, dict[str, Any] | NA] = {"xlora": version, "plain": version}
        answers: dict[str, str | NA] = dict(timings)
        notes: list[str] = []
    else:
        timings, answers, notes = measure_mistralrs(args, demo, python, version)
    expected = summary.get("demo_answers", {})
    mrs_tps = None
    rows: list[list[Any]] = []
    for key, label in (
        ("xlora", f"mistral.rs {version if not isinstance(version, NA) else ''} X-LoRA (arch=Mistral)"),
        ("plain", "mistral.rs base model (arch=Mistral)"),
    ):
        r = timings[key]
        ref = expected.get("ours" if key == "xlora" else "base")
        same = "-" if isinstance(answers[key], NA) or ref is None else ("yes" if answers[key] == ref else "NO")
        shown = "-" if isinstance(answers[key], NA) else repr(answers[key])
        if isinstance(r, NA):
            rows.append([label.replace("  ", " "), r, "-", "-", shown, same])
            continue
        if r["completion_tokens"] != n:
            notes.append(
                f"{label.replace('  ', ' ')} made {r['completion_tokens']} tokens for max_tokens={n} (mistral.rs 0.6.0 "
                "makes one more than asked); its tokens/s counts the tokens it made"
            )
        tps = r["completion_tokens"] / r["seconds"]
        mrs_tps = tps if key == "xlora" else mrs_tps
        rows.append([label, tps, r["seconds"] / r["completion_tokens"] * 1e3, "-", shown, same])
    demo_results = summary.get("demo") or {}
    for label, mode, key in (
        ("transformers base model", Mode("base"), "base"),
        ("xlora-hub (dynamic cache)", Mode("ours"), "ours"),
    ):
        r = demo_results.get(mode)
        if r is None or isinstance(r.seconds, NA):
            rows.append([label, r.seconds if r else NA("the demo section did not run"), "-", "-", "-", "-"])
            continue
        vs = n / r.seconds / mrs_tps if mrs_tps else "-"
        rows.append([label, n / r.seconds, r.seconds / n * 1e3, vs, repr(expected.get(key, "")), "-"])
    summary["mistralrs"] = timings
    print_table(
        f"mistral.rs on the demo mixture ({n} new tokens, {args.demo_threads} thread"
        f"{'s' if args.demo_threads != 1 else ''}, greedy)",
        ["engine", "tokens/s", "ms/token", "x mistral.rs X-LoRA tokens/s", "greedy answer (to EOS)", "same answer"],
        rows,
        notes
        + [
            "mistral.rs: median of --repeats completion requests after a warm-up, in its own process "
            "(RAYON_NUM_THREADS), prefix cache off; timed after the demo section's rows, not interleaved with them. "
            "Answers: greedy until EOS (mistral.rs with the EOS intact; xlora-hub and transformers without "
            "min_new_tokens). mistral.rs drops LoRA on embeddings, so its answers differ where the demo's experts "
            "adapt embed_tokens."
        ],
    )


# ---------------------------------------------------------------------------------------------- targets
def _ratio(results: dict[Mode, Decoded] | None, mode: Mode) -> tuple[float | None, Decoded | None, str]:
    """``mode``'s tokens/s over the base model's with the same setting, its result, and why there is none."""
    if not results or mode not in results:
        return None, None, "section not run"
    r = results[mode]
    if isinstance(r.seconds, NA):
        return None, r, r.seconds.reason
    base = next((b for m, b in results.items() if m.model == "base" and m.setting == mode.setting), None)
    if base is None or isinstance(base.seconds, NA):
        return None, r, "no base row"
    return base.seconds / r.seconds, r, ""


def _cell(value: float | None, why: str, fmt: str = "{:.2f}x") -> str:
    """A targets cell: the ratio, or ``n/a (why)``."""
    return fmt.format(value) if value is not None else f"n/a ({why})"


def _demo_vs_mistralrs(args: argparse.Namespace, summary: dict[str, Any]) -> tuple[float | None, str | None, str]:
    """xlora-hub's tokens/s on the demo over mistral.rs X-LoRA's: the plain path's and the best mode's."""
    mrs = (summary.get("mistralrs") or {}).get("xlora")
    if not isinstance(mrs, dict):
        return None, None, mrs.reason if isinstance(mrs, NA) else "mistralrs section not run"
    mrs_tps = mrs["completion_tokens"] / mrs["seconds"]
    n = args.demo_new_tokens
    timed_modes = {
        m: n / r.seconds / mrs_tps
        for m, r in (summary.get("demo") or {}).items()
        if m.model == "ours" and not isinstance(r.seconds, NA)
    }
    if not timed_modes:
        return None, None, "no xlora-hub row on the demo"
    best = max(timed_modes, key=timed_modes.get)
    plain = timed_modes.get(Mode("ours"))
    text = (f"{plain:.2f}x (dynamic)" if plain is not None else "n/a (dynamic)") + (
        f"; best {timed_modes[best]:.2f}x ({best.label}, {best.cache} cache)" if best != Mode("ours") else ""
    )
    return timed_modes[best], text, ""


def section_targets(args: argparse.Namespace, summary: dict[str, Any]) -> None:
    """Issue 13's targets: today's figures (main, from the issue), this run's, the target, the verdict."""
    rows: list[list[Any]] = []

    def add(measure: str, today: str, value: float | None, why: str, target: str, ok: bool | None, text=None):
        verdict = "-" if ok is None or (value is None and text is None) else _verdict(ok)
        rows.append([measure, today, text if text is not None else _cell(value, why), target, verdict])

    # plain dynamic: the explicit scaling_lookahead=False row when the branch has it, else the default path
    plain, _, why = _ratio(summary.get("lookahead"), Mode("ours", lookahead=False))
    if plain is None:
        plain, _, why = _ratio(summary.get("static"), Mode("ours"))
    if plain is None and "generate" in summary:
        plain, why = summary["generate"], ""
    add("plain dynamic decode / base dynamic", "0.43x", plain, why, ">= 0.45x", plain is not None and plain >= 0.45)
    value, _, why = _ratio(summary.get("static"), Mode("ours", "static"))
    add("static decode / base static", "refused", value, why, ">= 0.45x", value is not None and value >= 0.45)
    value, r, why = _ratio(summary.get("compiled"), Mode("ours", "static", True))
    if value is not None and r is not None and not r.compiled:
        why, value = "xlora-hub ran but was not compiled", None
    add("compiled decode / base compiled", "refused", value, why, ">= 0.45x", value is not None and value >= 0.45)
    for section, cache, mode in (
        ("lookahead", "dynamic", Mode("ours", lookahead=True)),
        ("lookahead", "static", Mode("ours", "static", lookahead=True)),
        ("compiled", "static + compiled", Mode("ours", "static", True, True)),
    ):
        value, r, why = _ratio(summary.get(section), mode)
        if value is not None and r is not None and mode.compiled and not r.compiled:
            why, value = "xlora-hub ran but was not compiled", None
        acceptance = r.acceptance if r is not None else None
        text = None
        ok = None
        if value is not None:
            text = f"{value:.2f}x at acceptance " + (f"{acceptance:.2f}" if acceptance is not None else "?")
            ok = value >= 0.7 if acceptance is not None and acceptance >= 0.8 else None
            if acceptance is None or acceptance < 0.8:
                text += " (below 0.8: a smaller --expert-scale)"
        add(f"look-ahead decode at acceptance >= 0.8 / base ({cache})", "n/a", value, why, ">= 0.7x", ok, text)
    quotients = summary.get("quotients", {})
    parts = [f"{quotients[k]:.2f}" if k in quotients else "n/a" for k in (8, 32)]
    known = [quotients[k] for k in (8, 32) if k in quotients]
    add(
        "prefill time ratio / FLOP ratio, 8 and 32 experts",
        "1.10 / 0.92",
        None,
        "",
        "<= 1.05",
        all(q <= 1.05 for q in known) if known else None,
        text=" / ".join(parts) if known else "n/a (sweep with 8 and 32 experts not run)",
    )
    value, text, why = _demo_vs_mistralrs(args, summary)
    add(
        "demo mixture, 1 thread, vs mistral.rs 0.6.0 X-LoRA",
        "0.40x",
        value,
        why,
        ">= 1.0x (stretch)",
        value is not None and value >= 1.0,
        text,
    )
    print_table(
        "Targets (issue 13): ratios measured in this run",
        ["measure", "today (main, from the issue)", "this run", "target", "verdict"],
        rows,
        [
            "decode ratios: tokens/s of greedy generate (prefill included) at the largest --new-tokens, over the base "
            "model's with the same cache and compile setting, timed interleaved; 'today' is main's figure from "
            "issue 13 (2-core CPU, one run each)."
        ],
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
    if args.expert_scale is not None:
        argv += ["--expert-scale", repr(args.expert_scale)]
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
        root.mkdir(parents=True, exist_ok=True)
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
        inputs = make_inputs(args)
        dirs: list[Path] = []
        if set(args.sections) - {"demo", "mistralrs"}:
            dirs = save_experts(args, max(counts), root)
            print(expert_ratio_summary(args, dirs[: args.experts]))
        needs_models = {"prefill", "generate", "static", "compiled", "lookahead", "profile"} & set(args.sections)
        models = build_models(args, dirs[: args.experts]) if needs_models else None
        if models is not None:
            check_equivalence(args, models, inputs)
        summary: dict[str, Any] = {"quotients": {}}
        if "prefill" in args.sections:
            r = section_prefill(args, models, inputs)
            summary["quotients"][args.experts] = (r["ours"] / r["base"]) / (r["ours_flops"] / r["base_flops"])
        if "generate" in args.sections:
            summary["generate"] = section_generate(args, models, inputs)["ratio"]
        for which in ("static", "compiled", "lookahead"):
            if which in args.sections:
                section_decoding(args, models, inputs, which, summary)
        if "sweep" in args.sections:
            summary["quotients"].update(section_sweep(args, inputs, dirs))
        if "memory" in args.sections:
            section_memory(args)
        if {"demo", "mistralrs"} & set(args.sections):
            demo = load_demo(args)
            section_demo(args, demo, summary)  # the mistralrs section's xlora-hub and base rows come from here
            if "mistralrs" in args.sections:
                section_mistralrs(args, demo, summary)
        if "profile" in args.sections:
            section_profile(args, models, inputs)
        if "quantized" in args.sections:
            section_quantized(args, dirs[: args.experts], inputs)
        if TARGET_SECTIONS & set(args.sections):
            section_targets(args, summary)
    print(f"\ntotal time: {time.perf_counter() - started:.0f} s | load avg 1/5/15 min at the end {_load()}")
    print(
        "(a load average above the thread count means other processes shared the cores: absolute times are then "
        "inflated; the models are timed interleaved, so their ratios are less affected)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
