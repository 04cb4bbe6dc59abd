"""Which mixture a Space serves: the environment's ``XLORA_MIXTURE``, else the Space's ``xlora_space.json``.

``xlora-hub space push`` writes ``xlora_space.json`` next to ``app.py``, pinning the mixture to a commit; a
local run (or a Space's variables) can name another mixture without editing files.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..jsonfile import read_json_object

__all__ = ["MIXTURE_ENV", "REVISION_ENV", "SPACE_CONFIG_NAME", "space_target"]

MIXTURE_ENV = "XLORA_MIXTURE"
"""Environment variable naming the mixture a Space or ``main()`` serves (Hub repo id or local folder)."""
REVISION_ENV = "XLORA_REVISION"
"""Environment variable with the mixture's revision (branch, tag or commit) when ``XLORA_MIXTURE`` is set."""
SPACE_CONFIG_NAME = "xlora_space.json"
"""File written next to a published Space's ``app.py``: the mixture it serves and the commit it is pinned to."""


def space_target(app_dir: str | os.PathLike[str] | None = None) -> tuple[str | None, str | None]:
    """The mixture (and revision) to serve: ``XLORA_MIXTURE``/``XLORA_REVISION``, else the Space's
    ``xlora_space.json``, else ``(None, None)`` for the embedded default mixture."""
    mixture = os.environ.get(MIXTURE_ENV, "").strip()
    if mixture:
        return mixture, os.environ.get(REVISION_ENV, "").strip() or None
    if app_dir is not None:
        pinned = Path(app_dir) / SPACE_CONFIG_NAME
        if pinned.is_file():
            data = read_json_object(pinned)
            return data["mixture"], data.get("revision")
    return None, None
