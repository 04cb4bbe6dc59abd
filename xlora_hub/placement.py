"""Where a base model's weights sit: device and dtype moves, and bases that accelerate placed with offloading.

Kept apart from the building steps because placement is its own set of rules: a quantized base is never cast,
a base with layers offloaded to "cpu" or "disk" keeps its placement when peft adds the experts (peft
re-dispatches it), and the classifier goes where the last hidden state comes out. Nothing here knows about
experts or the mixture config.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .errors import InvalidConfigError
from .quantization import compute_dtype, describe_quantization


def move_base_model(model: nn.Module, *, device: torch.device | str | None, torch_dtype: torch.dtype | None) -> None:
    """``model.to(device, dtype)`` for the arguments given; a quantized base is never cast to another dtype."""
    if torch_dtype is not None and describe_quantization(model) is not None:
        if torch_dtype == compute_dtype(model):
            torch_dtype = None
        else:
            raise InvalidConfigError(
                f"The base model is quantized ({describe_quantization(model)}) and cannot be cast to {torch_dtype}: "
                "choose its compute dtype when loading it (`dtype=` in transformers' `from_pretrained`, or "
                "`bnb_4bit_compute_dtype`), and leave `torch_dtype` unset here."
            )
    kwargs = {k: v for k, v in (("device", device), ("dtype", torch_dtype)) if v is not None}
    if kwargs:
        model.to(**kwargs)


def hidden_state_device(model: nn.Module) -> torch.device:
    """Where the last hidden state comes out, for the classifier: the execution device of the layer reading it
    (the output embeddings) under accelerate, else the device of the first real (not offloaded) weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hook = getattr(head, "_hf_hook", None) if head is not None else None
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for param in model.parameters():
        if not param.is_meta:
            return param.device
    return torch.device("cpu")


def _known_offload_folder(model: nn.Module) -> str | None:
    """The folder accelerate offloaded ``model``'s disk layers to (read from its hooks' weights maps), if any."""
    dataset = next(
        (
            getattr(getattr(module._hf_hook, "weights_map", None), "dataset", None)
            for module in model.modules()
            if getattr(getattr(getattr(module, "_hf_hook", None), "weights_map", None), "dataset", None)
        ),
        None,
    )
    return getattr(dataset, "save_folder", None)


def offload_kwargs(
    model: nn.Module,
    *,
    device_map: str | dict[str, Any] | None,
    max_memory: dict[Any, Any] | None,
    offload_folder: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """peft's loading arguments for a base accelerate placed with offloaded layers (nothing for other bases).

    peft re-dispatches such a base with each adapter; without its map and offload folder it moves the
    offloaded (meta) weights and fails ("Cannot copy out of meta tensor").
    """
    placement = getattr(model, "hf_device_map", None)
    if not placement or not {"cpu", "disk"} & {str(v) for v in placement.values()}:
        return {}
    if device_map is None:  # peft dispatches the PeftModel, whose modules sit under "base_model.model."
        device_map = {f"base_model.model.{name}" if name else "base_model.model": d for name, d in placement.items()}
    if offload_folder is None:
        offload_folder = _known_offload_folder(model)
    if offload_folder is None and "disk" in {str(v) for v in placement.values()}:
        raise InvalidConfigError(
            "The base model has layers offloaded to disk but no offload folder is known; pass `offload_folder=` "
            "(the folder peft may write the offloaded layers with their experts to)."
        )
    kwargs: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    return kwargs


@contextlib.contextmanager
def peft_writes_inside(offload: Mapping[str, Any] | None) -> Iterator[os.PathLike[str] | None]:
    """Run peft's loading from a folder inside the offload folder, when it re-dispatches a disk-offloaded base.

    peft rewrites each offloaded checkpoint shard with the experts' tensors to the shard's path with its
    leading "/" dropped, i.e. relative to the working directory (from "/" it would overwrite the base's own
    checkpoint). Started from ``<offload_folder>/peft-offload`` its writes stay in the offload folder. The
    working directory is the process's: do not load models from other threads meanwhile.
    """
    folder = (offload or {}).get("offload_folder")
    if folder is None:
        yield None
        return
    stage = Path(folder).resolve() / "peft-offload"
    stage.mkdir(parents=True, exist_ok=True)
    previous = os.getcwd()
    os.chdir(stage)
    try:
        yield stage
    finally:
        os.chdir(previous)


def absolute_offload_paths(model: nn.Module, stage: os.PathLike[str]) -> None:
    """Make the shard paths peft recorded relative to ``stage`` (see :func:`peft_writes_inside`) absolute."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for single in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            weights = getattr(single, "weights_map", None)
            index = getattr(getattr(weights, "dataset", weights), "index", None)
            for info in (index or {}).values():
                path = info.get("safetensors_file") if isinstance(info, dict) else None
                if path and not os.path.isabs(path):
                    info["safetensors_file"] = os.path.join(os.fspath(stage), path)


__all__ = ["absolute_offload_paths", "hidden_state_device", "move_base_model", "offload_kwargs", "peft_writes_inside"]
