"""The model card of a mixture, made with ``huggingface_hub.ModelCard``: metadata, experts, settings, usage.

The card is made to be published: its ``base_model`` is read from the config's text alone
(:func:`xlora_hub.refs.is_stored_hub_id`), never from what exists in the working directory, and a local
folder is named without its path.

Its metadata places the mixture in the Hub's model tree: exactly one ``base_model`` (the base LLM; listing the
experts there too would read as a merge) with ``base_model_relation: adapter``, and ``library_name: xlora-hub``.
The experts are linked in the expert table, each at its pinned commit, with the licence and gating read from
its own repo (:func:`read_expert_facts`, at push); :func:`licence_warnings` says when they call for care.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME, FORMAT_VERSION, ExpertRef, XLoraConfig
from ..refs import hub_url, is_stored_hub_id
from .api import client_identity
from .format import CARD_TAGS, EXPERTS_DIR, LIBRARY_NAME, MODEL_CARD_NAME, expected_classifier_shapes, settings_dict

__all__ = [
    "ExpertFacts",
    "licence_warnings",
    "make_model_card",
    "read_expert_facts",
]


@dataclass(frozen=True)
class ExpertFacts:
    """What an expert's own repo says about its use: its licence (``None``: its card names none) and its gating
    (``False``, or the Hub's ``"auto"`` / ``"manual"``: users must accept its conditions before downloading)."""

    license: str | None = None
    gated: str | bool = False


def _card_licence(api: Any, repo_id: str, revision: str | None) -> str | None:
    """The licence in an expert's own model card (``license``, or ``license_name`` for ``other``); ``None`` without."""
    from huggingface_hub import ModelCard, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    try:
        path = hf_hub_download(repo_id, MODEL_CARD_NAME, revision=revision, token=api.token, **client_identity())
    except EntryNotFoundError:
        return None
    return _licence_text(ModelCard.load(path, ignore_metadata_errors=True).data)


def _licence_text(data: Any) -> str | None:
    """Card data's licence as one string (a list, which card metadata allows, joined; ``other`` with its name)."""
    licence = getattr(data, "license", None)
    if licence == "other" and getattr(data, "license_name", None):
        licence = f"other ({data.license_name})"
    if isinstance(licence, (list, tuple)):
        licence = ", ".join(map(str, licence))
    return str(licence) if licence else None


def read_expert_facts(api: Any, refs: Mapping[str, ExpertRef]) -> dict[str, ExpertFacts]:
    """The licence and gating of each Hub expert at its pinned revision: ``model_info(...).card_data`` and
    ``gated``, the licence read from the expert's ``README.md`` when the Hub sends no card data."""
    facts = {}
    for name, ref in refs.items():
        if not ref.is_hub:
            continue
        assert ref.repo_id is not None
        info = api.model_info(ref.repo_id, revision=ref.revision)
        card_data = getattr(info, "card_data", None)
        licence = _licence_text(card_data) if card_data is not None else None
        if licence is None:
            licence = _card_licence(api, ref.repo_id, info.sha or ref.revision)
        facts[name] = ExpertFacts(license=licence, gated=getattr(info, "gated", False) or False)
    return facts


def licence_warnings(facts: Mapping[str, ExpertFacts]) -> list[str]:
    """Why a user of the mixture must read its experts' terms: licences that differ, and gated experts."""
    out = []
    licences = {name: fact.license or "unknown" for name, fact in facts.items()}
    if len(set(licences.values())) > 1:
        listing = "; ".join(f"{name}: {licence}" for name, licence in licences.items())
        out.append(
            f"The experts are under different licences ({listing}); the mixture is bound by each of them. Check "
            "every expert's terms before using or redistributing it."
        )
    for name, fact in facts.items():
        if fact.gated:
            out.append(
                f"Expert `{name}` is gated ({fact.gated}): users must accept its conditions on its repo page (and "
                "pass a token) before this mixture loads."
            )
    return out


def _access(fact: ExpertFacts | None) -> tuple[str, str]:
    """The licence and access cells of an expert's row (``-`` where the mixture was not pushed)."""
    if fact is None:
        return "-", "-"
    return (f"`{fact.license}`" if fact.license else "unknown"), (f"gated ({fact.gated})" if fact.gated else "open")


def _folder_name(path: str) -> str:
    return os.path.basename(os.path.normpath(os.path.expanduser(path))) or "."


def _expert_row(index: int, name: str, ref: ExpertRef, fact: ExpertFacts | None = None) -> str:
    if ref.is_hub:
        source = f"[{ref.repo_id}]({hub_url(ref.repo_id, revision=ref.revision or 'main', subfolder=ref.subfolder)})"
        revision = f"`{ref.revision[:12] if ref.is_pinned else ref.revision}`" if ref.revision else "latest (unpinned)"
    elif ref.path and not os.path.isabs(os.path.expanduser(ref.path)):
        source = f"bundled: [`{ref.path}`]({ref.path})"
        revision = "this repo"
    else:  # an absolute path (a config made in memory, never a saved one): named, not written
        source = f"local folder `{_folder_name(ref.path or '')}`"
        revision = "local"
    licence, access = _access(fact)
    return f"| {index} | `{name}` | {source} | {revision} | {ref.subfolder or ''} | {licence} | {access} |"


def card_metadata(config: XLoraConfig) -> Any:
    """The card's ``ModelCardData``: one ``base_model`` (the base LLM, a Hub id) with ``base_model_relation:
    adapter`` so the Hub files the mixture under it as an adapter, ``library_name`` and tags."""
    from huggingface_hub import ModelCardData

    base = config.base_model
    on_hub = base is not None and is_stored_hub_id(base.repo_id)
    relation = {"base_model_relation": "adapter"} if on_hub else {}
    return ModelCardData(
        base_model=base.repo_id if on_hub and base is not None else None,
        library_name=LIBRARY_NAME,
        tags=list(CARD_TAGS),
        **relation,
    )


def make_model_card(
    config: XLoraConfig, *, repo_id: str | None = None, experts: Mapping[str, ExpertFacts] | None = None
):
    """A ``huggingface_hub.ModelCard`` for a mixture: metadata, expert table, settings and a usage snippet.

    ``experts`` (from :func:`read_expert_facts`, at push) fills each expert's licence and access, and adds a
    note when the licences differ or an expert is gated."""
    from huggingface_hub import ModelCard

    base = config.base_model
    data = card_metadata(config)
    facts = dict(experts or {})
    shapes = expected_classifier_shapes(config)
    n_params = sum(int(torch.Size(shape).numel()) for shape in shapes.values())
    if base is None:
        base_text = "a base model"
    elif is_stored_hub_id(base.repo_id):
        base_text = f"`{base.repo_id}`" + (f" at `{base.revision}`" if base.revision else "")
    else:  # a card is made to be published: a local folder is named, its path never written
        base_text = f"a local base model (folder `{_folder_name(base.repo_id)}`)"
    title = repo_id or "X-LoRA mixture"
    rows = "\n".join(
        _expert_row(i, name, ref, facts.get(name) if experts is not None else None)
        for i, (name, ref) in enumerate(config.experts.items())
    )
    notes = "".join(f"\n> **Note:** {line}\n" for line in licence_warnings(facts))
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

| # | Expert | Source | Revision | Subfolder | Licence | Access |
|---|---|---|---|---|---|---|
{rows}
{notes}
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
