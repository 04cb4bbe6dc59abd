"""Finite-value checks on loaded tensors: a NaN or an infinity in any weight makes every logit NaN.

Used on every tensor xlora-hub loads (the classifier file, the experts' factors once peft has loaded them,
imported classifiers), each error naming the file or expert and the tensor. ``torch.isfinite(t).all()``
per tensor is cheap next to reading it.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .errors import InvalidMixtureError


def first_non_finite(tensors: Iterable[tuple[str, torch.Tensor]]) -> str | None:
    """The name of the first floating-point tensor holding a NaN or an infinity, or ``None``."""
    for name, tensor in tensors:
        if tensor.is_meta:  # an offloaded weight holds no values here, so it cannot be checked
            continue
        if tensor.is_floating_point() and tensor.numel() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


def check_finite_tensors(
    tensors: Iterable[tuple[str, torch.Tensor]], *, what: str, error: type[Exception] = InvalidMixtureError
) -> None:
    """Raise ``error`` naming ``what`` and the tensor when any tensor holds a NaN or an infinity."""
    bad = first_non_finite(tensors)
    if bad is not None:
        raise error(
            f"{what}: tensor {bad!r} holds NaN or infinite values, which would make every output NaN. The file is "
            "corrupt or was saved from a diverged training run; use a good copy (download it again with "
            "`force_download=True`) or retrain it."
        )


__all__ = ["check_finite_tensors", "first_non_finite"]
