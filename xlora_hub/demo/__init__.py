"""The embedded default mixture: a tiny but real X-LoRA mixture, built from a seed with nothing downloaded.

Four synthetic tasks whose inputs look different (:mod:`.tasks`)::

    add:12+7=      -> 19        (adding two numbers up to 19)
    rev:ABCD=      -> DCBA      (reversing an upper-case word)
    up:abcd=       -> ABCD      (upper-casing a word)
    cnt:abcab:a=   -> 2         (counting a letter in a word)

A tiny Llama-style causal LM with a character-level tokenizer is pre-trained on generic data: copying
strings, and the task *inputs* without their answers, so it reads every format but solves no task.
One peft LoRA expert is trained per task (on the attention and MLP projections only, so that every
export format, mistral.rs's included, keeps it whole), then an X-LoRA classifier on the union of the tasks (the
task labels supervise the routing during training only; inference sees the text alone) (:mod:`.build`,
sizes in :mod:`.recipe`). :func:`evaluate_demo_mixture` scores it (:mod:`.evaluate`).

The result is laid out like a published mixture: ``base_model/`` (model + tokenizer), one peft adapter
folder per expert under ``experts/``, and the mixture files written by ``save_pretrained``. It is
cached under ``$XLORA_HUB_CACHE`` (default ``$XDG_CACHE_HOME/xlora-hub`` or ``~/.cache/xlora-hub``),
keyed by :data:`DEMO_VERSION` and the seed (:mod:`.cache`).

Every step is seeded and runs with deterministic kernels on one CPU thread, so two builds with the
same seed on one machine give the same files byte for byte. Another machine may build other bits: MKL
and torch pick their math kernels for the CPU they find (an AMD CPU takes other MKL kernels than an
Intel one; AVX2 and AVX-512 sum in other orders). Pinning them before Python starts
(``MKL_CBWR=COMPATIBLE ATEN_CPU_CAPABILITY=avx2``: MKL documents its compatible branch as giving the
same results on Intel and AMD CPUs) makes the build's weights independent of the MKL kernels the CPU
would get, but costs about twice the CPU time, so the default build does not pin them. The recipe has
the margin instead: builds with other seeds (and, for the previous recipe, other kernels) score within a
point or two of the recorded one (``benchmarks/results/demo_seeds.md``), and :data:`REFERENCE_WEIGHTS_SHA256` tells whether
a build reproduced the recorded one.

This package sits above training, data and the model, and below the CLI and the Space.
"""

from __future__ import annotations

from .build import (
    build_demo_mixture,
    build_tokenizer,
    demo_xlora_config,
    load_demo_mixture,
    push_demo_mixture,
)
from .cache import (
    BUILD_INFO_NAME,
    BUILD_THREADS,
    CACHE_ENV,
    KERNEL_ENV,
    canonicalize_safetensors_header,
    default_cache_dir,
    demo_mixture_path,
    deterministic_torch,
    kernel_settings,
    read_build_info,
    weights_digest,
)
from .evaluate import DemoReport, TaskScores, evaluate_demo_mixture, exact_match
from .recipe import (
    BASE_MODEL_DIR,
    DEMO_VERSION,
    EXPERTS_DIR,
    LORA_TARGETS,
    RECIPE,
    REFERENCE_WEIGHTS_SHA256,
    SMALL_RECIPE,
    DemoRecipe,
)
from .tasks import TASKS, make_task_example, make_task_examples, pretraining_data

__all__ = [
    "BASE_MODEL_DIR",
    "BUILD_INFO_NAME",
    "BUILD_THREADS",
    "CACHE_ENV",
    "DEMO_VERSION",
    "EXPERTS_DIR",
    "KERNEL_ENV",
    "LORA_TARGETS",
    "RECIPE",
    "SMALL_RECIPE",
    "REFERENCE_WEIGHTS_SHA256",
    "TASKS",
    "DemoRecipe",
    "DemoReport",
    "TaskScores",
    "build_demo_mixture",
    "build_tokenizer",
    "canonicalize_safetensors_header",
    "default_cache_dir",
    "demo_mixture_path",
    "demo_xlora_config",
    "deterministic_torch",
    "evaluate_demo_mixture",
    "exact_match",
    "kernel_settings",
    "load_demo_mixture",
    "make_task_example",
    "make_task_examples",
    "pretraining_data",
    "push_demo_mixture",
    "read_build_info",
    "weights_digest",
]
