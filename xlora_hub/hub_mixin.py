"""The Hub methods of :class:`~xlora_hub.model.XLoraModel`: ``from_pretrained``, ``save_pretrained``, ``push_to_hub``.

The ``huggingface_hub.ModelHubMixin`` shape: typed, keyword-only options with ``Args:`` docstrings, the files
left to :mod:`xlora_hub.hub` (which never imports the model), and the model built here by the class itself
(``from_pretrained`` calls :func:`~xlora_hub.hub.open_mixture` once, then ``cls.from_experts``). Kept apart
from ``model.py`` so the model module holds the two passes and the control API only.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .evidence import compute_evidence
from .hub import (
    check_collection_title,
    clear_connection_errors,
    open_mixture,
    push_mixture,
    save_mixture,
    warn_on_base_mismatch,
)

if TYPE_CHECKING:
    from pathlib import Path

    from huggingface_hub import CommitInfo
    from typing_extensions import Self

__all__ = ["XLoraHubMixin"]


class XLoraHubMixin:
    """Mixture repos for :class:`~xlora_hub.model.XLoraModel` (see docs/format.md)."""

    def save_pretrained(
        self, save_directory: str | os.PathLike[str], *, bundle_experts: bool = False, overwrite: bool = True
    ) -> Path:
        """Save the mixture in a local folder: config, classifier, model card, and the experts that live nowhere else.

        Hub experts stay references to their repos; local-folder experts are copied into ``experts/<name>/``
        and trained experts (``use_trainable_adapters``) are exported with peft, so a saved mixture never
        points at an absolute path. The new folder is written beside the target and swapped in whole.

        Args:
            save_directory (`str` or `os.PathLike`):
                The mixture folder to write (created if needed).
            bundle_experts (`bool`, *optional*, defaults to `False`):
                Copy the Hub experts into the folder too, for a self-contained mixture.
            overwrite (`bool`, *optional*, defaults to `True`):
                Replace a mixture already in the folder (its other files are kept), as transformers does;
                `False` refuses any folder that is not empty.

        Returns:
            `Path`: the mixture folder.
        """
        return save_mixture(self, save_directory, bundle_experts=bundle_experts, overwrite=overwrite)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        branch: str | None = None,
        create_pr: bool = False,
        bundle_experts: bool = False,
        push_local_experts: bool = False,
        revision: str | None = None,
        base_model: str | None = None,
        eval_dataset: str | os.PathLike[str] | Any = None,
        eval_tokenizer: Any = None,
        eval_plots: bool = True,
        collection: str | None = None,
    ) -> CommitInfo:
        """Push the mixture to a Hub repo in one commit, each Hub expert (and the base model) pinned to a commit.

        The repo is created if needed; its id is the one the Hub returns (a name without a namespace lands in
        the token's user namespace). Experts that exist only as local folders must be bundled or pushed to
        their own repos, else nothing is pushed; trained experts are always bundled.

        Args:
            repo_id (`str`):
                The mixture repo, `owner/name` or `name`.
            private (`bool`, *optional*):
                Whether a repo created here (the mixture's, and the experts' with `push_local_experts`) is private.
            token (`str` or `bool`, *optional*):
                The Hub token; `None` uses the saved login.
            commit_message (`str`, *optional*):
                The commit message (default: "Upload X-LoRA mixture of N experts (xlora-hub)").
            branch (`str`, *optional*):
                The branch to push to (created if needed); default the main branch.
            create_pr (`bool`, *optional*, defaults to `False`):
                Open a pull request instead of committing to the branch.
            bundle_experts (`bool`, *optional*, defaults to `False`):
                Copy every expert into the mixture repo's `experts/` instead of referencing it.
            push_local_experts (`bool`, *optional*, defaults to `False`):
                Push each local-folder expert to its own repo `<repo_id>-<name>` and reference it there.
            revision (`str`, *optional*):
                An alias of `branch`.
            base_model (`str`, *optional*):
                The Hub repo id to record as the base model (for a mixture made on a local copy of it); a local
                base model folder is never published.
            eval_dataset (`str`, `os.PathLike`, `datasets.Dataset` or list of dicts, *optional*):
                Data in the formats `train` reads; the card gets the routing evidence measured on it (per-expert
                usage, entropy, pictures) and the `model-index` the scores of the mixture, each expert alone and
                the base model (see `xlora_hub.evidence`), committed with the mixture.
            eval_tokenizer (*optional*):
                The tokenizer for `eval_dataset` (default: the base model's).
            eval_plots (`bool`, *optional*, defaults to `True`):
                Commit the heatmap and usage pictures (matplotlib: `pip install 'xlora-hub[plots]'`).
            collection (`str`, *optional*):
                The title of a Hub collection to create or update with the mixture, its experts, its base model
                and its Spaces.

        Returns:
            `huggingface_hub.CommitInfo`: the commit that was made.
        """
        if collection is not None:
            check_collection_title(collection)  # before the evaluation runs
        evidence = None
        if eval_dataset is not None:
            evidence = compute_evidence(self, eval_dataset, tokenizer=eval_tokenizer, plots=eval_plots, token=token)
        return push_mixture(
            self,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            branch=branch,
            create_pr=create_pr,
            bundle_experts=bundle_experts,
            push_local_experts=push_local_experts,
            revision=revision,
            base_model=base_model,
            evidence=evidence,
            collection=collection,
        )

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike[str],
        *,
        base_model: nn.Module | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        device_map: str | dict[str, Any] | None = None,
        max_memory: dict[Any, Any] | None = None,
        offload_folder: str | os.PathLike[str] | None = None,
        quantization_config: Any = None,
    ) -> Self:
        """Load a saved mixture (local folder or Hub repo) with its experts and, unless given, its base model.

        Checked before anything is built: the config (format version, types, bounds, paths inside the
        mixture), the classifier's shapes against the config and its values (finite); then, while building,
        each expert against the base model and the layer names against the wrapped model.

        Args:
            repo_id_or_path (`str` or `os.PathLike`):
                A mixture folder, or a Hub repo id (`owner/name`).
            base_model (`torch.nn.Module`, *optional*):
                The transformers model to build on; default the base model the mixture records (a relative path
                is taken inside the mixture folder), loaded at its recorded revision.
            revision (`str`, *optional*):
                The branch, tag or commit of a Hub mixture.
            token (`str` or `bool`, *optional*):
                The Hub token for the mixture, its experts and its base model; `None` uses the saved login.
            cache_dir (`str` or `os.PathLike`, *optional*):
                The Hub cache folder (default: the `huggingface_hub` cache).
            local_files_only (`bool`, *optional*, defaults to `False`):
                Use only files already in the cache (no network).
            force_download (`bool`, *optional*, defaults to `False`):
                Download the mixture's and experts' files again even if cached.
            torch_dtype (`torch.dtype`, *optional*):
                The dtype the base model is loaded in (or cast to, when given); the experts follow it.
            device (`torch.device` or `str`, *optional*):
                Where to move the model once built.
            device_map (`str` or `dict`, *optional*):
                Passed to transformers when it loads the base model (accelerate's placement).
            max_memory (`dict`, *optional*):
                Passed to transformers with the base model and to peft with the experts.
            offload_folder (`str` or `os.PathLike`, *optional*):
                Where transformers and peft offload weights to disk.
            quantization_config (*optional*):
                A transformers quantization config for the base model (bitsandbytes, torchao, quanto).

        Returns:
            `XLoraModel`: the mixture, in eval mode.
        """
        files = open_mixture(
            repo_id_or_path,
            base_model=base_model,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
            torch_dtype=torch_dtype,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
            quantization_config=quantization_config,
        )
        with clear_connection_errors(f"Mixture {files.label}: experts {files.config.expert_names}", token=token):
            model = cls.from_experts(
                files.base_model,
                files.config,
                device=device,
                torch_dtype=torch_dtype,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                force_download=force_download,
                base_dir=files.folder,  # bundled experts are resolved inside the mixture (origin "bundled")
                max_memory=max_memory,
                offload_folder=offload_folder,
            )
        model.classifier.load_state_dict(files.classifier_state, strict=True)
        warn_on_base_mismatch(model.experts, model.xlora_config.base_model)
        return model.eval()
