"""Training the X-LoRA gating classifier (and the experts, when the config makes them trainable).

Two paths, both on the model's own ``forward(labels=...)`` loss:

* :func:`train_classifier`, a plain seeded loop (AdamW, gradient clipping, periodic eval loss, a
  progress bar) for the small runs that need nothing else (:mod:`.plain`), its steps run by the loop
  skeleton the demo build shares (:mod:`.loop`);
* ``transformers.Trainer`` for everything larger (``accelerate launch`` with DDP, FSDP or DeepSpeed):
  :class:`XLoraTrainer` adds the routing loss and saves the mixture itself at every checkpoint, and
  :class:`SaveMixtureCallback` saves the mixture from a plain ``Trainer`` (:mod:`.trainer`).

Gradients reach the classifier through the real pass only (the scaling pass runs without them).
When the examples say which expert they belong to, an auxiliary cross-entropy on the classifier's
scalings over the answer tokens teaches the routing directly (:func:`routing_loss`, :mod:`.losses`),
and :func:`routing_report` measures it (:mod:`.report`).

This package sits above the model and the data modules and below the demo and the front ends.
"""

from __future__ import annotations

from .loop import (
    ordered_batches,
    run_steps,
    sampled_batches,
    shuffled_batches,
    train_mode,
    trainable_parameters,
)
from .losses import ROUTING_TOKENS, add_routing_loss, routing_loss, routing_token_mask
from .plain import DataLike, TrainResult, evaluate_loss, train_classifier
from .report import RoutingReport, mean_answer_scalings, routing_report
from .trainer import SaveMixtureCallback, XLoraTrainer

__all__ = [
    "ROUTING_TOKENS",
    "DataLike",
    "RoutingReport",
    "SaveMixtureCallback",
    "TrainResult",
    "XLoraTrainer",
    "add_routing_loss",
    "evaluate_loss",
    "mean_answer_scalings",
    "ordered_batches",
    "routing_loss",
    "routing_report",
    "routing_token_mask",
    "run_steps",
    "sampled_batches",
    "shuffled_batches",
    "train_classifier",
    "train_mode",
    "trainable_parameters",
]
