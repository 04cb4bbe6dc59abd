"""What every export shares: the guarded folder writer, the experts' files, JSON and safetensors as written.

Both writers (:func:`~xlora_hub.convert.export_peft`, :func:`~xlora_hub.convert.export_mistralrs`) fill a staging
folder through :func:`write_export`, so a folder holding files is replaced only when asked, and whole.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from ..hub import write_expert_files
from ..staging import prepare_target, replace_folder, staging_folder

if TYPE_CHECKING:
    from ..model import XLoraModel


def write_json(path: Path, data: Mapping[str, Any]) -> None:
    """A config file as every export writes it: indented JSON with a final newline, UTF-8."""
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def save_tensors(state: Mapping[str, torch.Tensor], path: Path) -> None:
    """Tensors to a safetensors file, as CPU contiguous copies, tagged ``format: pt`` as peft and transformers do."""
    save_file({k: v.detach().to("cpu").contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})


def write_experts(model: XLoraModel, folder: Path, names: Mapping[str, str]) -> None:
    """Each expert's files into ``folder/<names[expert]>`` (the trained factors when the experts were trained)."""
    trained = model.xlora_config.use_trainable_adapters
    for expert in model.experts:
        write_expert_files(model, expert, folder / names[expert.name], from_model=trained)


def write_export(
    save_directory: str | os.PathLike[str], writer: Callable[[Path, Path], None], *, overwrite: bool
) -> Path:
    """Write an export through the one guarded folder writer: a folder holding files is replaced as a whole only
    with ``overwrite=True``, and a kill at any point leaves the old or the new folder (:mod:`xlora_hub.staging`).
    ``writer(tmp, final)`` fills the staging folder ``tmp``; ``final`` is where it will end up."""
    target = prepare_target(save_directory, overwrite=overwrite, what="Export folder")
    with staging_folder(target) as tmp:
        writer(tmp, target.resolve())
        replace_folder(tmp, target)
    return target
