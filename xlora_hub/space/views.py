"""The Space's pictures of a generation: tokens coloured by dominant expert, the routing heatmap, the means,
and the experts table. Plain data and matplotlib figures (no Gradio), built from the state one generation
leaves (:func:`xlora_hub.space.runner.routing_state`) so the layer selector redraws without generating.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from matplotlib.figure import Figure

from ..routing import dominant_experts, layer_view
from .page import expert_infos

__all__ = [
    "ALL_LAYERS",
    "PALETTE",
    "expert_colors",
    "experts_markdown",
    "layer_index",
    "render_routing",
    "routing_figure",
]

# tab10: distinct colours, readable behind dark text at the HighlightedText's opacity.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
ALL_LAYERS = "mean over layers"


def expert_colors(names: list[str]) -> dict[str, str]:
    """One colour per expert, the same in the token view, the legend and the heatmap's strip."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def layer_index(choice: str | None) -> int | None:
    """The layer a selector choice (``"3: model.layers.1.mlp.up_proj"``) names; ``None``: the mean."""
    if not choice or choice == ALL_LAYERS:
        return None
    return int(str(choice).split(":", 1)[0])


def render_routing(state: dict[str, Any] | None, layer_choice: str | None, names: list[str]):
    """Token view, heatmap and per-expert means of one generation for one layer (or the mean over layers)."""
    if not state:
        return None, None, None
    routing = torch.tensor(state["routing"], dtype=torch.float32).reshape(-1, state["n_layers"], len(names))
    layer = layer_index(layer_choice)
    weights = layer_view(routing, layer)
    dominant = dominant_experts(weights)
    tokens = state["tokens"]
    highlighted = [(tok, names[dominant[i]] if i < len(dominant) else None) for i, tok in enumerate(tokens)]
    view = ALL_LAYERS if layer is None else f"layer {layer_choice}"
    figure = routing_figure(weights, tokens, names, n_prompt=state["n_prompt"], title=f"Routing weights ({view})")
    means = {name: float(weights[:, j].mean()) if weights.shape[0] else 0.0 for j, name in enumerate(names)}
    return highlighted, figure, means


def routing_figure(weights: torch.Tensor, tokens: list[str], names: list[str], *, n_prompt: int, title: str) -> Figure:
    """Tokens x experts heatmap, with a strip of each token's dominant-expert colour above it.

    Axes are placed by hand (no constrained layout): rendering stays well under the generation's own time.
    """
    from matplotlib.colors import ListedColormap

    n_tokens, n_experts = weights.shape[0], len(names)
    top, strip, heat, bottom = 0.5, 0.22, 0.3 * max(n_experts, 2), 0.55  # inches
    height = top + strip + 0.05 + heat + bottom
    figure = Figure(figsize=(10, height), dpi=100)
    left, right = 0.09, 0.9
    heat_ax = figure.add_axes((left, bottom / height, right - left, heat / height))
    strip_ax = figure.add_axes(((left, (bottom + heat + 0.05) / height, right - left, strip / height)), sharex=heat_ax)
    bar_ax = figure.add_axes((right + 0.015, bottom / height, 0.012, heat / height))
    image = heat_ax.imshow(
        weights.T.numpy().reshape(n_experts, n_tokens),
        aspect="auto",
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
    )
    figure.colorbar(image, cax=bar_ax, label="weight")
    if n_tokens:
        strip_ax.imshow(
            [dominant_experts(weights)],
            aspect="auto",
            cmap=ListedColormap(list(expert_colors(names).values())),
            vmin=-0.5,
            vmax=n_experts - 0.5,
            interpolation="nearest",
        )
        if 0 < n_prompt < n_tokens:
            for ax in (strip_ax, heat_ax):
                ax.axvline(n_prompt - 0.5, color="white", linewidth=2, linestyle="--")
    strip_ax.set_yticks([0], ["dominant"])
    strip_ax.tick_params(axis="x", labelbottom=False)
    strip_ax.set_title(title + "  (dashed line: end of the prompt)", fontsize=10)
    heat_ax.set_yticks(range(n_experts), names)
    step = max(1, math.ceil(n_tokens / 60))
    labels = [repr(t)[1:-1] for t in tokens[:n_tokens:step]]
    heat_ax.set_xticks(range(0, n_tokens, step), labels, rotation=90, fontsize=7)
    return figure


def experts_markdown(model: Any) -> str:
    """The Experts panel's table: each expert's repo (a link at its pinned revision), rank, alpha, targets."""
    rows = ["| expert | repo | rank | alpha | target modules |", "|---|---|---|---|---|"]
    for info in expert_infos(model):
        source = f"[{info.source}]({info.url})" if info.url else f"`{info.source}`"
        targets = ", ".join(f"`{t}`" for t in info.target_modules) or "?"
        rank = "?" if info.rank is None else info.rank
        alpha = "?" if info.alpha is None else info.alpha
        rows.append(f"| **{info.name}** | {source} | {rank} | {alpha} | {targets} |")
    return "\n".join(rows)
