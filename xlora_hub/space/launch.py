"""Running the Space app (``spaces_app/app.py``) from the package: find it, import it, launch it.

``app.py`` is a plain Space file, not a module of this package: in a source checkout it is the repo's
``spaces_app/``; in an installed xlora-hub it ships inside the package as ``xlora_hub/space/app_files/``
(see ``setup.py``); in a published Space it sits at the Space's root, next to its copy of this package.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["APP_FILES_PACKAGE", "MAX_UPLOAD_BYTES", "launch_demo", "load_app_module", "spaces_app_dir"]

MAX_UPLOAD_BYTES = 16 * 1024
"""Gradio's upload cap for the app (``launch(max_file_size=...)``): it has no file input, so nothing legitimate
is uploaded, and without a cap ``/gradio_api/upload`` takes files of any size onto the server's disk."""
APP_FILES_PACKAGE = "xlora_hub.space.app_files"
"""Where an installed (non-editable) xlora-hub keeps the files of ``spaces_app/``."""
_APP_MODULE_NAME = "xlora_hub_space_app"


def spaces_app_dir() -> Path:
    """The folder holding ``app.py``: the repo's ``spaces_app/``, a published Space's root (where this
    package is vendored next to ``app.py``), or the copy an installed package carries."""
    package_parent = Path(__file__).resolve().parent.parent.parent
    candidates = [package_parent / "spaces_app", package_parent]
    spec = importlib.util.find_spec(APP_FILES_PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(location) for location in spec.submodule_search_locations]
    for candidate in candidates:
        if (candidate / "app.py").is_file() and (candidate / "README.md").is_file():
            return candidate
    raise FileNotFoundError(
        f"The Space app (spaces_app/app.py) was not found next to the xlora_hub package in {package_parent} "
        f"nor in {APP_FILES_PACKAGE}; reinstall xlora-hub or run from a source checkout."
    )


def load_app_module() -> ModuleType:
    """Import ``spaces_app/app.py`` (``build_app``, ``serve``, ``main``) wherever the package is installed."""
    module = sys.modules.get(_APP_MODULE_NAME)
    if module is not None:
        return module
    path = spaces_app_dir() / "app.py"
    spec = importlib.util.spec_from_file_location(_APP_MODULE_NAME, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[_APP_MODULE_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_APP_MODULE_NAME]
        raise
    return module


def launch_demo(
    mixture: str | os.PathLike[str] | None = None,
    *,
    port: int | None = None,
    share: bool = False,
    revision: str | None = None,
    token: str | bool | None = None,
    server_name: str | None = None,
    prevent_thread_lock: bool = False,
    max_batch_size: int | None = None,
):
    """Run the Space app locally on a mixture (``None``: the embedded default mixture); blocks until stopped
    unless ``prevent_thread_lock``. Returns the launched ``gr.Blocks``. Loading errors are
    :class:`~xlora_hub.errors.InvalidMixtureError` with a one-line message. ``max_batch_size``: requests one
    batch runs at most (``None``: the app's default; 1: one at a time)."""
    app = load_app_module()
    return app.serve(
        mixture,
        revision=revision,
        token=token,
        port=port,
        share=share,
        server_name=server_name,
        prevent_thread_lock=prevent_thread_lock,
        **({} if max_batch_size is None else {"max_batch_size": max_batch_size}),
    )
