"""What the classifier's scalings become before the X-LoRA layers read them: pure tensor math on the config.

Top-k, the top-k softmax and the global weight are applied here once per pass (peft applies them in every
layer). Kept as functions of the config and the tensors, with no model, so the model's passes and the decoding
steps (:mod:`xlora_hub.generation`) share them and a compiled decode step can call them as they are.
"""

from __future__ import annotations

import torch

from .config import XLoraConfig


def process_scalings(config: XLoraConfig, scalings: torch.Tensor) -> torch.Tensor:
    """The classifier's scalings ``[batch, seq, n_layers, n_experts]`` as the layers read them (see the module)."""
    if not config.layerwise_scalings:
        scalings = scalings[:, :, :1, :]
    if config.top_k_lora is not None:
        _, top = torch.topk(scalings, k=config.top_k_lora, dim=-1)
        mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, top, True)
        scalings = scalings * mask.to(scalings.dtype)
    if config.enable_softmax_topk:
        nonzero = scalings != 0
        scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
    if config.global_scaling_weight != 1:
        scalings = scalings * config.global_scaling_weight
    return scalings


def scaling_pass_scalings(
    config: XLoraConfig, *, n_layers: int, n_experts: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | None:
    """The scalings of the scaling pass (every expert at ``scaling_pass_value``), processed; ``None`` when that
    value is 0, so that the pass is exactly the base model with no expert math at all."""
    value = config.resolved_scaling_pass_value()
    if value == 0:
        return None
    dummy = torch.full((1, 1, n_layers if config.layerwise_scalings else 1, n_experts), value, dtype=dtype)
    return process_scalings(config, dummy.to(device))


def prompt_mean(scalings: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Per-sequence scalings ``[batch, 1, ...]``: the mean over the real (unmasked) tokens of a prompt."""
    if attention_mask is None or attention_mask.dim() != 2:
        return scalings.mean(dim=1, keepdim=True)
    weights = attention_mask[:, -scalings.shape[1] :].to(scalings.dtype)[:, :, None, None]
    return (scalings * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)


__all__ = ["process_scalings", "prompt_mean", "scaling_pass_scalings"]
