"""The model card of a mixture, made with ``huggingface_hub.ModelCard``: metadata, experts, settings, usage.

The card is made to be published: its ``base_model`` is read from the config's text alone
(:func:`xlora_hub.refs.is_stored_hub_id`), never from what exists in the working directory, and a local
folder is named without its path.
"""

from __future__ import annotations

import json
import os

import torch

from ..config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME, FORMAT_VERSION, ExpertRef, XLoraConfig
from ..refs import hub_url, is_stored_hub_id
from .format import CARD_TAGS, EXPERTS_DIR, LIBRARY_NAME, expected_classifier_shapes, settings_dict

__all__ = [
    "make_model_card",
]


def _folder_name(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.expanduser(path))) or "."


def _expert_row(index: int, name: str, ref: ExpertRef) -> str:
    if ref.is_hub:
        source = f"[{ref.repo_id}]({hub_url(ref.repo_id, revision=ref.revision or 'main', subfolder=ref.subfolder)})"
        revision = f"`{ref.revision[:12] if ref.is_pinned else ref.revision}`" if ref.revision else "latest (unpinned)"
    elif ref.path and not os.path.isabs(os.path.expanduser(ref.path)):
        source = f"bundled: [`{ref.path}`]({ref.path})"
        revision = "this repo"
    else:  # an absolute path (a config made in memory, never a saved one): named, not written
        source = f"local folder `{_folder_name(ref.path or '')}`"
        revision = "local"
    return f"| {index} | `{name}` | {source} | {revision} | {ref.subfolder or ''} |"


def make_model_card(config: XLoraConfig, *, repo_id: str | None = None):
    """A ``huggingface_hub.ModelCard`` for a mixture: metadata, expert table, settings and a usage snippet."""
    from huggingface_hub import ModelCard, ModelCardData

    base = config.base_model
    data = ModelCardData(
        base_model=base.repo_id if base is not None and is_stored_hub_id(base.repo_id) else None,
        library_name=LIBRARY_NAME,
        tags=list(CARD_TAGS),
    )
    shapes = expected_classifier_shapes(config)
    n_params = sum(int(torch.Size(shape).numel()) for shape in shapes.values())
    if base is None:
        base_text = "a base model"
    elif is_stored_hub_id(base.repo_id):
        base_text = f"`{base.repo_id}`" + (f" at `{base.revision}`" if base.revision else "")
    else:  # a card is made to be published: a local folder is named, its path never written
        base_text = f"a local base model (folder `{_folder_name(base.repo_id)}`)"
    title = repo_id or "X-LoRA mixture"
    rows = "\n".join(_expert_row(i, name, ref) for i, (name, ref) in enumerate(config.experts.items()))
    settings = "\n".join(f"| `{key}` | `{json.dumps(value)}` |" for key, value in settings_dict(config).items())
    load_id = repo_id or "path/to/this/folder"
    n_hub = sum(ref.is_hub for ref in config.experts.values())
    where = (
        f"*references* to {n_hub} expert repos, each pinned to a commit so the mixture never changes under its users"
        if n_hub
        else "no reference to other repos"
    )
    if n_hub < config.n_experts:
        where += f"; {config.n_experts - n_hub} expert(s) are bundled in `{EXPERTS_DIR}/`"
    body = f"""
# {title}

An [X-LoRA](https://arxiv.org/abs/2402.07148) mixture of {config.n_experts} LoRA experts over {base_text}, made with
xlora-hub. This repo holds the gating classifier ({n_params:,d} parameters, {len(config.layer_names or [])} X-LoRA
layers, hidden size {config.hidden_size}) and {where}.

## Experts

| # | Expert | Source | Revision | Subfolder |
|---|---|---|---|---|
{rows}

## X-LoRA settings

| Setting | Value |
|---|---|
{settings}

## Usage

```python
from xlora_hub import XLoraModel

# Downloads the classifier, each expert at its pinned revision, and the base model.
model = XLoraModel.from_pretrained("{load_id}")
```

`xlora_hub.inspect_mixture("{load_id}")` shows the experts and settings without downloading any weights.
Files: `{CONFIG_NAME}` (xlora-hub format version {FORMAT_VERSION}), `{CLASSIFIER_WEIGHTS_NAME}`.
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")
