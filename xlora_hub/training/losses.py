"""The routing loss: teaching the classifier which expert an example belongs to, directly.

Both training paths (the plain loop of :func:`~xlora_hub.training.train_classifier` and
:class:`~xlora_hub.training.XLoraTrainer`) add it on top of the model's own LM loss through
:func:`add_routing_loss`, so they weigh and mask it the same way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch

from ..data import IGNORE_INDEX, answer_mask

if TYPE_CHECKING:
    from ..model import XLoraModel

ROUTING_TOKENS = ("answer", "all")
"""What ``routing_loss_tokens`` may be: the answer tokens, or every (non-padding) token."""


def routing_loss(scalings: torch.Tensor, routing_labels: torch.Tensor, token_mask: torch.Tensor, *, softmax: bool):
    """Cross-entropy of the expert each example belongs to, averaged over the layers and the masked tokens.

    ``scalings`` is ``[batch, seq, n_layers, n_experts]`` (probabilities when the classifier ends in a
    softmax, logits otherwise), ``token_mask`` is ``[batch, seq]`` (see :func:`routing_token_mask`);
    examples whose label is -100 are left out. ``None`` when no example of the batch has both a label
    and a masked token.
    """
    mask = token_mask & (routing_labels != IGNORE_INDEX)[:, None]
    if not bool(mask.any()):
        return None
    log_probs = torch.log(scalings.float().clamp_min(1e-9)) if softmax else torch.log_softmax(scalings.float(), -1)
    labels = routing_labels.clamp_min(0)[:, None, None, None].expand(-1, scalings.shape[1], scalings.shape[2], 1)
    nll = -log_probs.gather(-1, labels).squeeze(-1).mean(-1)  # [batch, seq], averaged over layers
    return nll[mask].mean()


def check_routing_tokens(tokens: str) -> None:
    """Refuse a ``routing_loss_tokens`` value before any training starts (the message names the choices)."""
    if tokens not in ROUTING_TOKENS:
        raise ValueError(f"routing_loss_tokens must be one of {ROUTING_TOKENS}, got {tokens!r}.")


def routing_token_mask(batch: Mapping[str, torch.Tensor], tokens: str) -> torch.Tensor:
    """The tokens the routing loss is taken on: the answer tokens, or every (non-padding) token.

    ``"all"`` teaches the routing on the prompt too, where the experts also act (their keys and values
    of the prompt tokens are what the answer tokens attend to).
    """
    if tokens == "answer":
        return answer_mask(batch["labels"])
    if tokens == "all":
        mask = batch.get("attention_mask")
        return mask.bool() if mask is not None else torch.ones_like(batch["input_ids"], dtype=torch.bool)
    raise ValueError(f"routing_loss_tokens must be one of {ROUTING_TOKENS}, got {tokens!r}.")


def add_routing_loss(
    model: XLoraModel,
    inputs: Mapping[str, torch.Tensor],
    routing_labels: torch.Tensor | None,
    loss: torch.Tensor,
    *,
    weight: float,
    tokens: str,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``loss + weight * routing_loss`` on the latest forward's scalings (``loss`` unchanged without labels)."""
    if routing_labels is None or weight <= 0:
        return loss, None
    aux = routing_loss(
        model.get_latest_scalings(),
        routing_labels,
        routing_token_mask(inputs, tokens),
        softmax=bool(model.xlora_config.enable_softmax),
    )
    return (loss if aux is None else loss + weight * aux), aux


__all__ = ["ROUTING_TOKENS", "add_routing_loss", "check_routing_tokens", "routing_loss", "routing_token_mask"]
