"""Generation with each token's dominant expert: what ``xlora-hub generate`` prints and ``--json`` returns.

TODO(lead): moves to :mod:`xlora_hub.routing` (R4) with the routing views it reads.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Generation", "RoutedToken", "generate_text"]


@dataclass
class RoutedToken:
    """One token of a generation and the expert that weighed most on it (``None``: never fed back)."""

    text: str
    expert: str | None
    weights: list[float] | None = None
    generated: bool = False


@dataclass
class Generation:
    """The generated text (prompt excluded) and, with ``show_routing``, every token of the sequence."""

    text: str
    tokens: list[RoutedToken] = field(default_factory=list)


def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    max_new_tokens: int,
    show_routing: bool = False,
    layer: int | None = None,
    generate_kwargs: dict[str, Any] | None = None,
) -> Generation:
    """Generate from ``prompt`` with ``model.generate``; with ``show_routing``, each token's dominant expert."""
    import torch

    from ..space import dominant_experts, layer_view, routing_from_log

    encoded = tokenizer(prompt, return_tensors="pt").to(model.device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    kwargs = dict(max_new_tokens=max_new_tokens, pad_token_id=pad, **(generate_kwargs or {}))
    if show_routing:
        model.clear_scalings_log()
        model.enable_scalings_logging()
    try:
        with torch.no_grad():
            output = model.generate(**encoded, **kwargs)
    finally:
        if show_routing:
            model.disable_scalings_logging()
    prompt_len = encoded["input_ids"].shape[1]
    ids = output[0].tolist()
    result = Generation(text=tokenizer.decode(ids[prompt_len:], skip_special_tokens=True))
    if show_routing:
        routing = routing_from_log(model.get_scalings_log())  # [tokens - 1, n_layers, n_experts]
        model.clear_scalings_log()
        weights = layer_view(routing, layer)
        dominant = dominant_experts(weights)
        names = model.expert_names
        for position, token_id in enumerate(ids):
            routed = position < len(dominant)
            result.tokens.append(
                RoutedToken(
                    text=tokenizer.decode([token_id]),
                    expert=names[dominant[position]] if routed else None,
                    weights=[round(float(w), 6) for w in weights[position]] if routed else None,
                    generated=position >= prompt_len,
                )
            )
    return result
