"""Import and export of other X-LoRA checkpoint formats, so existing mixtures move in and out of xlora-hub.

Formats, detected from the files (:func:`detect_format`), one module each:

* ``xlora-hub``: ``xlora_config.json`` with a ``format_version`` (loaded by :func:`xlora_hub.hub.load_mixture`).
* ``peft`` (:mod:`.peft_format`): peft's ``XLoraModel.save_pretrained`` output, ``adapter_config.json`` with
  ``peft_type: XLORA`` (the experts are the values of its ``adapters``) and the classifier under
  ``...internal_xlora_classifier.layers.*`` in ``adapter_model.safetensors``. The numbered ``0/``, ``1/`` folders
  peft writes are not usable experts and are ignored. peft >= 0.20 writes an empty or partial classifier file: that
  is detected and reported, never loaded.
* ``xlora`` (:mod:`.original`): the original ``xlora`` package / mistral.rs layout (for example
  ``lamm-mit/x-lora``): ``xlora_config.json`` without ``format_version`` (``adapters`` as a list or a dict,
  ``base_model_id``, ``use_bias``, ``enable_relu_and_dropout``...), classifier keys ``inner.*`` / ``last.*`` (often
  bfloat16), experts in ``<name>/`` subfolders.

Import any of them with :func:`import_mixture`. Export writes peft's format (:func:`export_peft`), a folder
mistral.rs loads as written (:func:`export_mistralrs`, :mod:`.mistralrs`: flat expert files, its ordering file)
or the original package's folder (:func:`export_xlora`), or flattens a mixture into one plain peft LoRA with its
routing folded into fixed weights (:func:`flatten_to_lora`, :mod:`.flatten`). Run ``python -m xlora_hub.convert
--help`` for the command line (:mod:`.command`). Where a checkpoint's files and experts are, and what a
downloaded one may point at, is
:mod:`.detect`; what the formats share (the foreign-checkpoint record, building the model) is :mod:`.common`.
"""

from __future__ import annotations

from .command import main
from .common import FORMAT_ORIGINAL, FORMAT_PEFT, FORMAT_XLORA_HUB, FORMATS
from .detect import detect_format
from .flatten import calibration_tokenizer, flatten_to_lora, parse_weights, push_flattened_lora
from .importing import import_mixture
from .mistralrs import MISTRALRS_ORDERING_NAME, export_mistralrs, mistralrs_expert_names
from .original_export import export_xlora
from .peft_format import PEFT_CLASSIFIER_MARKER, PEFT_CLASSIFIER_PREFIX, export_peft, save_peft_classifier

__all__ = [
    "FORMATS",
    "FORMAT_ORIGINAL",
    "FORMAT_PEFT",
    "FORMAT_XLORA_HUB",
    "MISTRALRS_ORDERING_NAME",
    "PEFT_CLASSIFIER_MARKER",
    "PEFT_CLASSIFIER_PREFIX",
    "calibration_tokenizer",
    "detect_format",
    "export_mistralrs",
    "export_peft",
    "export_xlora",
    "flatten_to_lora",
    "import_mixture",
    "main",
    "mistralrs_expert_names",
    "parse_weights",
    "push_flattened_lora",
    "save_peft_classifier",
]
