"""Publishing a mixture as a Gradio Space: the Space folder (app, README, requirements, a copy of this
package, the pinned mixture) and one commit that uploads it.

A pushed Space carries a copy of ``xlora_hub`` next to ``app.py`` and ``xlora_space.json`` naming the mixture
and the commit it is pinned to, so it runs the exact code and weights it was published with. Its
``requirements.txt`` is written from this package's own metadata (its dependencies and the ``demo`` extra),
so it cannot drift from ``pyproject.toml``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path

from ..config import CONFIG_NAME, XLoraConfig
from ..errors import InvalidConfigError
from ..jsonfile import read_json_object
from ..refs import hub_url, is_local_argument, is_stored_hub_id
from ..staging import prepare_target, replace_folder, staging_folder
from .launch import spaces_app_dir
from .load import load_error
from .page import model_card_summary, read_model_card
from .target import SPACE_CONFIG_NAME

__all__ = ["PRELOAD_SUFFIXES", "SPACE_FILES", "build_space_folder", "preload_lines", "push_space", "space_requirements"]

SPACE_FILES = ("app.py", "requirements.txt", "README.md")
DISTRIBUTION = "xlora-hub"
SPACE_EXTRA = "demo"
_SDK_PACKAGES = frozenset({"gradio"})  # the Space's `sdk_version` installs it; pinning it twice can clash
PRELOAD_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".tiktoken", ".jinja")
"""The files a Space preloads from each repo (configs, safetensors weights, tokenizer files): what the app reads.
Other weight formats (``.bin``, ``.gguf``...) are never loaded (safetensors only), so they are not preloaded."""


def space_requirements() -> str:
    """``requirements.txt`` for a Space: the installed xlora-hub's dependencies plus its ``demo`` extra
    (gradio left out: the README's ``sdk_version`` picks it), read from the package metadata."""
    from packaging.requirements import Requirement

    try:
        declared = metadata.requires(DISTRIBUTION) or []
    except metadata.PackageNotFoundError:
        raise InvalidConfigError(
            f"Publishing a Space needs the {DISTRIBUTION} package installed (its metadata gives the Space's "
            "requirements.txt): run `pip install -e .` in the source checkout."
        ) from None
    lines = []
    for text in declared:
        req = Requirement(text)
        if req.marker is not None and not req.marker.evaluate({"extra": SPACE_EXTRA}):
            continue  # another extra (train, test)
        if req.name.lower() in _SDK_PACKAGES:
            continue
        lines.append(f"{req.name}{req.specifier}")
    head = (
        "# Written by `xlora-hub space push` from the xlora-hub package metadata (dependencies + the demo extra).\n"
        "# Gradio itself comes from `sdk_version` in README.md; xlora_hub/ next to app.py is the package itself.\n"
    )
    return head + "\n".join(lines) + "\n"


def _hub_repo_ids(config: XLoraConfig) -> list[str]:
    """The Hub repos a mixture's Space uses besides the mixture: its Hub experts and its base model."""
    ids = [ref.repo_id for ref in config.experts.values() if ref.repo_id]
    base = config.base_model
    if base is not None and is_stored_hub_id(base.repo_id):
        ids.append(base.repo_id)
    return list(dict.fromkeys(ids))


def _preload_files(files: list[str], subfolder: str | None) -> list[str]:
    """The files of a repo worth preloading: configs, safetensors and tokenizer files (under ``subfolder``).

    A name with a space or a comma cannot be written in a ``preload_from_hub`` line; such a file is left to be
    downloaded at start.
    """
    prefix = f"{subfolder.strip('/')}/" if subfolder else ""
    return [
        name
        for name in sorted(files)
        if name.startswith(prefix)
        and (name.endswith(PRELOAD_SUFFIXES) or name.rsplit("/", 1)[-1] == "README.md")
        and not any(c in name for c in " ,\t\n")
    ]


def _preload_line(api, repo_id: str, revision: str | None, *, subfolder: str | None = None) -> str | None:
    """One ``preload_from_hub`` entry: ``REPO FILE1,FILE2,... COMMIT``, the commit ``revision`` resolves to now.

    The Hub downloads these files into the Space's cache at build time, at that commit, so the app's
    downloads at start (the same files, at the same pinned commit) are cache hits. ``None`` when nothing
    in the repo is worth preloading.
    """
    sha = api.model_info(repo_id, revision=revision).sha
    files = _preload_files(api.list_repo_files(repo_id, revision=sha), subfolder)
    return f"{repo_id} {','.join(files)} {sha}" if files else None


def preload_lines(api, mixture_repo: str, sha: str, config: XLoraConfig) -> list[str]:
    """``preload_from_hub`` for a Space serving ``mixture_repo`` at ``sha``: the mixture, each Hub expert at its
    pinned revision, and the Hub base model at its recorded revision, each pinned to a commit."""
    lines = [_preload_line(api, mixture_repo, sha)]
    for ref in config.experts.values():
        if ref.repo_id:
            lines.append(_preload_line(api, ref.repo_id, ref.revision, subfolder=ref.subfolder))
    base = config.base_model
    if base is not None and is_stored_hub_id(base.repo_id):
        lines.append(_preload_line(api, base.repo_id, base.revision))
    return list(dict.fromkeys(line for line in lines if line))


def check_hardware(hardware: str | None) -> None:
    """Refuse a hardware name ``huggingface_hub.SpaceHardware`` does not know, listing the ones it does."""
    if hardware is None:
        return
    from huggingface_hub import SpaceHardware

    allowed = [h.value for h in SpaceHardware]
    if hardware not in allowed:
        raise InvalidConfigError(f"Unknown Space hardware {hardware!r}; choose one of: {', '.join(allowed)}.")


def _experts_table(config: XLoraConfig) -> str:
    """The README's table of experts: each Hub expert linked at its pinned revision, bundled ones by path."""
    rows = ["| expert | repo | revision |", "|---|---|---|"]
    for name, ref in config.experts.items():
        if ref.repo_id:
            revision_shown = ref.revision or "main"
            link = hub_url(ref.repo_id, revision=revision_shown, subfolder=ref.subfolder)
            rows.append(f"| {name} | [{ref.repo_id}]({link}) | `{revision_shown}` |")
        else:
            rows.append(f"| {name} | bundled: `{ref.path}` | (in the mixture repo) |")
    return "\n".join(rows)


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
    preload: list[str],
) -> str:
    """The Space's README: the template's text under a head naming the pinned mixture and its experts, and
    front matter whose ``models:`` lists every Hub repo the Space loads and whose ``preload_from_hub:`` has
    each of them downloaded at build time, pinned to a commit."""
    import gradio
    from huggingface_hub import SpaceCard

    card = SpaceCard.load(template)
    data = card.data
    data.title = (title or f"X-LoRA {mixture_repo.split('/')[-1]}")[:60]
    data.sdk = "gradio"
    data.sdk_version = gradio.__version__
    data.app_file = "app.py"
    data.models = [mixture_repo, *_hub_repo_ids(config)]
    data.preload_from_hub = preload
    data.short_description = f"X-LoRA mixture {mixture_repo}: routing per token"[:60]
    if hardware:
        data.suggested_hardware = hardware
    summary = model_card_summary(mixture_card, max_chars=800)
    head = (
        f"# {data.title}\n\n"
        f"Serves the X-LoRA mixture [{mixture_repo}]({hub_url(mixture_repo, revision=sha)}), pinned to commit `{sha}`"
        + (f" (published from revision `{revision}`)" if revision and revision != sha else "")
        + ".\n\n"
        + (
            "The mixture is private: add a read token as the Space secret `HF_TOKEN` so the app can load it.\n\n"
            if private_mixture
            else ""
        )
        + _experts_table(config)
        + "\n\n"
        + (f"## About the mixture\n\n{summary}\n\n" if summary else "")
    )
    card.text = head + card.text.lstrip()
    return str(card)


def _vendor_package(target: Path) -> None:
    """Copy this package's modules (``*.py`` only) into ``target/xlora_hub``: the Space runs this code."""
    source = Path(__file__).resolve().parent.parent
    for path in sorted(source.rglob("*.py")):
        relative = path.relative_to(source)
        if "__pycache__" in relative.parts or relative.parts[:2] == ("space", "app_files"):
            continue
        dest = target / "xlora_hub" / relative
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, dest)


def _pinned_mixture(mixture_repo: str, revision: str | None, token: str | bool | None):
    """``(commit sha, config, private?)`` of the mixture at ``revision`` now, or a one-line loading error."""
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        info = HfApi(token=token).model_info(mixture_repo, revision=revision)
        config = XLoraConfig.load(hf_hub_download(mixture_repo, CONFIG_NAME, revision=info.sha, token=token))
    except (HfHubHTTPError, HFValidationError) as err:  # the mixture's own config errors keep their type
        raise load_error(mixture_repo, revision, err, token=token) or err from err
    return info.sha, config, bool(info.private)


def _preload_for(mixture_repo: str, sha: str, config: XLoraConfig, *, token: str | bool | None) -> list[str]:
    """:func:`preload_lines`, with a Hub error about an expert or the base model worded as the Space's load error."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    try:
        return preload_lines(HfApi(token=token), mixture_repo, sha, config)
    except (HfHubHTTPError, HFValidationError) as err:
        raise load_error(mixture_repo, sha, err, token=token) or err from err


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

    The Space holds ``app.py``, ``requirements.txt`` (from this package's metadata), a ``README.md`` whose
    front matter lists the mixture, its experts and base model under ``models:`` and ``preload_from_hub:``
    (each pinned to a commit), ``xlora_space.json``
    pinning the mixture to the commit that ``revision`` resolves to now, and a copy of this package so it
    runs the code it was published with.
    """
    if is_local_argument(str(mixture_repo)):
        raise InvalidConfigError(
            f"A Space serves a mixture from the Hub, but {mixture_repo!r} is a local folder: push it first "
            "(`model.push_to_hub(repo_id)`) and publish the Space for that repo id."
        )
    check_hardware(hardware)
    target = prepare_target(folder, overwrite=overwrite, what="Space folder")
    sha, config, private = _pinned_mixture(mixture_repo, revision, token)
    card = read_model_card(mixture_repo, revision=sha, token=token)
    preload = _preload_for(mixture_repo, sha, config, token=token)
    app_dir = spaces_app_dir()
    readme = _space_readme(
        app_dir / "README.md",
        mixture_repo=mixture_repo,
        sha=sha,
        revision=revision,
        config=config,
        mixture_card=card,
        private_mixture=private,
        title=title,
        hardware=hardware,
        preload=preload,
    )
    pinned = {"mixture": mixture_repo, "revision": sha, "requested_revision": revision or "main"}
    with staging_folder(target) as staging:
        shutil.copyfile(app_dir / "app.py", staging / "app.py")
        (staging / "requirements.txt").write_text(space_requirements(), encoding="utf-8")
        (staging / "README.md").write_text(readme, encoding="utf-8")
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
    check_hardware(hardware)
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
