"""Writing a mixture folder: config, classifier, model card, and the experts that live nowhere else.

The model is used through what it exposes (``xlora_config``, ``experts``, ``classifier``, ``peft_model``); this
package never imports :mod:`xlora_hub.model` at run time.
"""

from __future__ import annotations

import contextlib
import copy
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from safetensors.torch import save_file

from ..config import CLASSIFIER_WEIGHTS_NAME, CONFIG_NAME, BaseModelRef, ExpertRef, XLoraConfig
from ..errors import ExpertNotFoundError, IncompatibleExpertError
from ..jsonfile import read_json_object
from ..staging import carry_entry, prepare_target, replace_folder, staging_folder
from .card import make_model_card
from .experts import ADAPTER_WEIGHTS_NAME, ResolvedExpert
from .format import EXPERT_FILES, EXPERTS_DIR, MODEL_CARD_NAME, classifier_metadata

if TYPE_CHECKING:
    from ..model import XLoraModel


__all__ = [
    "ExpertPlan",
    "bundled_names",
    "plan_experts",
    "save_mixture",
    "write_expert_files",
    "write_mixture",
]


@dataclass(frozen=True)
class ExpertPlan:
    """How one expert is written: as a reference, copied from a folder, or exported from the live (trained) model."""

    name: str
    ref: ExpertRef
    copy_from: Path | None = None
    export_trained: bool = False

    @property
    def bundled(self) -> bool:
        return self.copy_from is not None or self.export_trained


def bundled_names(model: XLoraModel) -> frozenset[str]:
    """The experts the model's mixture already carries in its ``experts/`` folder (loaded from it)."""
    return frozenset(expert.name for expert in model.experts if expert.origin == "bundled")


def plan_experts(
    model: XLoraModel, *, bundle_experts: bool, overrides: dict[str, ExpertRef] | None = None
) -> list[ExpertPlan]:
    """How each expert is written: trained ones exported, ``overrides`` (pinned or pushed refs) as given, local
    ones (or all with ``bundle_experts``) copied into ``experts/<name>``, Hub ones kept as references."""
    trained = model.xlora_config.use_trainable_adapters
    overrides = overrides or {}
    plans = []
    for expert in model.experts:
        bundled_ref = ExpertRef(path=f"{EXPERTS_DIR}/{expert.name}")
        if trained:
            plans.append(ExpertPlan(expert.name, bundled_ref, export_trained=True))
        elif expert.name in overrides:
            plans.append(ExpertPlan(expert.name, overrides[expert.name]))
        elif bundle_experts or not expert.ref.is_hub:
            plans.append(ExpertPlan(expert.name, bundled_ref, copy_from=expert.local_dir))
        else:
            plans.append(ExpertPlan(expert.name, expert.ref))
    return plans


@contextlib.contextmanager
def _peft_layers_in_place(model: XLoraModel) -> Iterator[None]:
    """peft's LoRA layers back where the X-LoRA wrappers sit, for the length of a peft call that finds the adapter
    by walking the model (``get_peft_model_state_dict``); the same wrappers are put back after, even on error.

    A wrapper registers its peft layer's children under their own names, so the state dict is the same either way.
    """
    swaps = []
    for wrapper in model.xlora_layers:
        parent_name, _, child = wrapper.module_name.rpartition(".")
        swaps.append((model.model.get_submodule(parent_name) if parent_name else model.model, child, wrapper))
    try:
        for parent, child, wrapper in swaps:
            setattr(parent, child, wrapper.lora_layer)
        yield
    finally:
        for parent, child, wrapper in swaps:
            setattr(parent, child, wrapper)


def write_expert_files(model: XLoraModel, expert: ResolvedExpert, dest: Path, *, from_model: bool) -> None:
    """Write one expert as a peft adapter folder (config + safetensors) into ``dest``.

    ``from_model`` exports the live weights (trained experts); otherwise the expert's files are copied.
    """
    dest.mkdir(parents=True, exist_ok=True)
    if not from_model:
        for filename in EXPERT_FILES:
            source = expert.local_dir / filename
            if not source.is_file():
                raise ExpertNotFoundError(
                    f"Expert {expert.name!r}: {source} is missing; cannot copy it into the mixture."
                )
            shutil.copyfile(source, dest / filename)
        return
    # peft's own export of one adapter: "<module>.lora_A.<name>.weight" is saved as "<module>.lora_A.weight"
    from peft import get_peft_model_state_dict

    peft_model = model.peft_model
    with _peft_layers_in_place(model):
        exported = get_peft_model_state_dict(peft_model, adapter_name=expert.name, save_embedding_layers=False)
    state = {key: value.detach().to("cpu").contiguous() for key, value in exported.items()}
    if not state:
        raise IncompatibleExpertError(f"Expert {expert.name!r}: no LoRA weights found in the model to save.")
    save_file(state, str(dest / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    peft_config = copy.deepcopy(peft_model.peft_config[expert.name])
    peft_config.inference_mode = True
    peft_config.save_pretrained(str(dest))


def write_mixture(
    model: XLoraModel,
    folder: Path,
    plans: list[ExpertPlan],
    *,
    repo_id: str | None = None,
    base_model: BaseModelRef | None = None,
) -> XLoraConfig:
    """Write the three files (and bundled experts) of a mixture into an empty ``folder``."""
    by_name = {expert.name: expert for expert in model.experts}
    for plan in plans:
        if plan.bundled:
            write_expert_files(
                model, by_name[plan.name], folder / EXPERTS_DIR / plan.name, from_model=plan.export_trained
            )
    config = model.xlora_config.replace(experts={plan.name: plan.ref for plan in plans})
    if base_model is not None:
        config = config.replace(base_model=base_model)
    state = {key: value.detach().to("cpu").contiguous() for key, value in model.classifier.state_dict().items()}
    save_file(state, str(folder / CLASSIFIER_WEIGHTS_NAME), metadata=classifier_metadata(config))
    config.save(folder / CONFIG_NAME)
    make_model_card(config, repo_id=repo_id).save(str(folder / MODEL_CARD_NAME))
    return config


def _old_bundled_names(folder: Path) -> set[str]:
    """The ``experts/<name>`` folders the mixture in ``folder`` refers to (an unreadable config: none)."""
    try:
        experts = read_json_object(folder / CONFIG_NAME).get("experts", [])
    except (OSError, ValueError, AttributeError):
        return set()
    names = set()
    for entry in experts if isinstance(experts, list) else []:
        parts = PurePosixPath(str(entry.get("path") or "")).parts if isinstance(entry, dict) else ()
        if len(parts) > 1 and parts[0] == EXPERTS_DIR:
            names.add(parts[1])
    return names


def _carry_other_files(old: Path, new: Path) -> None:
    """Keep, in the new folder, what the old one holds that the new mixture does not write.

    The user's other files (a ``base_model/`` folder, a tokenizer, notes, other LoRAs in ``experts/``) are
    hard-linked into the staged folder, so swapping whole folders loses nothing; the old mixture's own
    bundled experts that the new one drops are not kept. A ``experts/`` that is a symbolic link is not
    followed: the new mixture gets a real ``experts/`` folder and the link's target is left untouched.
    """
    for entry in sorted(old.iterdir()):
        if entry.name != EXPERTS_DIR and not os.path.lexists(new / entry.name):
            carry_entry(entry, new / entry.name)
    old_experts = old / EXPERTS_DIR
    if not old_experts.is_dir() or old_experts.is_symlink():
        return
    stale = _old_bundled_names(old)
    for entry in sorted(old_experts.iterdir()):
        dest = new / EXPERTS_DIR / entry.name
        if entry.name not in stale and not os.path.lexists(dest):
            dest.parent.mkdir(exist_ok=True)
            carry_entry(entry, dest)


def save_mixture(
    model: XLoraModel,
    save_directory: str | os.PathLike[str],
    *,
    bundle_experts: bool = False,
    overwrite: bool = True,
) -> Path:
    """Write a mixture folder: config, classifier, model card, and the experts that live nowhere else.

    Hub experts stay references (``bundle_experts=True`` copies them too, for a self-contained folder).
    Local-folder experts are always copied into ``experts/<name>/`` and referenced relatively, and trained
    experts (``use_trainable_adapters``) are exported from the model, so a saved mixture never points at
    an absolute path.

    The complete new folder is written beside the target, with the target's other files kept (hard links),
    then swapped in whole (:mod:`.staging`): a kill at any point leaves the old or the new mixture. A mixture
    already in the folder is replaced, as ``save_pretrained`` does in transformers; ``overwrite=False``
    refuses any folder that is not empty (what the CLI does without ``--overwrite``).
    """
    target = prepare_target(save_directory, overwrite=overwrite, what="Mixture folder", replaces="the mixture in it")
    plans = plan_experts(model, bundle_experts=bundle_experts)
    with staging_folder(target) as tmp:
        write_mixture(model, tmp, plans)
        if target.is_dir():
            _carry_other_files(target, tmp)
        replace_folder(tmp, target)
    return target
