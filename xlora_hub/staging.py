"""Writing a folder so that nothing is ever half-written: stage it beside the target, then move it in.

Every writer of a folder (mixtures, exports, the demo build, a Space dry run) writes into a temporary
folder next to its target (same file system, so the final moves are atomic renames) and only then
moves the result into place. An exception at any point leaves the target as it was.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def check_folder_target(target: str | os.PathLike[str], *, what: str = "the output") -> Path:
    """``target`` as a path whose parent exists; an error when it is an existing file."""
    path = Path(target).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is a file; {what} needs a folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A new empty folder beside ``target``, removed on exit (whatever was not moved out of it is dropped)."""
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def replace_folder(staging: Path, target: Path) -> None:
    """Put ``staging`` in the place of ``target`` as a whole (the old folder, if any, is removed)."""
    if not target.exists():
        os.replace(staging, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(staging, target)
    shutil.rmtree(old, ignore_errors=True)


def install_entries(source: Path, target: Path, *, names: list[str] | None = None) -> None:
    """Move the entries of ``source`` (or only ``names``, in that order) into ``target``, each replacing its namesake.

    Entries of ``target`` that ``source`` does not have are kept. A folder that is replaced is first moved
    aside into ``source`` and removed with it.
    """
    if not target.exists():
        os.replace(source, target)
        return
    entries = [source / name for name in names] if names is not None else sorted(source.iterdir())
    for entry in entries:
        final = target / entry.name
        if final.is_dir() and not final.is_symlink():
            trash = source / f".old-{entry.name}"
            os.replace(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(entry, final)
