"""The library side of the Gradio Space: routing views, loading a mixture for a demo, publishing a Space.

The UI lives in ``spaces_app/app.py``, a plain Hugging Face Space folder. Everything it needs that is not
UI (turning the scalings log into per-token routing, the experts' metadata, loading a mixture and its
tokenizer with clear errors) lives here, so the Space and the ``xlora-hub demo`` / ``xlora-hub space push``
commands stay thin. A pushed Space carries a copy of this package next to ``app.py`` and a small
``xlora_space.json`` naming the mixture and the commit it is pinned to, so it runs the exact code and
weights it was published with.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from .config import CONFIG_NAME, XLoraConfig
from .errors import InvalidConfigError, InvalidMixtureError, XLoraHubError
from .jsonfile import read_json_object
from .paths import resolve_inside
from .staging import prepare_target, replace_folder, staging_folder

MIXTURE_ENV = "XLORA_MIXTURE"
"""Environment variable naming the mixture a Space or ``main()`` serves (Hub repo id or local folder)."""
REVISION_ENV = "XLORA_REVISION"
"""Environment variable with the mixture's revision (branch, tag or commit) when ``XLORA_MIXTURE`` is set."""
SPACE_CONFIG_NAME = "xlora_space.json"
"""File written next to a published Space's ``app.py``: the mixture it serves and the commit it is pinned to."""
SPACE_FILES = ("app.py", "requirements.txt", "README.md")
_APP_MODULE_NAME = "xlora_hub_space_app"


MAX_UPLOAD_BYTES = 16 * 1024
"""Gradio's upload cap for the app (``launch(max_file_size=...)``): it has no file input, so nothing legitimate
is uploaded, and without a cap ``/gradio_api/upload`` takes files of any size onto the server's disk."""


def _looks_local(value: str) -> bool:
    """A local folder (existing, or written as a path) rather than a Hub repo id."""
    return value.startswith((".", "/", "~")) or os.path.isabs(value) or Path(value).expanduser().exists()


def local_label(path: str | os.PathLike[str]) -> str:
    """How a page shows a local folder: by its name, never by its path (a Space page is public, and a path
    says who runs it and how their disk is laid out)."""
    name = Path(os.path.expanduser(os.fspath(path))).resolve().name
    return f"local folder {name!r}" if name else "a local folder"


def display_name(mixture: str | os.PathLike[str]) -> str:
    """A mixture as a page names it: a Hub repo id as it is, a local folder by :func:`local_label`."""
    text = os.fspath(mixture)
    return local_label(text) if _looks_local(text) else text


def hide_local_paths(text: str, paths: Sequence[str | os.PathLike[str] | None]) -> str:
    """``text`` with each of ``paths`` (as given and resolved) replaced by its :func:`local_label`, for text
    written on this machine (a model card) that a page shows."""
    spellings: dict[str, str] = {}
    for path in paths:
        if not path or not _looks_local(os.fspath(path)):
            continue
        label = local_label(path)
        for spelling in {os.fspath(path), str(Path(os.path.expanduser(os.fspath(path))).resolve())}:
            if os.path.isabs(spelling):
                spellings[spelling] = label
    for spelling in sorted(spellings, key=len, reverse=True):
        text = text.replace(spelling, spellings[spelling])
    return text


# ---------------------------------------------------------------------------------------------- routing views
def routing_from_log(log: Sequence[torch.Tensor], n_tokens: int | None = None, *, row: int = 0) -> torch.Tensor:
    """Per-token scalings ``[tokens, n_layers, n_experts]`` of one sequence of a generation's scalings log.

    With the KV cache the log holds the prompt's scalings first, then one single-token entry per token fed
    back. Without it every entry is the whole sequence again; such an entry replaces what came before. The
    last generated token is never fed back, so the result has one row fewer than the full sequence: callers
    show that token without routing. ``n_tokens`` caps the number of rows.
    """
    rows: torch.Tensor | None = None
    for entry in log:
        scalings = entry[row].detach().to(device="cpu", dtype=torch.float32)
        if rows is None:
            rows = scalings
        elif scalings.shape[0] > 1 and scalings.shape[0] == rows.shape[0] + 1:
            rows = scalings  # an uncached step recomputes every position
        else:
            rows = torch.cat([rows, scalings], dim=0)
    if rows is None:
        return torch.zeros(0, 0, 0)
    return rows if n_tokens is None else rows[:n_tokens]


def layer_view(routing: torch.Tensor, layer: int | None = None) -> torch.Tensor:
    """``[tokens, n_experts]`` weights of one X-LoRA layer, or the mean over layers when ``layer`` is ``None``."""
    if routing.numel() == 0:
        return routing.reshape(routing.shape[0], -1)
    if layer is None:
        return routing.mean(dim=1)
    if not 0 <= layer < routing.shape[1]:
        raise IndexError(f"Layer {layer} is out of range: the mixture has {routing.shape[1]} X-LoRA layers.")
    return routing[:, layer, :]


def dominant_experts(weights: torch.Tensor) -> list[int]:
    """Index of the expert with the largest weight for each token of a ``[tokens, n_experts]`` view."""
    return weights.argmax(dim=-1).tolist() if weights.numel() else []


# ---------------------------------------------------------------------------------------------- experts panel
def hub_url(
    repo_id: str, *, revision: str | None = None, subfolder: str | None = None, repo_type: str = "model"
) -> str:
    """Browser URL of a repo (at a revision, optionally a subfolder) on the Hub that ``HF_ENDPOINT`` names."""
    from huggingface_hub import constants

    prefix = {"model": "", "dataset": "datasets/", "space": "spaces/"}[repo_type]
    url = f"{constants.ENDPOINT.rstrip('/')}/{prefix}{repo_id}"
    if revision or subfolder:
        url += f"/tree/{revision or 'main'}"
        if subfolder:
            url += f"/{subfolder.strip('/')}"
    return url


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


def expert_infos(model: Any) -> list[ExpertInfo]:
    """Name, source (a Hub link at the pinned revision, or the local folder's name, never its path), rank and
    target modules of each expert."""
    infos = []
    for expert in model.experts:
        ref = expert.pinned_ref()
        adapter: dict[str, Any] = {}
        try:
            adapter = read_json_object(Path(expert.local_dir) / "adapter_config.json")
        except (OSError, ValueError):  # ValueError: InvalidConfigError from the bounded reader
            pass
        targets = adapter.get("target_modules") or []
        targets = [targets] if isinstance(targets, str) else sorted(str(t) for t in targets)
        if ref.is_hub:
            url = hub_url(ref.repo_id, revision=ref.revision or "main", subfolder=ref.subfolder)
            infos.append(
                ExpertInfo(
                    expert.name, str(ref), url, ref.revision, adapter.get("r"), adapter.get("lora_alpha"), targets
                )
            )
        else:
            shown = local_label(expert.local_dir or ref.path)
            infos.append(
                ExpertInfo(expert.name, shown, None, None, adapter.get("r"), adapter.get("lora_alpha"), targets)
            )
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


def read_model_card(mixture: str | os.PathLike[str], *, revision: str | None = None, token: str | bool | None = None):
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


# ---------------------------------------------------------------------------------------------- loading
@dataclass
class DemoMixture:
    """A mixture ready for the demo: the model, its tokenizer, and what the page says about it."""

    model: Any
    tokenizer: Any
    name: str
    revision: str | None = None
    card: str | None = None
    examples: list[str] = field(default_factory=list)


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


def _about_repo(err: BaseException, repo_id: str) -> bool:
    """Whether a Hub HTTP error came from a request about ``repo_id`` (rather than an expert or base model)."""
    from urllib.parse import urlparse

    response = getattr(err, "response", None)
    path = urlparse(str(getattr(response, "url", "") or "")).path.rstrip("/") + "/"
    return f"/{repo_id}/" in path


def _load_error(mixture: str, revision: str | None, err: BaseException) -> InvalidMixtureError:
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HFValidationError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{mixture!r}" + (f" at revision {revision!r}" if revision else "")
    if isinstance(err, RevisionNotFoundError):
        why = f"the revision does not exist on {constants.ENDPOINT}; give a branch, tag or commit of the repo."
    elif isinstance(err, GatedRepoError):
        why = "the repo is gated; accept its conditions on the Hub and set HF_TOKEN."
    elif isinstance(err, RepositoryNotFoundError) and _about_repo(err, mixture):
        why = (
            f"no such repo on {constants.ENDPOINT} (or it is private: set HF_TOKEN). Give a Hub repo id "
            "('owner/name') or a local mixture folder."
        )
    elif isinstance(err, HFValidationError):
        why = "it is neither a local mixture folder nor a valid Hub repo id ('owner/name')."
    elif isinstance(err, LocalEntryNotFoundError):
        why = f"the Hub ({constants.ENDPOINT}) cannot be reached and the mixture is not in the local cache."
    else:  # an expert or base model repo, or a check of the mixture's files: its own message says which
        lines = [line.strip() for line in str(err).splitlines() if line.strip()]
        why = lines[0] if isinstance(err, RepositoryNotFoundError) and lines else " ".join(lines)
    return InvalidMixtureError(f"Cannot load the mixture {where}: {why}")


def load_tokenizer(
    mixture: str | os.PathLike[str], model: Any, *, revision: str | None = None, token: str | bool | None = None
):
    """The tokenizer saved with the mixture, else the base model's."""
    from transformers import AutoTokenizer

    candidates: list[tuple[str, str | None]] = [(str(mixture), revision)]
    base = getattr(model.xlora_config, "base_model", None)
    if base is not None:
        candidates.append((base.repo_id, base.revision))
    last: BaseException | None = None
    for name, rev in candidates:
        try:
            return AutoTokenizer.from_pretrained(name, revision=rev, token=token)
        except Exception as err:  # noqa: BLE001 - transformers raises many types for "no tokenizer here"
            last = err
    from .redact import redact

    names = " or ".join(repr(name) for name, _ in candidates)
    why = redact(" ".join(str(last).split()), [token])[:200]  # redacted before it is cut
    raise InvalidMixtureError(
        f"No tokenizer found in {names} ({why}). Save one next to the mixture with "
        "`tokenizer.save_pretrained(mixture_folder)`."
    )


def _demo_card() -> tuple[str, list[str]]:
    """What the page says about the embedded default mixture, and one example prompt per expert."""
    import random

    from .demo_mixture import TASKS, make_task_example

    rows = [make_task_example(task, random.Random(index)) for index, task in enumerate(TASKS)]
    table = "\n".join(f"| {r['expert']} | `{r['prompt']}` | `{r['completion']}` |" for r in rows)
    card = (
        "The embedded default mixture: a tiny Llama-style model with a character-level tokenizer, one LoRA "
        "expert per synthetic task and an X-LoRA classifier trained to route between them. It is built on "
        "your machine from a seed; nothing is downloaded. The base model reads every task format but solves "
        "none; compare its answers with the mixture's.\n\n"
        f"| expert | example prompt | answer |\n|---|---|---|\n{table}"
    )
    return card, [r["prompt"] for r in rows]


def load_demo(
    mixture: str | os.PathLike[str] | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
) -> DemoMixture:
    """Load a mixture (Hub repo id or local folder; ``None``: the embedded default mixture) and its tokenizer.

    Every failure to find the mixture is an :class:`~xlora_hub.errors.InvalidMixtureError` whose one-line
    message names the mixture and the fix, so a Space or the CLI fails at start, not at the first request.
    """
    if mixture is None:
        from .demo_mixture import load_demo_mixture

        model, tokenizer = load_demo_mixture()
        card, examples = _demo_card()
        return DemoMixture(
            model=model, tokenizer=tokenizer, name="the embedded default mixture", card=card, examples=examples
        )
    from .model import XLoraModel

    name = str(mixture)
    try:
        model = XLoraModel.from_pretrained(name, revision=revision, token=token)
    except XLoraHubError as err:
        raise _load_error(name, revision, err) from err
    except Exception as err:
        from huggingface_hub.errors import HfHubHTTPError, HFValidationError

        if isinstance(err, (HfHubHTTPError, HFValidationError, OSError, ValueError)):
            raise _load_error(name, revision, err) from err
        raise
    tokenizer = load_tokenizer(name, model, revision=revision, token=token)
    card = read_model_card(name, revision=revision, token=token)
    return DemoMixture(model=model, tokenizer=tokenizer, name=name, revision=revision, card=card)


def spaces_app_dir() -> Path:
    """The folder holding ``app.py``: the repo's ``spaces_app/``, or a published Space's root (where this
    package is vendored next to ``app.py``)."""
    package_parent = Path(__file__).resolve().parent.parent
    candidates = [package_parent / "spaces_app", package_parent]
    spec = importlib.util.find_spec("spaces_app")  # installed next to the package (see pyproject.toml)
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(location) for location in spec.submodule_search_locations]
    for candidate in candidates:
        if (candidate / "app.py").is_file() and (candidate / "requirements.txt").is_file():
            return candidate
    raise FileNotFoundError(
        f"The Space app (spaces_app/app.py) was not found next to the xlora_hub package in {package_parent}; "
        "run from a source checkout of xlora-hub."
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
):
    """Run the Space app locally on a mixture (``None``: the embedded default mixture); blocks until stopped
    unless ``prevent_thread_lock``. Returns the launched ``gr.Blocks``. Loading errors are
    :class:`~xlora_hub.errors.InvalidMixtureError` with a one-line message."""
    app = load_app_module()
    return app.serve(
        mixture,
        revision=revision,
        token=token,
        port=port,
        share=share,
        server_name=server_name,
        prevent_thread_lock=prevent_thread_lock,
    )


# ---------------------------------------------------------------------------------------------- publishing
def _hub_repo_ids(config: XLoraConfig) -> list[str]:
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    ids = [ref.repo_id for ref in config.experts.values() if ref.repo_id]
    base = config.base_model
    if base is not None and not _looks_local(base.repo_id):
        try:
            validate_repo_id(base.repo_id)
            ids.append(base.repo_id)
        except HFValidationError:
            pass
    return list(dict.fromkeys(ids))


def _check_hardware(hardware: str | None) -> None:
    if hardware is None:
        return
    from huggingface_hub import SpaceHardware

    allowed = [h.value for h in SpaceHardware]
    if hardware not in allowed:
        raise InvalidConfigError(f"Unknown Space hardware {hardware!r}; choose one of: {', '.join(allowed)}.")


def _space_readme(
    template: Path,
    *,
    mixture_repo: str,
    sha: str,
    revision: str | None,
    config: XLoraConfig,
    mixture_card: str | None,
    title: str | None,
    hardware: str | None,
    private_mixture: bool,
) -> str:
    import gradio
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(template)
    data = card.data
    data.title = (title or f"X-LoRA {mixture_repo.split('/')[-1]}")[:60]
    data.sdk = "gradio"
    data.sdk_version = gradio.__version__
    data.app_file = "app.py"
    data.models = [mixture_repo, *_hub_repo_ids(config)]
    data.short_description = f"X-LoRA mixture {mixture_repo}: routing per token"[:60]
    if hardware:
        data.suggested_hardware = hardware
    rows = []
    for name, ref in config.experts.items():
        if ref.repo_id:
            revision_shown = ref.revision or "main"
            link = hub_url(ref.repo_id, revision=revision_shown, subfolder=ref.subfolder)
            rows.append(f"| {name} | [{ref.repo_id}]({link}) | `{revision_shown}` |")
        else:
            rows.append(f"| {name} | bundled: `{ref.path}` | (in the mixture repo) |")
    mixture_link = hub_url(mixture_repo, revision=sha)
    summary = model_card_summary(mixture_card, max_chars=800)
    head = (
        f"# {data.title}\n\n"
        f"Serves the X-LoRA mixture [{mixture_repo}]({mixture_link}), pinned to commit `{sha}`"
        + (f" (published from revision `{revision}`)" if revision and revision != sha else "")
        + ".\n\n"
        + (
            "The mixture is private: add a read token as the Space secret `HF_TOKEN` so the app can load it.\n\n"
            if private_mixture
            else ""
        )
        + "| expert | repo | revision |\n|---|---|---|\n"
        + "\n".join(rows)
        + "\n\n"
        + (f"## About the mixture\n\n{summary}\n\n" if summary else "")
    )
    card.text = head + card.text.lstrip()
    return str(card)


def _vendor_package(target: Path) -> None:
    source = Path(__file__).resolve().parent
    for path in sorted(source.rglob("*.py")):
        if "__pycache__" in path.parts:
            continue
        dest = target / "xlora_hub" / path.relative_to(source)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)


def build_space_folder(
    mixture_repo: str,
    folder: str | os.PathLike[str],
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    hardware: str | None = None,
    title: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a complete Space for a Hub mixture into ``folder`` (replaced as a whole, never half-written).

    A ``folder`` that already holds files is refused unless ``overwrite=True`` (then the whole folder is
    replaced); checked before anything is downloaded.

    The Space holds ``app.py``, ``requirements.txt``, a ``README.md`` whose front matter lists the mixture,
    its experts and base model under ``models:``, ``xlora_space.json`` pinning the mixture to the commit
    that ``revision`` resolves to now, and a copy of this package so it runs the code it was published with.
    """
    if _looks_local(str(mixture_repo)):
        raise InvalidConfigError(
            f"A Space serves a mixture from the Hub, but {mixture_repo!r} is a local folder: push it first "
            "(`model.push_to_hub(repo_id)`) and publish the Space for that repo id."
        )
    _check_hardware(hardware)
    target = prepare_target(folder, overwrite=overwrite, what="Space folder")
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        info = HfApi(token=token).model_info(mixture_repo, revision=revision)
        sha = info.sha
        config = XLoraConfig.load(hf_hub_download(mixture_repo, CONFIG_NAME, revision=sha, token=token))
    except (HfHubHTTPError, HFValidationError) as err:
        raise _load_error(mixture_repo, revision, err) from err
    card = read_model_card(mixture_repo, revision=sha, token=token)
    app_dir = spaces_app_dir()

    with staging_folder(target) as staging:
        shutil.copyfile(app_dir / "app.py", staging / "app.py")
        shutil.copyfile(app_dir / "requirements.txt", staging / "requirements.txt")
        readme = _space_readme(
            app_dir / "README.md",
            mixture_repo=mixture_repo,
            sha=sha,
            revision=revision,
            config=config,
            mixture_card=card,
            private_mixture=bool(info.private),
            title=title,
            hardware=hardware,
        )
        (staging / "README.md").write_text(readme, encoding="utf-8")
        pinned = {"mixture": mixture_repo, "revision": sha, "requested_revision": revision or "main"}
        (staging / SPACE_CONFIG_NAME).write_text(json.dumps(pinned, indent=2) + "\n", encoding="utf-8")
        _vendor_package(staging)
        replace_folder(staging, target)
    return target


def push_space(
    mixture_repo: str,
    space_repo: str,
    *,
    private: bool | None = None,
    hardware: str | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    dry_run_dir: str | os.PathLike[str] | None = None,
    commit_message: str | None = None,
    overwrite: bool = False,
) -> str:
    """Create or update a Gradio Space serving ``mixture_repo`` pinned to the commit ``revision`` resolves to.

    Everything lands in one commit; vendored modules left from an earlier push are deleted in that same
    commit, other files someone added to the Space are kept.
    ``hardware`` is a ``huggingface_hub.SpaceHardware`` value, requested for the Space (and suggested in
    its README). With ``dry_run_dir`` the Space folder is written there and nothing is pushed. Returns the
    Space URL, or the folder for a dry run (refused when it holds files, unless ``overwrite=True``).
    """
    if dry_run_dir is not None:
        return str(
            build_space_folder(
                mixture_repo, dry_run_dir, revision=revision, token=token, hardware=hardware, overwrite=overwrite
            )
        )
    _check_hardware(hardware)
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_space_folder(
            mixture_repo, Path(tmp) / "space", revision=revision, token=token, hardware=hardware
        )
        pinned = read_json_object(folder / SPACE_CONFIG_NAME)["revision"]
        existed = api.repo_exists(space_repo, repo_type="space")
        url = api.create_repo(
            space_repo,
            repo_type="space",
            space_sdk="gradio",
            private=private,
            space_hardware=hardware,
            exist_ok=True,
        )
        if existed and private is not None:
            api.update_repo_settings(url.repo_id, private=private, repo_type="space")
        api.upload_folder(
            repo_id=url.repo_id,
            repo_type="space",
            folder_path=folder,
            commit_message=commit_message or f"Serve {mixture_repo}@{pinned[:12]}",
            delete_patterns=["xlora_hub/**"],  # vendored modules removed since the last push; other files stay
        )
        if existed and hardware:
            api.request_space_hardware(url.repo_id, hardware)
    return str(url)


__all__ = [
    "DemoMixture",
    "ExpertInfo",
    "MIXTURE_ENV",
    "REVISION_ENV",
    "SPACE_CONFIG_NAME",
    "build_space_folder",
    "dominant_experts",
    "MAX_UPLOAD_BYTES",
    "display_name",
    "expert_infos",
    "hide_local_paths",
    "hub_url",
    "launch_demo",
    "layer_view",
    "local_label",
    "load_app_module",
    "load_demo",
    "load_tokenizer",
    "model_card_summary",
    "push_space",
    "read_model_card",
    "routing_from_log",
    "space_target",
    "spaces_app_dir",
]
