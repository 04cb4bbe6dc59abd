"""The original ``xlora`` package's top-k softmax, kept to measure what an import changes.

With ``enable_softmax_topk`` the original package (EricLBuehler/xlora 0.1.0, ``xlora_insertion.py``) takes, in each
layer, ``torch.softmax(xlora_scalings[nonzero_mask], dim=-1)``: one softmax over the kept scalings of *every token
of every sequence* of the batch at once, so a token's weights depend on the rest of the batch and sum to 1 over
the batch, not per token. xlora-hub and peft apply it per token. An imported mixture keeps the per-token
function; :func:`softmax_topk_change` says by how much the outputs change on a sample batch.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from ..scalings import process_scalings

if TYPE_CHECKING:
    from ..config import XLoraConfig
    from ..model import XLoraModel

logger = logging.getLogger(__name__)

SAMPLE_SHAPE = (2, 8)
"""The sample batch the change is measured on: 2 sequences of 8 token ids drawn with :data:`SAMPLE_SEED`."""
SAMPLE_SEED = 0


def original_softmax_topk(config: XLoraConfig, scalings: torch.Tensor) -> torch.Tensor:
    """The scalings ``[batch, seq, n_layers, n_experts]`` as the original package's layers read them: top-k, then
    one softmax per layer over the kept (non-zero) values of the whole batch, then the global weight."""
    kept = process_scalings(config.replace(enable_softmax_topk=False, global_scaling_weight=1.0), scalings).clone()
    for layer in range(kept.shape[2]):
        part = kept[:, :, layer, :]
        nonzero = part != 0
        part[nonzero] = torch.softmax(part[nonzero], dim=-1)
    return kept * config.global_scaling_weight if config.global_scaling_weight != 1 else kept


def original_logits(model: XLoraModel, input_ids: torch.Tensor) -> torch.Tensor:
    """The logits the original package computes for ``input_ids`` with this mixture: both passes with
    :func:`original_softmax_topk` in place of the per-token top-k softmax (no KV cache, no attention mask)."""
    config = model.xlora_config
    shape = (*input_ids.shape, model.n_layers if config.layerwise_scalings else 1, model.n_experts)
    backbone = getattr(model.model, "base_model", model.model)
    value = config.resolved_scaling_pass_value()
    weight = model.classifier.last_layer.weight
    previous = model.routing.scalings
    try:
        with torch.no_grad():
            dummy = torch.full(shape, value, dtype=weight.dtype, device=weight.device)
            model.routing.scalings = original_softmax_topk(config, dummy) if value != 0 else None
            hidden = backbone(input_ids=input_ids, use_cache=False, return_dict=True).last_hidden_state
            model.routing.scalings = original_softmax_topk(config, model.classifier(hidden.to(weight.device)))
            return model.model(input_ids=input_ids, use_cache=False).logits
    finally:
        model.routing.scalings = previous


def sample_input_ids(model: XLoraModel) -> torch.Tensor:
    """The seeded sample batch (:data:`SAMPLE_SHAPE`), token ids below the base model's vocabulary size."""
    vocab = model.model.config.get_text_config().vocab_size
    generator = torch.Generator().manual_seed(SAMPLE_SEED)
    return torch.randint(0, vocab, SAMPLE_SHAPE, generator=generator).to(model.device)


def softmax_topk_change(model: XLoraModel, input_ids: torch.Tensor | None = None) -> float:
    """The largest absolute logit difference between this mixture (per-token top-k softmax) and the original
    package's batch-wide one, on ``input_ids`` (default: :func:`sample_input_ids`)."""
    ids = sample_input_ids(model) if input_ids is None else input_ids
    with torch.no_grad():
        ours = model(input_ids=ids, use_cache=False).logits
    return float((ours.float() - original_logits(model, ids).float()).abs().max())


def warn_softmax_topk_change(model: XLoraModel, *, what: str) -> float | None:
    """Warn that an imported ``enable_softmax_topk`` mixture computes the per-token softmax, with the change
    measured on the sample batch; returns that change (``None`` when the model cannot run the sample)."""
    if not model.xlora_config.enable_softmax_topk:
        return None
    try:
        change: float | None = softmax_topk_change(model)
    except (RuntimeError, ValueError, TypeError, AttributeError) as err:  # a model the sample cannot drive
        logger.debug("softmax_topk_change failed: %r", err)
        change = None
    measured = (
        f"on a sample batch of {SAMPLE_SHAPE[0]}x{SAMPLE_SHAPE[1]} token ids the logits change by up to {change:.3g}"
        if change is not None
        else "the change could not be measured on a sample batch for this model"
    )
    logger.warning(
        "%s: enable_softmax_topk: the original xlora package applies this softmax over the kept scalings of the "
        "whole batch at once, a different function from the per-token softmax of xlora-hub and peft, which the "
        "imported mixture uses; %s.",
        what,
        measured,
    )
    return change
