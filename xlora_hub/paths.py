"""The one rule for symbolic links: nothing inside a mixture is read through a link that leaves it.

A mixture folder may use links between its own files (``experts/b`` -> ``experts/a``), but a link to a file
or folder outside it would make xlora-hub load, re-save and upload (``push --bundle-experts``) or show (the
demo page's README) whatever the link points at. Every file of a mixture is found through
:func:`resolve_inside`, which refuses such a path with an error naming it.

A downloaded Hub snapshot (``<cache>/models--owner--name/snapshots/<sha>/``) is made of links into the same
repo's ``blobs/`` folder, so for a snapshot the allowed root is that repo's cache folder.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePath

from .errors import InvalidMixtureError

_CACHE_REPO_PREFIXES = ("models--", "datasets--", "spaces--")


def link_root(folder: str | os.PathLike[str]) -> Path:
    """The folder that links inside ``folder`` may point into: ``folder`` itself, or the repo cache folder of a
    Hub snapshot (whose files are links to ``../../blobs/``)."""
    folder = Path(folder)
    snapshots = folder.parent
    repo = snapshots.parent
    if snapshots.name == "snapshots" and repo.name.startswith(_CACHE_REPO_PREFIXES) and (repo / "blobs").is_dir():
        return repo
    return folder


def resolve_inside(root: str | os.PathLike[str], relative: str | PurePath, *, what: str) -> Path:
    """``root / relative``, refused when it, or a link on its way, resolves outside ``root`` (see :func:`link_root`).

    Links that stay inside are fine; ``root`` itself may be a link (the user named it). Returns the joined
    path (not resolved), so messages show the path the user knows.
    """
    root = Path(root)
    path = root / relative
    allowed = link_root(root).resolve()
    resolved = path.resolve()
    if resolved != allowed and allowed not in resolved.parents:
        raise InvalidMixtureError(
            f"{what} {str(path)!r} is a symbolic link (or inside one) to {str(resolved)!r}, outside "
            f"{str(root)!r}; xlora-hub reads nothing through a link that leaves the mixture. Copy the files into "
            "the mixture folder instead of linking them."
        )
    return path
