"""The library side of the Gradio Space: loading a mixture for the demo, running the app, publishing a Space.

The UI lives in ``spaces_app/app.py``, a plain Hugging Face Space folder. Everything it needs that is not UI
lives here, so the Space and the ``xlora-hub demo`` / ``xlora-hub space push`` commands stay thin:

* :mod:`.target`: which mixture a Space serves (``XLORA_MIXTURE``, else ``xlora_space.json``);
* :mod:`.page`: what the page shows (experts, model card summary, local folders by name only);
* :mod:`.load`: the model, tokenizer and card of a mixture, with one-line errors;
* :mod:`.launch`: finding, importing and launching ``app.py``;
* :mod:`.publish`: the Space folder and the one commit that pushes it;
* :mod:`.runner`, :mod:`.batching` and :mod:`.views` (imported on first use: they need gradio and matplotlib,
  the ``demo`` extra): checking requests, running the waiting ones as one left-padded batch, and the
  pictures of their routing;
* :mod:`.gpu`: ZeroGPU (``spaces.GPU`` around the batch's generation, a no-op elsewhere).

The routing views the page draws (:func:`~xlora_hub.routing.routing_from_log`, ...) live in
:mod:`xlora_hub.routing`, shared with the CLI.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .gpu import gpu_function, on_zero_gpu, space_device
from .launch import MAX_UPLOAD_BYTES, launch_demo, load_app_module, spaces_app_dir
from .load import DemoMixture, load_demo
from .page import (
    ExpertInfo,
    display_name,
    expert_infos,
    hide_local_paths,
    local_label,
    model_card_evidence,
    model_card_summary,
    read_model_card,
)
from .publish import SPACE_FILES, build_space_folder, preload_lines, push_space, space_requirements
from .target import MIXTURE_ENV, REVISION_ENV, SPACE_CONFIG_NAME, space_target

_LAZY = {
    "DEFAULT_MAX_BATCH_SIZE": "runner",
    "GenerationStats": "runner",
    "MixtureRunner": "runner",
    "Batcher": "batching",
    "GenerationRequest": "batching",
    "ALL_LAYERS": "views",
    "PALETTE": "views",
    "expert_colors": "views",
    "experts_markdown": "views",
    "render_routing": "views",
    "routing_figure": "views",
}

if TYPE_CHECKING:  # pragma: no cover
    from .batching import Batcher, GenerationRequest
    from .runner import DEFAULT_MAX_BATCH_SIZE, GenerationStats, MixtureRunner
    from .views import ALL_LAYERS, PALETTE, expert_colors, experts_markdown, render_routing, routing_figure


def __getattr__(name: str) -> Any:
    """The app's pieces, imported on first use: ``import xlora_hub.space`` (the CLI) needs no gradio."""
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ALL_LAYERS",
    "DEFAULT_MAX_BATCH_SIZE",
    "Batcher",
    "DemoMixture",
    "ExpertInfo",
    "GenerationRequest",
    "GenerationStats",
    "MAX_UPLOAD_BYTES",
    "MIXTURE_ENV",
    "MixtureRunner",
    "PALETTE",
    "REVISION_ENV",
    "SPACE_CONFIG_NAME",
    "SPACE_FILES",
    "build_space_folder",
    "display_name",
    "expert_colors",
    "expert_infos",
    "experts_markdown",
    "gpu_function",
    "hide_local_paths",
    "launch_demo",
    "load_app_module",
    "load_demo",
    "local_label",
    "model_card_evidence",
    "model_card_summary",
    "on_zero_gpu",
    "preload_lines",
    "push_space",
    "read_model_card",
    "render_routing",
    "routing_figure",
    "space_device",
    "space_requirements",
    "space_target",
    "spaces_app_dir",
]
