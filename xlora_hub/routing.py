"""Routing views: which expert weighed on each token of a generation, as the CLI and the Space show it.

The model logs the classifier's scalings per forward (``model.enable_scalings_logging()``); the functions
here turn that log into one ``[tokens, n_layers, n_experts]`` tensor per sequence, pick a layer (or the mean
over layers) and the dominant expert of each token. ``generate_text`` runs one generation with the log on and
returns the text and, when asked, every token with its expert: the ``xlora-hub generate`` command prints it,
and the Space draws the same views. Nothing here knows about Gradio or argparse.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "Generation",
    "RoutedToken",
    "dominant_experts",
    "generate_text",
    "layer_view",
    "routed_tokens",
    "routing_from_log",
]


def routing_from_log(log: Sequence[torch.Tensor], n_tokens: int | None = None, *, row: int = 0) -> torch.Tensor:
    """Per-token scalings ``[tokens, n_layers, n_experts]`` of one sequence of a generation's scalings log.

    With the KV cache the log holds the prompt's scalings first, then one single-token entry per token fed
    back. Without it every entry is the whole sequence again; such an entry replaces what came before. The
    last generated token is never fed back, so the result has one row fewer than the full sequence: callers
    show that token without routing. ``n_tokens`` caps the number of rows.
    """
    rows: torch.Tensor | None = None
    for entry in log:
        scalings = entry[row].detach().to(device="cpu", dtype=torch.float32)
        if rows is None:
            rows = scalings
        elif scalings.shape[0] > 1 and scalings.shape[0] == rows.shape[0] + 1:
            rows = scalings  # an uncached step recomputes every position
        else:
            rows = torch.cat([rows, scalings], dim=0)
    if rows is None:
        return torch.zeros(0, 0, 0)
    return rows if n_tokens is None else rows[:n_tokens]


def layer_view(routing: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """``[tokens, n_experts]`` weights of one X-LoRA layer, or the mean over layers when ``layer`` is ``None``."""
    if routing.numel() == 0:
        return routing.reshape(routing.shape[0], -1)
    if layer is None:
        return routing.mean(dim=1)
    if not 0 <= layer < routing.shape[1]:
        raise IndexError(f"Layer {layer} is out of range: the mixture has {routing.shape[1]} X-LoRA layers.")
    return routing[:, layer, :]


def dominant_experts(weights: torch.Tensor) -> list[int]:
    """Index of the expert with the largest weight for each token of a ``[tokens, n_experts]`` view."""
    return weights.argmax(dim=-1).tolist() if weights.numel() else []


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
        result.tokens = routed_tokens(routing, ids, tokenizer, model.expert_names, prompt_len=prompt_len, layer=layer)
    return result


def routed_tokens(
    routing: torch.Tensor,
    ids: Sequence[int],
    tokenizer: Any,
    expert_names: Sequence[str],
    *,
    prompt_len: int,
    layer: int | None = None,
) -> list[RoutedToken]:
    """Every token of ``ids`` with its dominant expert and weights in ``layer`` (the last one has none)."""
    weights = layer_view(routing, layer)
    dominant = dominant_experts(weights)
    tokens = []
    for position, token_id in enumerate(ids):
        routed = position < len(dominant)
        tokens.append(
            RoutedToken(
                text=tokenizer.decode([token_id]),
                expert=expert_names[dominant[position]] if routed else None,
                weights=[round(float(w), 6) for w in weights[position]] if routed else None,
                generated=position >= prompt_len,
            )
        )
    return tokens
