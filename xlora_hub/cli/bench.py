"""``xlora-hub bench``: run the generation benchmark of a source checkout with this Python.

Every argument after ``bench`` goes to the benchmark untouched (:func:`split_bench_args`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path
from typing import Any

from .options import PROG, AddCommand, HelpFormatter, examples

BENCH_SCRIPT = Path("benchmarks") / "bench_generation.py"


def bench_script() -> Path | None:
    """``benchmarks/bench_generation.py`` of a source checkout (next to the package), if present."""
    script = Path(__file__).resolve().parents[2] / BENCH_SCRIPT
    return script if script.is_file() else None


def cmd_bench(args: argparse.Namespace) -> int:
    """Run the benchmark script with ``args.bench_args``; its exit status is the command's."""
    script = bench_script()
    if script is None:
        raise FileNotFoundError(
            f"The benchmark ({BENCH_SCRIPT}) is not installed with the package; run `{PROG} bench` from a source "
            "checkout of xlora-hub (git clone, then pip install -e .)."
        )
    return subprocess.call([sys.executable, str(script), *args.bench_args])


def add_command(add: AddCommand, sub: Any, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "bench",
        help="run the generation benchmark (source checkout only)",
        description=f"Run {BENCH_SCRIPT.as_posix()} with this Python: xlora-hub against peft's X-LoRA and the "
        "base model. Every argument after `bench` is passed to the benchmark; `--` first to pass --help.",
        epilog=examples(
            f"{PROG} bench --quick", f"{PROG} bench --device cuda --dtype bfloat16", f"{PROG} bench -- --help"
        ),
        formatter_class=HelpFormatter,
    )
    p.set_defaults(func=cmd_bench, bench_args=[])


def split_bench_args(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """``(own args, benchmark args)``: everything after ``bench`` goes to the benchmark untouched."""
    for index, arg in enumerate(argv):
        if not arg.startswith("-"):
            if arg != "bench":
                return argv, None
            rest = argv[index + 1 :]
            if rest[:1] == ["--"]:
                return argv[: index + 1], rest[1:]
            if any(a in ("-h", "--help") for a in rest):
                return argv[: index + 1] + ["--help"], None
            return argv[: index + 1], rest
    return argv, None
