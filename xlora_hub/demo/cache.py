"""Where demo builds are cached, what each build records, and how two builds are compared.

A build is keyed by :data:`~xlora_hub.demo.DEMO_VERSION`, the seed and (when not the default) a hash
of the recipe. ``demo_build.json`` records the recipe, the time per phase, the math kernels and the
weights digest; :func:`weights_digest` is what :data:`~xlora_hub.demo.REFERENCE_WEIGHTS_SHA256` is
compared with, and :func:`canonicalize_safetensors_header` makes equal builds equal byte for byte.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..jsonfile import parse_json_object, read_json_object
from .recipe import DEMO_VERSION, RECIPE, DemoRecipe
from .tasks import TASKS

CACHE_ENV = "XLORA_HUB_CACHE"
BUILD_INFO_NAME = "demo_build.json"
BUILD_THREADS = 1
"""CPU threads of the build: fixed, so the floating-point reductions (and the weights) never depend on the core count."""

KERNEL_ENV = ("MKL_CBWR", "MKL_ENABLE_INSTRUCTIONS", "ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA")
"""Environment variables that choose the math kernels (recorded in ``demo_build.json`` with the CPU capability)."""


def default_cache_dir() -> Path:
    """``$XLORA_HUB_CACHE``, else ``$XDG_CACHE_HOME/xlora-hub``, else ``~/.cache/xlora-hub``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "xlora-hub"


def demo_mixture_path(
    *, seed: int = 0, cache_dir: str | os.PathLike[str] | None = None, recipe: DemoRecipe | None = None
) -> Path:
    """Where the demo mixture of ``seed`` (and ``recipe``, when not the default) is, or will be, cached."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = f"demo-mixture-{DEMO_VERSION}-seed{seed}"
    if recipe is not None and recipe != RECIPE:
        name += "-" + hashlib.sha256(repr(recipe).encode()).hexdigest()[:12]
    return root / name


def read_build_info(folder: str | os.PathLike[str]) -> dict[str, Any]:
    """What ``demo_build.json`` records: version, seed, build time per phase, weights digest."""
    return read_json_object(Path(folder) / BUILD_INFO_NAME)


def is_built(folder: Path) -> bool:
    """A finished build is one with its build record (written last)."""
    return (folder / BUILD_INFO_NAME).is_file()


def write_build_info(folder: Path, *, seed: int, recipe: DemoRecipe, phases: dict[str, float]) -> None:
    """Record the build in ``folder`` (its files already canonical): recipe, timings, kernels, weights digest."""
    info = {
        "version": DEMO_VERSION,
        "seed": seed,
        "tasks": list(TASKS),
        "recipe": dataclasses.asdict(recipe),
        "build_seconds": round(sum(phases.values()), 1),
        "phase_seconds": {name: round(seconds, 1) for name, seconds in phases.items()},
        "threads": BUILD_THREADS,
        "kernels": kernel_settings(),
        "weights_sha256": weights_digest(folder),
    }
    (folder / BUILD_INFO_NAME).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


@contextlib.contextmanager
def deterministic_torch(threads: int = BUILD_THREADS) -> Iterator[None]:
    """Deterministic kernels on a fixed number of threads (bitwise-reproducible CPU training); restored after."""
    previous_threads = torch.get_num_threads()
    previous_deterministic = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(previous_deterministic)
        torch.set_num_threads(previous_threads)


def kernel_settings() -> dict[str, Any]:
    """What chose this process's math kernels: torch's CPU capability and the kernel variables that are set.

    Recorded with each build, so a build whose digest differs from the recorded one says why it may.
    """
    settings: dict[str, Any] = {"cpu_capability": torch.backends.cpu.get_cpu_capability()}
    settings.update({name: os.environ[name] for name in KERNEL_ENV if os.environ.get(name)})
    return settings


def canonicalize_safetensors_header(path: Path) -> None:
    """Rewrite ``path``'s header with its ``__metadata__`` keys sorted, so equal files are equal byte for byte.

    safetensors writes the metadata in its hash map's order, which changes from process to process. The
    header keeps its length (the same JSON, compact, padded with spaces as safetensors pads it), so the
    tensor bytes after it are not moved.
    """
    with path.open("r+b") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = parse_json_object(handle.read(length).decode("utf-8"), what=f"{path.name} header")
        metadata = header.pop("__metadata__", None)
        tensors = sorted(header.items(), key=lambda item: item[1]["data_offsets"])
        canonical = {"__metadata__": dict(sorted(metadata.items()))} if metadata is not None else {}
        canonical.update(tensors)
        text = json.dumps(canonical, separators=(",", ":")).encode()
        if len(text) > length:  # never happens for a header safetensors wrote; leave such a file alone
            return
        handle.seek(8)
        handle.write(text + b" " * (length - len(text)))


def canonicalize_adapter_config(path: Path) -> None:
    """Sort ``target_modules`` in a peft ``adapter_config.json``: peft writes it from a set, in hash-seed order.

    The order means nothing to peft (it matches module names against the set), so a sorted list is the same
    config, and two builds in different processes write the same bytes.
    """
    config = read_json_object(path)
    modules = config.get("target_modules")
    if isinstance(modules, list):
        config["target_modules"] = sorted(modules)
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def weights_digest(folder: str | os.PathLike[str]) -> str:
    """SHA-256 over every tensor of every ``.safetensors`` file under ``folder`` (path, name, dtype, shape, bytes).

    Only the tensors count, not the file bytes: the header's metadata (and its order) does not change the digest.
    """
    from safetensors import safe_open

    digest = hashlib.sha256()
    folder = Path(folder)
    for path in sorted(folder.rglob("*.safetensors")):
        digest.update(path.relative_to(folder).as_posix().encode())
        with safe_open(str(path), framework="pt") as handle:
            for key in sorted(handle.keys()):
                tensor = handle.get_tensor(key).contiguous()
                digest.update(f"{key}:{tensor.dtype}:{list(tensor.shape)}".encode())
                digest.update(tensor.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


__all__ = [
    "BUILD_INFO_NAME",
    "BUILD_THREADS",
    "CACHE_ENV",
    "KERNEL_ENV",
    "canonicalize_safetensors_header",
    "default_cache_dir",
    "demo_mixture_path",
    "deterministic_torch",
    "is_built",
    "kernel_settings",
    "read_build_info",
    "weights_digest",
    "write_build_info",
]
