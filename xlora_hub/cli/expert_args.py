"""Expert arguments as the user types them: ``REF`` or ``NAME=REF``, and the names derived from bare refs.

``create`` takes experts positionally and with ``--name``; ``convert --adapter`` takes ``NAME=REF`` too.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..refs import is_local_argument

__all__ = ["default_expert_name", "expert_refs", "parse_named_ref"]


_NAMED_REF = re.compile(r"^[A-Za-z_]\w*=.")


def parse_named_ref(value: str) -> tuple[str, str]:
    """``NAME=REF`` of ``--name`` (the name must be a Python identifier)."""
    from ..errors import InvalidConfigError

    name, sep, ref = value.partition("=")
    name, ref = name.strip(), ref.strip()
    if not sep or not name or not ref:
        raise InvalidConfigError(f"Expected NAME=REF (for example 'math=my-org/lora-math@v1'), got {value!r}.")
    if not name.isidentifier():
        raise InvalidConfigError(
            f"{value!r}: expert name {name!r} is not a valid identifier; use letters, digits and '_'."
        )
    return name, ref


def default_expert_name(ref: Any) -> str:
    """A name for an expert from where it lives: its subfolder, else the repo name or folder name."""
    if ref.subfolder:
        source = ref.subfolder.rstrip("/").rsplit("/", 1)[-1]
    elif ref.is_hub:
        source = ref.repo_id.rsplit("/", 1)[-1]
    else:
        source = Path(os.path.expanduser(ref.path)).resolve().name
    name = re.sub(r"\W+", "_", source).strip("_").lower()
    if not name:
        return "expert"
    return name if name[0].isalpha() or name[0] == "_" else f"expert_{name}"


def expert_refs(positional: Sequence[str], named: Sequence[str]) -> dict[str, Any]:
    """Ordered ``{name: ExpertRef}``: the ``EXPERT`` arguments in order (``NAME=REF`` or a bare ref), then the
    ``--name NAME=REF`` ones. Bare refs get a name derived from their repo, subfolder or folder, made unique."""
    from ..config import ExpertRef
    from ..errors import InvalidConfigError

    entries: list[tuple[str | None, str]] = []
    for text in positional:
        named_here = _NAMED_REF.match(text)
        if named_here and not is_local_argument(text):  # an existing folder named `a=b` stays a path
            entries.append(parse_named_ref(text))
        else:
            entries.append((None, text))
    entries += [parse_named_ref(value) for value in named]
    taken: set[str] = set()
    for name, _ in entries:
        if name in taken:
            raise InvalidConfigError(f"The expert name {name!r} is given twice; every expert needs its own name.")
        if name:
            taken.add(name)
    refs: dict[str, Any] = {}
    for name, text in entries:
        ref = ExpertRef.parse(text)
        if name is None:
            base = default_expert_name(ref)
            name, index = base, 2
            while name in taken:
                name, index = f"{base}_{index}", index + 1
            taken.add(name)
        refs[name] = ref
    if not refs:
        raise InvalidConfigError("Give at least one expert: a Hub repo id, a local folder, or NAME=REF.")
    return refs
