"""One entry point for every format in: :func:`import_mixture` detects the format, reads it and builds the model."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..errors import InvalidConfigError
from ..model import load_mixture
from .common import FORMAT_PEFT, FORMAT_XLORA_HUB, LoadOptions, build
from .detect import source_folder
from .original import read_original
from .peft_format import read_peft
from .softmax_topk import warn_softmax_topk_change

if TYPE_CHECKING:
    from ..model import XLoraModel


def import_mixture(
    source: str | os.PathLike[str],
    *,
    base_model: nn.Module | None = None,
    adapters: Mapping[str, str] | Sequence[str] | None = None,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    local_files_only: bool = False,
    force_download: bool = False,
    torch_dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    accept_softmax_topk_change: bool = False,
) -> XLoraModel:
    """Load an X-LoRA checkpoint in any known format (folder or Hub repo) as an :class:`XLoraModel`.

    ``adapters`` overrides where the experts are (name -> folder or Hub repo), for checkpoints whose
    recorded locations no longer exist. Save the result with ``model.save_pretrained`` or ``push_to_hub``.
    An original xlora checkpoint with ``enable_softmax_topk`` is refused unless ``accept_softmax_topk_change=True``
    (the original computes that softmax batch-wide; the mixture computes it per token, and a warning says by how
    much the logits change on a sample batch).
    """
    options = LoadOptions(
        token=token,
        cache_dir=cache_dir,
        local_files_only=local_files_only,
        force_download=force_download,
        torch_dtype=torch_dtype,
        device=device,
    )
    folder, fmt = source_folder(source, revision=revision, options=options)
    if fmt == FORMAT_XLORA_HUB:
        if adapters is not None:
            raise InvalidConfigError("`adapters=` only applies to peft and original xlora checkpoints.")
        at_hub = folder is None  # an xlora-hub repo: load_mixture fetches it (at `revision`) itself
        return load_mixture(
            source if at_hub else folder,
            base_model=base_model,
            revision=revision if at_hub else None,
            **options.kwargs(),
        )
    assert folder is not None
    from_hub = not Path(os.fspath(source)).expanduser().is_dir()  # a snapshot in the cache, written by a stranger
    if fmt == FORMAT_PEFT:
        return build(read_peft(folder, adapters, from_hub=from_hub), base_model=base_model, options=options)
    foreign = read_original(folder, adapters, from_hub=from_hub, accept_softmax_topk_change=accept_softmax_topk_change)
    model = build(foreign, base_model=base_model, options=options)
    warn_softmax_topk_change(model, what=foreign.what)
    return model
