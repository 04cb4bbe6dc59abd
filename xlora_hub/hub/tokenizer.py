"""The one tokenizer loader: the mixture's own folder (or Hub repo) first, then its base model.

The base model is resolved exactly as a load resolves it (:func:`.fetch.resolve_base_model_ref`), so a
self-contained folder whose config names ``./base_model`` finds that folder inside the mixture, from any
working directory. The CLI, the Space and the library all load tokenizers here.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

from ..errors import InvalidMixtureError
from ..refs import is_stored_hub_id
from .fetch import fetch_mixture, resolve_base_model_ref

__all__ = ["load_tokenizer"]


def load_tokenizer(
    mixture_or_model: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
) -> Any:
    """The tokenizer of a mixture (folder or Hub repo): its own if it carries one, else its base model's.

    A folder or repo that is not a mixture (a plain model) is asked for its tokenizer directly. The
    options apply to every download; ``revision`` is the mixture's (the base model's is the one its config
    records). Nothing found is an :class:`~xlora_hub.errors.InvalidMixtureError` naming every place tried.
    """
    from transformers import AutoTokenizer

    hub = dict(token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    tried: list[str] = []
    last: BaseException | None = None
    for name, rev in _candidates(mixture_or_model, revision=revision, **hub):
        tried.append(repr(name))
        try:
            return AutoTokenizer.from_pretrained(name, revision=rev, **hub)
        except Exception as err:  # noqa: BLE001 - transformers raises many types for "no tokenizer here"
            last = err
    from ..redact import redact

    why = redact(" ".join(str(last).split()), [token])[:200]  # redacted before it is cut
    raise InvalidMixtureError(
        f"No tokenizer could be loaded from {' or '.join(tried)} ({why}). Save one next to the mixture with "
        "`tokenizer.save_pretrained(mixture_folder)`, or record a base model that has one."
    )


def _candidates(
    mixture_or_model: str | os.PathLike[str], *, revision: str | None, **hub: Any
) -> Iterator[tuple[str, str | None]]:
    """Where a tokenizer may be, in order: the mixture (folder, or repo at the commit it resolved to), its base.

    Lazy: the base model is only resolved when the mixture itself has no tokenizer.
    """
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        source = fetch_mixture(mixture_or_model, revision=revision, with_weights=False, **hub)
    except (InvalidMixtureError, LocalEntryNotFoundError):
        # not a mixture (no xlora_config.json), or offline with none cached: a plain model folder or repo
        yield os.fspath(mixture_or_model), revision
        return
    if source.repo_id is None:
        yield str(source.folder), None
    else:
        yield source.repo_id, source.commit or revision
    if source.config.base_model is not None:
        base = resolve_base_model_ref(source)
        yield base.repo_id, base.revision if is_stored_hub_id(base.repo_id) else None
