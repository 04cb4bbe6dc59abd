"""``transformers.Trainer`` for an X-LoRA mixture, for everything larger than the plain loop.

``accelerate launch`` with DDP, FSDP or DeepSpeed: :class:`XLoraTrainer` adds the routing loss and
saves the mixture itself at every checkpoint, and :class:`SaveMixtureCallback` saves the mixture from
a plain ``Trainer``.
"""

from __future__ import annotations

import inspect
import logging
import os
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import SAFE_WEIGHTS_NAME

from .losses import add_routing_loss, check_routing_tokens

logger = logging.getLogger(__name__)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside the DDP / accelerate wrappers (each keeps it as ``.module``)."""
    while hasattr(model, "module") and isinstance(model.module, torch.nn.Module):
        model = model.module
    return model


class SaveMixtureCallback(TrainerCallback):
    """Saves the mixture (``model.save_pretrained``) into every checkpoint a plain ``Trainer`` writes.

    ``subfolder`` puts it beside the Trainer's own files (``checkpoint-N/<subfolder>``); by default it
    goes in the checkpoint folder itself. Only the main process writes.
    """

    def __init__(self, *, subfolder: str | None = None) -> None:
        self.subfolder = subfolder

    def on_save(self, args, state, control, model=None, **kwargs):
        if model is None or not state.is_world_process_zero:
            return control
        target = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if self.subfolder:
            target = os.path.join(target, self.subfolder)
        unwrap_model(model).save_pretrained(target)
        return control


class XLoraTrainer(Trainer):
    """``transformers.Trainer`` for an :class:`~xlora_hub.XLoraModel`.

    * ``routing_loss_weight``: adds :func:`~xlora_hub.training.routing_loss` when the collator gives
      ``routing_labels`` (``CompletionCollator(keep_routing_labels=True)``).
    * Checkpoints and ``save_model`` write the mixture (``model.save_pretrained``: config, classifier,
      expert references) plus ``model.safetensors`` with the trainable tensors only, so
      ``resume_from_checkpoint`` works and the frozen base model is never copied (a plain ``Trainer``
      saves the whole state dict, which fails on base models with tied embeddings).
    """

    def __init__(
        self, *args: Any, routing_loss_weight: float = 0.0, routing_loss_tokens: str = "answer", **kwargs: Any
    ) -> None:
        check_routing_tokens(routing_loss_tokens)
        super().__init__(*args, **kwargs)
        self.routing_loss_weight = float(routing_loss_weight)
        self.routing_loss_tokens = routing_loss_tokens

    def _set_signature_columns_if_needed(self) -> None:
        # XLoraModel.forward takes the wrapped model's inputs through **kwargs: keep the columns *that* model
        # takes (attention_mask, labels, ...) and the routing label, instead of dropping all but input_ids.
        if self._signature_columns is None:
            wrapped = unwrap_model(self.model).model
            columns = [*inspect.signature(wrapped.forward).parameters, "routing_label", "routing_labels"]
            self._signature_columns = list(dict.fromkeys([*columns, "label", "label_ids", *self.label_names]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        routing_labels = inputs.pop("routing_labels", None)
        # The Trainer's own loss (token averaging across devices and gradient accumulation, label smoothing),
        # then the routing loss on top.
        loss, outputs = super().compute_loss(model, inputs, return_outputs=True, num_items_in_batch=num_items_in_batch)
        if model.training:
            loss, _ = add_routing_loss(
                unwrap_model(model),
                inputs,
                routing_labels,
                loss,
                weight=self.routing_loss_weight,
                tokens=self.routing_loss_tokens,
            )
        return (loss, outputs) if return_outputs else loss

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = unwrap_model(self.model)
        model.save_pretrained(output_dir)
        trainable = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}
        save_file(trainable, os.path.join(output_dir, SAFE_WEIGHTS_NAME), metadata={"format": "pt"})
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _issue_warnings_after_load(self, load_result: Any) -> None:
        # The checkpoint holds the trainable tensors only: the frozen base weights are expected to be missing.
        frozen = {n for n, p in unwrap_model(self.model).named_parameters() if not p.requires_grad}
        missing = [k for k in load_result.missing_keys if k not in frozen]
        if missing:
            logger.warning("Trainable weights missing from the checkpoint: %s", missing)
        if load_result.unexpected_keys:
            logger.warning("Unexpected keys in the checkpoint: %s", load_result.unexpected_keys)


__all__ = ["SaveMixtureCallback", "XLoraTrainer", "unwrap_model"]
