"""The KV cache of an X-LoRA model: one cache per pass, moved together.

:class:`XLoraCache` *is* the real pass's ``DynamicCache`` (so ``transformers`` generation, beam
reordering and cropping work on it unchanged) and carries the scaling pass's own cache beside it.
:class:`XLoraStaticCache` is the same pair over ``transformers.StaticCache`` (preallocated, written in
place: what ``torch.compile`` and CUDA graphs need). Every operation that reshapes a cache (beam reorder,
crop, batch repeat/select, reset) is applied to both, so the two passes always see the same past tokens.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from transformers.cache_utils import DynamicCache, StaticCache


class _PairedCache:
    """The reshaping operations of a cache, applied to the real pass's cache (``self``) and ``scaling_cache``."""

    scaling_cache: Any

    def reset(self) -> None:
        super().reset()
        self.scaling_cache.reset()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self.scaling_cache.reorder_cache(beam_idx)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self.scaling_cache.crop(tokens_to_remove)

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self.scaling_cache.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self.scaling_cache.batch_select_indices(indices)


class XLoraCache(_PairedCache, DynamicCache):
    """``DynamicCache`` of the real pass plus ``scaling_cache``, the cache of the scaling pass."""

    def __init__(self, *args, config=None, **kwargs) -> None:
        super().__init__(*args, config=config, **kwargs)
        self.scaling_cache = DynamicCache(config=config)


class XLoraStaticCache(_PairedCache, StaticCache):
    """``StaticCache`` of the real pass plus ``scaling_cache``, a ``StaticCache`` of the scaling pass.

    Both are preallocated for ``max_cache_len`` tokens (on the first write, with the batch size, device and dtype
    of the keys) and updated in place, so a compiled decode step reads fixed addresses. Like any ``StaticCache`` it
    can be cropped only by a negative count (``crop(-n)`` forgets the last ``n`` tokens).
    """

    def __init__(self, config, max_cache_len: int, **kwargs) -> None:
        super().__init__(config=config, max_cache_len=max_cache_len, **kwargs)
        self.scaling_cache = StaticCache(config=config, max_cache_len=max_cache_len, **kwargs)

    def early_initialization(self, batch_size: int, num_heads, head_dim, dtype: torch.dtype, device) -> None:
        super().early_initialization(batch_size, num_heads, head_dim, dtype, device)
        self.scaling_cache.early_initialization(batch_size, num_heads, head_dim, dtype, device)


XLORA_CACHE_TYPES = (XLoraCache, XLoraStaticCache)
"""The caches that carry the scaling pass's cache beside the real pass's."""


CACHE_ARGUMENTS = ("cache", "past_key_values")
"""The two names of a model's KV-cache argument: ``cache`` since transformers 5.24, ``past_key_values`` before."""


def cache_argument(model: torch.nn.Module) -> str:
    """The name under which ``model.forward`` (and its ``generate``) takes the KV cache."""
    try:
        parameters = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in parameters else "past_key_values"


def pop_cache(kwargs: dict[str, Any]) -> Any:
    """Take the cache out of ``kwargs`` under either name (callers may use the old or the new one)."""
    given = {name: kwargs.pop(name) for name in CACHE_ARGUMENTS if name in kwargs}
    values = [value for value in given.values() if value is not None]
    if len(values) > 1:
        raise ValueError("Pass the KV cache as `cache` or as `past_key_values`, not both.")
    return values[0] if values else None


def take_xlora_cache(kwargs: dict[str, Any], argument: str) -> XLoraCache | XLoraStaticCache | None:
    """Pop the caller's cache (either name) as the :class:`XLoraCache` both passes need, or ``None``.

    An empty cache of another type (``DynamicCache()``) is dropped so that one of ours takes its place;
    a filled one cannot be used (it lacks the scaling pass's past) and is an error.
    """
    past = pop_cache(kwargs)
    if past is None or isinstance(past, XLORA_CACHE_TYPES):
        return past
    if hasattr(past, "get_seq_length") and past.get_seq_length() == 0:
        return None
    raise TypeError(
        f"X-LoRA needs an XLoraCache as `{argument}` (the scaling pass keeps its own cache), got "
        f"{type(past).__name__}. Pass `xlora_hub.XLoraCache(config=model.config)` (or "
        "`xlora_hub.XLoraStaticCache(config=model.config, max_cache_len=...)`), the cache returned by the previous "
        "call, or none."
    )
