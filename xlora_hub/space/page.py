"""What a Space page shows about a mixture: its experts, its model card, and local folders by name only.

A Space page is public, so a local folder (the mixture, the base model, an expert) is shown by its name,
never by its path: a path says who runs the app and how their disk is laid out.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..hub import EVIDENCE_HEADING
from ..jsonfile import read_json_object
from ..paths import resolve_inside
from ..refs import hub_url, is_local_argument

__all__ = [
    "ExpertInfo",
    "display_name",
    "expert_infos",
    "hide_local_paths",
    "local_label",
    "model_card_evidence",
    "model_card_summary",
    "read_model_card",
]


def local_label(path: str | os.PathLike[str]) -> str:
    """How a page shows a local folder: by its name, never by its path (a Space page is public, and a path
    says who runs it and how their disk is laid out)."""
    name = Path(os.path.expanduser(os.fspath(path))).resolve().name
    return f"local folder {name!r}" if name else "a local folder"


def display_name(mixture: str | os.PathLike[str]) -> str:
    """A mixture as a page names it: a Hub repo id as it is, a local folder by :func:`local_label`."""
    text = os.fspath(mixture)
    return local_label(text) if is_local_argument(text) else text


def hide_local_paths(text: str, paths: Sequence[str | os.PathLike[str] | None]) -> str:
    """``text`` with each of ``paths`` (as given and resolved) replaced by its :func:`local_label`, for text
    written on this machine (a model card) that a page shows."""
    spellings: dict[str, str] = {}
    for path in paths:
        if not path or not is_local_argument(os.fspath(path)):
            continue
        label = local_label(path)
        for spelling in {os.fspath(path), str(Path(os.path.expanduser(os.fspath(path))).resolve())}:
            if os.path.isabs(spelling):
                spellings[spelling] = label
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling, spellings[spelling])
    return text


@dataclass(frozen=True)
class ExpertInfo:
    """What the Experts panel shows about one expert."""

    name: str
    source: str
    url: str | None = None
    revision: str | None = None
    rank: int | None = None
    alpha: float | None = None
    target_modules: list[str] = field(default_factory=list)


def _adapter_config(expert: Any) -> dict[str, Any]:
    """The expert's ``adapter_config.json``, or ``{}`` when it cannot be read (the panel shows "?")."""
    try:
        return read_json_object(Path(expert.local_dir) / "adapter_config.json")
    except (OSError, ValueError):  # ValueError: InvalidConfigError from the bounded reader
        return {}


def expert_infos(model: Any) -> list[ExpertInfo]:
    """Name, source (a Hub link at the pinned revision, or the local folder's name, never its path), rank and
    target modules of each expert."""
    infos = []
    for expert in model.experts:
        ref = expert.pinned_ref()
        adapter = _adapter_config(expert)
        targets = adapter.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else sorted(str(t) for t in targets)
        rank, alpha = adapter.get("r"), adapter.get("lora_alpha")
        if ref.is_hub:
            url = hub_url(ref.repo_id, revision=ref.revision or "main", subfolder=ref.subfolder)
            infos.append(ExpertInfo(expert.name, str(ref), url, ref.revision, rank, alpha, targets))
        else:
            shown = local_label(expert.local_dir or ref.path)
            infos.append(ExpertInfo(expert.name, shown, None, None, rank, alpha, targets))
    return infos


def model_card_summary(text: str | None, *, max_chars: int = 1200) -> str:
    """The introduction of a model card: the text before its first section heading, without front matter,
    HTML comments or the leading title, cut at ``max_chars`` (the whole card when it has no sections)."""
    if not text:
        return ""
    text = re.sub(r"\A---\n.*?\n---\n", "", text.lstrip("\ufeff"), flags=re.S)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S).strip()
    text = re.sub(r"\A#\s[^\n]*\n", "", text).strip()
    section = re.search(r"^#{1,6}\s", text, flags=re.M)
    if section and section.start() > 0:
        text = text[: section.start()].strip()
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n\n", 0, max_chars)
    return text[: cut if cut > 0 else max_chars].rstrip() + "\n\n…"


def model_card_evidence(text: str | None) -> str:
    """The card's "Routing evidence" section (``push --eval``) without its pictures, or ``""`` when it has none.

    The pictures are links relative to the mixture repo, which a Space page cannot resolve (and a page that
    fetched them from the Hub would make requests outside the Space); the tables and the entropy stay.
    """
    if not text:
        return ""
    start = text.find("\n" + EVIDENCE_HEADING + "\n")
    if start < 0:
        return ""
    section = text[start + 1 :]
    following = re.search(r"^#{1,2}\s", section[len(EVIDENCE_HEADING) :], flags=re.M)
    if following:
        section = section[: len(EVIDENCE_HEADING) + following.start()]
    section = re.sub(r"^!\[[^\]]*\]\([^)]*\)\n?", "", section, flags=re.M)
    return re.sub(r"\n{3,}", "\n\n", section).strip()


def read_model_card(
    mixture: str | os.PathLike[str], *, revision: str | None = None, token: str | bool | None = None
) -> str | None:
    """The mixture's README.md text (local folder or Hub repo), or ``None`` when it has none."""
    folder = Path(mixture)
    if folder.is_dir():
        card = resolve_inside(folder, "README.md", what=f"Mixture {str(folder)!r}: the model card")
        return card.read_text(encoding="utf-8") if card.is_file() else None
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        path = hf_hub_download(str(mixture), "README.md", revision=revision, token=token)
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError):
        return None
    return Path(path).read_text(encoding="utf-8")
