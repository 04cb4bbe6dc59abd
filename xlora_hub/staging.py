"""One guarded way to write a folder: nothing half-written, nothing replaced that the caller did not ask for.

Every writer of a folder (mixtures, exports, the demo build, a Space dry run) goes through here:

1. :func:`prepare_target` makes the target absolute and refuses it when it is a file, a symbolic link (a
   link's folder is never written through), a folder holding files while ``overwrite`` is false, or a
   non-empty folder that cannot be swapped as a whole (the working directory or a folder above it, a mount
   point). Leftovers of an interrupted write of the same target are cleaned first (:func:`recover_folder`).
2. :func:`staging_folder` gives a fresh folder beside the target (``.<name>.xlora-tmp-<pid>-<random>``, on
   the same file system) where the *complete* new folder is written.
3. :func:`replace_folder` swaps whole folders with renames: target -> ``.<name>.xlora-old-<pid>-<random>``
   (the complete old folder), staging -> target, old -> ``.<name>.xlora-del-...``, which is then deleted.

So at every instant the target path holds the complete old or the complete new folder, or (between the
first two renames) nothing, with the complete old folder under its ``xlora-old`` name. The next save or
load of that target restores such a backup and deletes stale staging, backup and trash folders (those of
processes that no longer run), recognised by their name.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import InvalidConfigError

logger = logging.getLogger(__name__)

_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.xlora-(?P<kind>tmp|old|del)-(?P<pid>\d+)-[0-9A-Za-z_]+$")
_STALE_WITHOUT_PIDS_S = 24 * 3600  # where a process cannot be asked whether it runs (Windows): a day old is stale
LAST_ENTRIES = ("xlora_config.json",)
"""Entries moved last when a folder has to be filled entry by entry: a mixture is a mixture once its config is there."""


def _absolute(target: str | os.PathLike[str]) -> Path:
    """``target`` made absolute without following a link at its end (``.`` and ``..`` are folded first)."""
    path = Path(os.path.abspath(Path(target).expanduser()))
    if path.name:
        path = path.parent.resolve() / path.name
    return path


def _unswappable(path: Path) -> str | None:
    """Why ``path`` cannot be renamed away (the working directory or above it, a mount point, the root); else None."""
    if not path.name or os.path.ismount(path):
        return "a mount point"
    with contextlib.suppress(OSError):
        cwd = Path.cwd().resolve()
        if path.exists() and (cwd == path.resolve() or path.resolve() in cwd.parents):
            return "the working directory" if cwd == path.resolve() else "a folder above the working directory"
    return None


def is_empty_folder(path: Path) -> bool:
    """True for a missing folder or one without entries."""
    if not path.is_dir():
        return not os.path.lexists(path)
    with os.scandir(path) as entries:
        return next(entries, None) is None


def _checked_path(target: str | os.PathLike[str], *, what: str) -> Path:
    """The absolute target, refused when it is a symbolic link or a file."""
    path = _absolute(target)
    if os.path.islink(path):
        raise InvalidConfigError(
            f"{what} {str(path)!r} is a symbolic link (to {os.readlink(path)!r}); xlora-hub never writes through a "
            "link. Give the folder it points to, or a new path."
        )
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{str(path)!r} is a file; {what.lower()} must be a folder.")
    return path


def check_overwrite(
    target: str | os.PathLike[str], *, overwrite: bool, what: str = "Output folder", replaces: str = "it"
) -> Path:
    """The absolute target; an error naming it and ``--overwrite`` when it holds files and ``overwrite`` is false.

    Also refused: a link (never written through), a file, and a non-empty folder that cannot be swapped as a
    whole (the working directory or a folder above it, a mount point). Cheap and side-effect free, so a
    command can call it before any slow work.
    """
    path = _checked_path(target, what=what)
    if is_empty_folder(path):
        return path
    if not overwrite:
        raise InvalidConfigError(
            f"{what} {str(path)!r} already exists and is not empty; pass --overwrite (overwrite=True) to replace "
            f"{replaces}, or choose a new folder."
        )
    reason = _unswappable(path)
    if reason is not None:  # replacing it would pull the folder from under the shell, or fail half-way
        raise InvalidConfigError(
            f"{what} {str(path)!r} is {reason}, so it cannot be replaced as a whole; write to a new folder (for "
            "example a subfolder of it), or run the command from another folder."
        )
    return path


def prepare_target(
    target: str | os.PathLike[str], *, overwrite: bool, what: str = "Output folder", replaces: str = "it"
) -> Path:
    """Check a folder target (see :func:`check_overwrite`), clean an interrupted write's leftovers, make its parent."""
    path = _checked_path(target, what=what)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_folder(path)  # may bring back a folder an interrupted save left under its backup name
    return check_overwrite(path, overwrite=overwrite, what=what, replaces=replaces)


def _leftover_path(target: Path, kind: str) -> Path:
    return target.parent / f".{target.name}.xlora-{kind}-{os.getpid()}-{secrets.token_hex(4)}"


def _process_gone(pid: int, path: Path) -> bool:
    """True when the process that made a leftover no longer runs (its folder is then stale)."""
    if pid == os.getpid():
        return False
    if os.name != "posix":  # os.kill(pid, 0) would terminate the process on Windows
        with contextlib.suppress(OSError):
            return time.time() - path.lstat().st_mtime > _STALE_WITHOUT_PIDS_S
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process: it runs
        return False
    return False


def stale_leftovers(target: str | os.PathLike[str]) -> list[Path]:
    """The staging, backup and trash folders of ``target`` left by writers that no longer run."""
    target = _absolute(target)
    try:
        entries = list(os.scandir(target.parent))
    except OSError:
        return []
    found = []
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if match and match["name"] == target.name and _process_gone(int(match["pid"]), Path(entry.path)):
            found.append(Path(entry.path))
    return sorted(found)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()


def recover_folder(target: str | os.PathLike[str]) -> Path | None:
    """Finish what an interrupted write of ``target`` left: a missing target gets its complete backup back, and
    stale staging, backup and trash folders are removed. Returns the restored backup's old path, if any.

    Best effort: a folder that cannot be changed (read-only) is left as it is.
    """
    target = _absolute(target)
    leftovers = stale_leftovers(target)
    backups = sorted(
        (p for p in leftovers if _LEFTOVER.match(p.name)["kind"] == "old"),  # type: ignore[index]
        key=lambda p: p.lstat().st_mtime,
        reverse=True,
    )
    restored = None
    if backups and not os.path.lexists(target):
        try:
            os.rename(backups[0], target)  # a backup is the complete old folder: it was renamed away whole
        except OSError as err:
            logger.warning("Could not restore %s from %s (%s).", target, backups[0], err)
        else:
            restored = backups[0]
            logger.warning("Restored %s from the backup an interrupted save left (%s).", target, backups[0].name)
    for path in leftovers:
        if path != restored:
            _remove(path)
    return restored


@contextlib.contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A new empty folder beside ``target``, removed on exit (whatever was not moved out of it is dropped)."""
    target = _absolute(target)
    recover_folder(target)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.xlora-tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _fill(staging: Path, target: Path) -> None:
    """Move the entries of ``staging`` into the empty, unswappable folder ``target`` (``LAST_ENTRIES`` last)."""
    if not is_empty_folder(target):
        raise InvalidConfigError(
            f"{str(target)!r} is {_unswappable(target)} and not empty, so it cannot be replaced as a whole; write "
            "to a new folder."
        )
    entries = sorted(staging.iterdir(), key=lambda p: (p.name in LAST_ENTRIES, p.name))
    for entry in entries:
        os.rename(entry, target / entry.name)


def replace_folder(staging: Path, target: Path) -> None:
    """Put the complete folder ``staging`` in the place of ``target`` by swapping whole folders.

    target -> backup, staging -> target, backup -> trash (deleted): a kill at any point leaves the complete
    old or new folder at ``target``, or the complete old one under its backup name, which
    :func:`recover_folder` puts back on the next save or load.
    """
    target = _absolute(target)
    if not os.path.lexists(target):
        os.rename(staging, target)
        return
    if _unswappable(target) is not None:
        _fill(staging, target)
        return
    backup = _leftover_path(target, "old")
    os.rename(target, backup)
    os.rename(staging, target)
    trash = _leftover_path(target, "del")
    os.rename(backup, trash)  # from here on it is never restored, so it may be deleted half-way
    _remove(trash)


def _link_or_copy(source: str, dest: str) -> None:
    """Hard-link a file (cheap, same file system), or copy it where links are not possible."""
    try:
        os.link(source, dest, follow_symlinks=False)
    except OSError:
        shutil.copy2(source, dest, follow_symlinks=False)


def _mount_inside(folder: Path) -> Path | None:
    """A mount point at or below ``folder`` (links not followed), else ``None``."""
    for root, dirs, _ in os.walk(folder):
        for name in [os.curdir, *dirs]:
            path = Path(root, name)
            if not path.is_symlink() and os.path.ismount(path):
                return Path(os.path.normpath(path))
    return None


def carry_entry(source: Path, dest: Path) -> None:
    """Reproduce ``source`` (a file, folder or link) at ``dest`` without touching it: files hard-linked, links
    copied as links (never followed), folders recursively. Used to keep a folder's other files across a swap.

    A folder holding a mount point is refused: its files could only be copied (no hard links across file
    systems), and removing the old folder after the swap would empty the mounted volume."""
    if source.is_dir() and not source.is_symlink():
        mount = _mount_inside(source)
        if mount is not None:
            raise InvalidConfigError(
                f"{str(mount)!r} is a mount point inside the folder being replaced; xlora-hub will not swap a "
                "folder that holds another file system (removing the old folder would empty it). Save the mixture "
                "to a folder without mounts, or unmount it first."
            )
    if source.is_symlink():
        os.symlink(os.readlink(source), dest, target_is_directory=source.is_dir())
    elif source.is_dir():
        shutil.copytree(source, dest, symlinks=True, copy_function=_link_or_copy)
    else:
        _link_or_copy(str(source), str(dest))
