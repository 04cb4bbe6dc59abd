"""The KV cache of an X-LoRA model: one cache per pass, moved together.

:class:`XLoraCache` *is* the real pass's ``DynamicCache`` (so ``transformers`` generation, beam
reordering and cropping work on it unchanged) and carries the scaling pass's own cache beside it.
Every operation that reshapes a cache (beam reorder, crop, batch repeat/select, reset) is applied
to both, so the two passes always see the same past tokens.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import DynamicCache


class XLoraCache(DynamicCache):
    """``DynamicCache`` of the real pass plus ``scaling_cache``, the cache of the scaling pass."""

    def __init__(self, *args, config=None, **kwargs) -> None:
        super().__init__(*args, config=config, **kwargs)
        self.scaling_cache = DynamicCache(config=config)

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
