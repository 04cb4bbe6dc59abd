"""A Hub collection gathering a pushed mixture with what it is made of: its experts, its base model, its Space.

``push_mixture(..., collection=TITLE)`` calls :func:`update_collection` after the commit. Creating and adding
are idempotent (``exists_ok``): pushing again with the same title finds the collection and adds only what is
missing, so a collection can gather several mixtures. A Space "for" the mixture is one the Hub lists as using
it (``list_spaces(models=...)``: a Space README's ``models:``, which ``xlora-hub space push`` writes).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from ..errors import InvalidConfigError

__all__ = ["check_collection_title", "collection_items", "update_collection"]

logger = logging.getLogger(__name__)


def check_collection_title(title: Any) -> str:
    """The title, stripped; a clear error before anything is pushed when it is not a non-empty string."""
    if not isinstance(title, str) or not title.strip():
        raise InvalidConfigError(
            f"The collection title must be a non-empty string, got {title!r}; pass `collection='My mixtures'` "
            "(`--collection 'My mixtures'`)."
        )
    return title.strip()


def collection_items(
    api: Any, mixture: str, *, experts: Sequence[str], base_model: str | None
) -> list[tuple[str, str, str]]:
    """``(repo id, item type, note)`` for the mixture, each expert repo, the base model and the mixture's Spaces."""
    items = [(mixture, "model", "The X-LoRA mixture")]
    for repo_id in dict.fromkeys(experts):
        if repo_id != mixture:
            items.append((repo_id, "model", "A LoRA expert of the mixture"))
    if base_model is not None:
        items.append((base_model, "model", "The base model"))
    for space in api.list_spaces(models=mixture):
        items.append((space.id, "space", "A Space running the mixture"))
    return items


def update_collection(
    api: Any,
    title: str,
    mixture: str,
    *,
    experts: Sequence[str],
    base_model: str | None,
    private: bool | None = None,
) -> Any:
    """Create the collection ``title`` in the mixture's namespace (or find it) and add what is missing.

    Returns the ``huggingface_hub.Collection`` as it stands after the last addition.
    """
    title = check_collection_title(title)
    namespace = mixture.split("/")[0]
    collection = api.create_collection(
        title,
        namespace=namespace,
        description=f"The X-LoRA mixture {mixture}, its experts and base model (xlora-hub)",
        private=bool(private),
        exists_ok=True,
    )
    present = {(item.item_id, item.item_type) for item in collection.items}
    for repo_id, item_type, note in collection_items(api, mixture, experts=experts, base_model=base_model):
        if (repo_id, item_type) not in present:
            collection = api.add_collection_item(collection.slug, repo_id, item_type, note=note, exists_ok=True)
            present.add((repo_id, item_type))
    logger.info("Collection %r: %s", title, collection.url)
    return collection
