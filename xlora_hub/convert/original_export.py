"""Export to the original ``xlora`` package (EricLBuehler/xlora 0.1.0): the folder its ``save_pretrained`` writes.

``xlora.from_pretrained(folder, base, device, adapters={name: folder/name ...})`` loads it at any classifier depth:
the classifier keys are numbered by module position as the original's strict loader expects (``inner.0``,
``inner.3``...: ReLU and Dropout counted), unlike the mistral.rs export (:func:`export_mistralrs`), which numbers them
by Linear layer; up to depth 2 the two agree. Files: ``xlora_config.json`` (every field of the original's
``xLoRAConfig``, ``adapters`` as the list of names), ``xlora_classifier.safetensors`` and one peft adapter folder
per expert, ``<name>/``. peft's blank model card (``README.md``), which the original's ``save_pretrained`` also
writes, is not.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from ..config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME
from ..errors import InvalidConfigError, UnsupportedFormatError
from ..refs import loaded_base_folder, stored_base_hub_id
from .original import ORIGIN_XLORA, _original_classifier_state, _original_config
from .writing import save_tensors, write_experts, write_export, write_json

if TYPE_CHECKING:
    from ..model import XLoraModel


def _base_model_id(model: XLoraModel, base_model_id: str | None) -> str:
    """The ``base_model_id`` to write (the original's config requires one): the argument, else the mixture's Hub id.

    A local base (a path, or a bare name that is a folder of the mixture) is refused: it would be read as a Hub id.
    """
    if base_model_id:
        return base_model_id
    base = model.xlora_config.base_model
    hub_id = stored_base_hub_id(base.repo_id, loaded_from=loaded_base_folder(model.model)) if base else None
    if hub_id is None:
        where = "names no base model" if base is None else f"was built on the local folder {base.repo_id!r}"
        raise InvalidConfigError(
            f"The mixture {where}; pass `base_model_id=` (CLI: --base-model-id), the Hub id written in "
            f"{CONFIG_NAME} for the original's `load_model`."
        )
    return hub_id


def _check_softmax_topk(model: XLoraModel, *, accept: bool) -> None:
    """The original computes ``enable_softmax_topk`` batch-wide (:mod:`.softmax_topk`): refused unless accepted."""
    if model.xlora_config.enable_softmax_topk and not accept:
        raise UnsupportedFormatError(
            "The mixture uses enable_softmax_topk. The original xlora package applies that softmax over the kept "
            "scalings of the whole batch at once, not per token as xlora-hub and peft do, so it would compute other "
            "outputs. Pass accept_softmax_topk_change=True (CLI: --accept-softmax-topk-change) to export it anyway, "
            "or set enable_softmax_topk=False."
        )


def _all_biases_zero(model: XLoraModel) -> bool:
    """Every classifier bias is exactly zero (a classifier imported from ``use_bias: false``)."""
    return all(not bool(m.bias.any()) for m in model.classifier.layers if getattr(m, "bias", None) is not None)


def export_xlora(
    model: XLoraModel,
    save_directory: str | os.PathLike[str],
    *,
    base_model_id: str | None = None,
    use_bias: bool | None = None,
    accept_softmax_topk_change: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``model`` as the original ``xlora`` package's ``save_pretrained`` would (see the module).

    ``base_model_id``: the id written in the config (default: the mixture's base model Hub id). ``use_bias``:
    write the classifier's biases; ``None`` (default) leaves them out, with ``use_bias: false``, exactly when every
    bias is zero (as in a mixture imported from ``use_bias: false``). A mixture with ``enable_softmax_topk`` is
    refused unless ``accept_softmax_topk_change=True`` (the original computes it batch-wide). A
    ``save_directory`` that already holds files is refused unless ``overwrite=True`` (it is then replaced whole).
    """
    config = model.xlora_config
    base_id = _base_model_id(model, base_model_id)
    _check_softmax_topk(model, accept=accept_softmax_topk_change)
    bias = not _all_biases_zero(model) if use_bias is None else bool(use_bias)
    if not bias and not _all_biases_zero(model):
        raise InvalidConfigError(
            "use_bias=False would drop the classifier's non-zero biases (the export would compute other outputs); "
            "leave use_bias=None (the default) or pass use_bias=True."
        )
    names = {name: name for name in model.expert_names}

    def write(tmp: Path, final: Path) -> None:
        write_experts(model, tmp, names)
        layout = _original_config(config, list(model.expert_names), base_id, layout=ORIGIN_XLORA, use_bias=bias)
        write_json(tmp / CONFIG_NAME, layout)
        state = _original_classifier_state(model.classifier, naming="module", use_bias=bias)
        save_tensors(state, tmp / CLASSIFIER_WEIGHTS_NAME)

    return write_export(save_directory, write, overwrite=overwrite)
