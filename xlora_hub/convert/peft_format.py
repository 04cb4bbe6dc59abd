"""peft's X-LoRA format, in and out: ``adapter_config.json`` with ``peft_type: XLORA`` and the classifier under
``...internal_xlora_classifier.layers.*`` in ``adapter_model.safetensors``.

The experts are the values of its ``adapters``; the numbered ``0/``, ``1/`` folders peft writes are not usable
experts and are ignored. peft >= 0.20 writes an empty or partial classifier file: that is detected and reported,
never loaded, and :func:`save_peft_classifier` is the workaround.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import InvalidConfigError, InvalidMixtureError, UnsupportedFormatError
from ..hub import ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME
from .common import (
    SHARED_SETTINGS,
    ForeignCheckpoint,
    classifier_linear_names,
    foreign_config,
    load_classifier_tensors,
    read_json,
    shared_settings,
)
from .detect import checkpoint_experts
from .writing import save_tensors, write_experts, write_export, write_json

if TYPE_CHECKING:
    from ..model import XLoraModel

logger = logging.getLogger(__name__)

PEFT_CLASSIFIER_MARKER = "internal_xlora_classifier."
PEFT_CLASSIFIER_PREFIX = "base_model.internal_xlora_classifier."


# ---------------------------------------------------------------------------------------------- reading
def read_peft(folder: Path, adapters: Any, *, from_hub: bool = False) -> ForeignCheckpoint:
    """A peft X-LoRA checkpoint folder; ``adapters`` (the caller's) overrides the experts' recorded locations."""
    what = f"peft X-LoRA checkpoint {folder}"
    raw = read_json(folder / ADAPTER_CONFIG_NAME, what=what)
    if "hidden_size" not in raw:
        raise InvalidConfigError(f"{what}: {ADAPTER_CONFIG_NAME} has no `hidden_size`.")
    experts = checkpoint_experts(raw, adapters, folder, what=what, subfolders=False, from_hub=from_hub)
    settings = shared_settings(raw)
    if settings.get("scaling_pass_value") is None:
        settings.pop("scaling_pass_value", None)
    config = foreign_config(raw, experts, base_model=raw.get("base_model_name_or_path"), settings=settings, what=what)
    if config.use_trainable_adapters:
        logger.warning(
            "%s was trained with use_trainable_adapters=True; peft keeps the trained experts only in its numbered "
            "folders, which are not usable experts, so the original experts are imported.",
            what,
        )
    tensors = _peft_classifier_tensors(folder, what=what)
    names = classifier_linear_names(config)
    expected = [f"{n}.{p}" for n in names for p in ("weight", "bias")]
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise UnsupportedFormatError(
            f"{what}: {ADAPTER_WEIGHTS_NAME} holds {len([k for k in expected if k in tensors])} of the {len(expected)} "
            f"classifier tensors (missing {missing}). peft >= 0.20 writes an empty or partial X-LoRA classifier file "
            "when saving, so this checkpoint lost its trained classifier and loading it would route at random. "
            "Re-save the classifier from the live peft model with `xlora_hub.convert.save_peft_classifier(peft_model, "
            "folder)` and import again."
        )
    return ForeignCheckpoint(config, [(tensors[f"{n}.weight"], tensors[f"{n}.bias"]) for n in names], what)


def _peft_classifier_tensors(folder: Path, *, what: str) -> dict[str, torch.Tensor]:
    """The classifier's tensors of ``adapter_model.safetensors``, named as in our classifier (``layers.N.*``)."""
    state = load_classifier_tensors(folder / ADAPTER_WEIGHTS_NAME, what=what)
    return {k.split(PEFT_CLASSIFIER_MARKER, 1)[1]: v for k, v in state.items() if PEFT_CLASSIFIER_MARKER in k}


# ---------------------------------------------------------------------------------------------- writing
def _save_classifier(classifier: nn.Module, path: Path) -> None:
    """A classifier's state under the keys peft loads it from (``base_model.internal_xlora_classifier.*``)."""
    save_tensors({PEFT_CLASSIFIER_PREFIX + k: v for k, v in classifier.state_dict().items()}, path)


def save_peft_classifier(peft_model: nn.Module, save_directory: str | os.PathLike[str]) -> Path:
    """Write the complete classifier of a live peft X-LoRA model into ``adapter_model.safetensors``.

    The workaround for peft >= 0.20, whose ``save_pretrained`` writes an empty or partial classifier file:
    call it after ``peft_model.save_pretrained(save_directory)``. peft itself loads the result.
    """
    classifier = getattr(getattr(peft_model, "base_model", peft_model), "internal_xlora_classifier", None)
    if classifier is None:
        raise InvalidMixtureError(f"{type(peft_model).__name__} is not a peft X-LoRA model (no internal classifier).")
    path = Path(save_directory) / ADAPTER_WEIGHTS_NAME
    tmp = path.with_name(path.name + ".tmp")
    _save_classifier(classifier, tmp)
    os.replace(tmp, path)
    return path


def _adapter_config(model: XLoraModel, final: Path) -> dict[str, Any]:
    """peft's ``adapter_config.json`` for the mixture, its experts at ``final/<name>``."""
    import peft

    config = model.xlora_config
    first = model.peft_model.peft_config[model.expert_names[0]] if model.peft_model is not None else None
    task_type = getattr(first, "task_type", None) or "CAUSAL_LM"
    settings = {k: getattr(config, k) for k in SHARED_SETTINGS}
    settings["scaling_pass_value"] = config.resolved_scaling_pass_value()
    return {
        "peft_type": "XLORA",
        "task_type": str(getattr(task_type, "value", task_type)),
        "base_model_name_or_path": config.base_model.repo_id if config.base_model else None,
        "revision": config.base_model.revision if config.base_model else None,
        "inference_mode": True,
        "hidden_size": config.hidden_size,
        "adapters": {str(i): str(final / name) for i, name in enumerate(model.expert_names)},
        **settings,
        "peft_version": peft.__version__,
    }


def export_peft(model: XLoraModel, save_directory: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Write the mixture in peft's X-LoRA format, the experts copied into ``<name>/``.

    A ``save_directory`` that already holds files is refused unless ``overwrite=True`` (it is then replaced whole).

    ``PeftModel.from_pretrained(base_model, save_directory)`` loads it. peft needs the ``adapters`` keys to be
    ``"0"``..``"n-1"`` and reads the experts from the absolute paths in their values (pass ``adapters=`` to peft if
    the folder moves); :func:`~xlora_hub.convert.import_mixture` takes the expert names back from the folder names.
    """

    def write(tmp: Path, final: Path) -> None:
        write_experts(model, tmp, {name: name for name in model.expert_names})
        write_json(tmp / ADAPTER_CONFIG_NAME, _adapter_config(model, final))
        _save_classifier(model.classifier, tmp / ADAPTER_WEIGHTS_NAME)

    return write_export(save_directory, write, overwrite=overwrite)
