"""The library side of the Gradio Space: loading a mixture for the demo, running the app, publishing a Space.

The UI lives in ``spaces_app/app.py``, a plain Hugging Face Space folder. Everything it needs that is not UI
lives here, so the Space and the ``xlora-hub demo`` / ``xlora-hub space push`` commands stay thin:

* :mod:`.target`: which mixture a Space serves (``XLORA_MIXTURE``, else ``xlora_space.json``);
* :mod:`.page`: what the page shows (experts, model card summary, local folders by name only);
* :mod:`.load`: the model, tokenizer and card of a mixture, with one-line errors;
* :mod:`.launch`: finding, importing and launching ``app.py``;
* :mod:`.publish`: the Space folder and the one commit that pushes it.

The routing views the page draws (:func:`~xlora_hub.routing.routing_from_log`, ...) live in
:mod:`xlora_hub.routing`, shared with the CLI.
"""

from __future__ import annotations

from ..refs import hub_url
from .launch import MAX_UPLOAD_BYTES, launch_demo, load_app_module, spaces_app_dir
from .load import DemoMixture, load_demo, load_tokenizer
from .page import (
    ExpertInfo,
    display_name,
    expert_infos,
    hide_local_paths,
    local_label,
    model_card_summary,
    read_model_card,
)
from .publish import SPACE_FILES, build_space_folder, push_space, space_requirements
from .target import MIXTURE_ENV, REVISION_ENV, SPACE_CONFIG_NAME, space_target

__all__ = [
    "DemoMixture",
    "ExpertInfo",
    "MAX_UPLOAD_BYTES",
    "MIXTURE_ENV",
    "REVISION_ENV",
    "SPACE_CONFIG_NAME",
    "SPACE_FILES",
    "build_space_folder",
    "display_name",
    "expert_infos",
    "hide_local_paths",
    "hub_url",
    "launch_demo",
    "load_app_module",
    "load_demo",
    "load_tokenizer",
    "local_label",
    "model_card_summary",
    "push_space",
    "read_model_card",
    "space_requirements",
    "space_target",
    "spaces_app_dir",
]
