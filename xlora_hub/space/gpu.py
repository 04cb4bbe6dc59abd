"""ZeroGPU: the Space's generation under ``spaces.GPU`` when the ``spaces`` package is there.

On ZeroGPU hardware (``SPACES_ZERO_GPU`` set by the Hub) a GPU is attached only while a function decorated
with ``spaces.GPU`` runs; the model is moved to ``cuda`` at start-up and ``spaces`` makes that lazy. Elsewhere
``spaces.GPU`` returns the function itself (checked in the tests), and without the package the function runs
as it is, so the same app runs on CPU Spaces, ZeroGPU and locally.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["ZERO_GPU_ENV", "gpu_function", "on_zero_gpu", "space_device"]

ZERO_GPU_ENV = "SPACES_ZERO_GPU"
"""Set to ``true`` by the Hub on ZeroGPU hardware (the variable the ``spaces`` package reads)."""

F = TypeVar("F", bound=Callable[..., Any])


def on_zero_gpu() -> bool:
    """Whether this process runs on ZeroGPU hardware, read as ``spaces`` reads it (``1``, ``t``, ``true``)."""
    return os.environ.get(ZERO_GPU_ENV, "").lower() in ("1", "t", "true")


def gpu_function(fn: F) -> F:
    """``spaces.GPU(fn)``: on ZeroGPU it runs with a GPU attached; elsewhere ``spaces`` returns ``fn`` itself.

    Without the ``spaces`` package (a local run) ``fn`` is returned as it is. ZeroGPU pickles the function's
    arguments and results (or a generator's yields) between processes, so ``fn`` takes and returns plain data.
    """
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(fn)


def space_device() -> str | None:
    """Where the Space puts the model: ``cuda`` on ZeroGPU (``spaces`` defers the move), else where it loads."""
    return "cuda" if on_zero_gpu() else None
