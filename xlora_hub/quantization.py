"""Quantized base models: which of peft's LoRA layers X-LoRA mixes, and how a base's quantization is described.

peft puts a backend-specific LoRA layer over each quantized ``Linear`` (``lora.bnb.Linear4bit``,
``lora.bnb.Linear8bitLt``, ``lora.torchao.TorchaoLoraLinear``); optimum-quanto's ``QLinear`` is an
``nn.Linear`` and gets the plain ``lora.Linear``. For all of them the forward is ``base_layer(x)`` plus the
plain LoRA delta, which is what :class:`~xlora_hub.layers.XLoraLinear` computes, so they share it. Each class
exists only when its backend is installed, so they are looked up lazily.

The quantization a mixture was saved over is recorded in its config for information only
(``base_model.quantization``): a mixture's own weights (classifier, LoRA factors) are never quantized, so it
loads on the same base quantized another way, or not at all.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn


def quantized_linear_lora_classes() -> tuple[type, ...]:
    """peft's LoRA layers over a quantized ``Linear`` whose forward is ``base_layer(x)`` + the LoRA delta.

    Exact classes (subclasses may change the forward). Read from the peft modules already imported: a layer
    of one of these classes exists only once peft imported its module, so nothing (bitsandbytes, torchao) is
    imported here.
    """
    classes: list[type] = []
    for module_name, names in (
        ("peft.tuners.lora.bnb", ("Linear8bitLt", "Linear4bit")),
        ("peft.tuners.lora.torchao", ("TorchaoLoraLinear",)),
    ):
        module = sys.modules.get(module_name)
        for name in names:
            cls = getattr(module, name, None)
            if isinstance(cls, type):
                classes.append(cls)
    return tuple(classes)


SUPPORTED_QUANTIZED = (
    "bitsandbytes 4-bit (lora.bnb.Linear4bit: nf4, fp4, with or without double quantization)",
    "bitsandbytes 8-bit (lora.bnb.Linear8bitLt)",
    "torchao (lora.TorchaoLoraLinear: int8 weight-only, int8 dynamic activation, intx weight-only)",
    "optimum-quanto (lora.Linear over quanto's QLinear)",
)


def supported_layers_text() -> str:
    """The layer classes X-LoRA mixes, for error messages."""
    return (
        "lora.Linear (over nn.Linear, GPT-2's Conv1D or optimum-quanto's QLinear), lora.Embedding, lora.Conv2d, "
        "and over quantized bases " + "; ".join(SUPPORTED_QUANTIZED[:3])
    )


# peft modules that hold LoRA layers over quantized bases X-LoRA does not mix (yet), by backend.
_UNSUPPORTED_QUANTIZED_MODULES = {
    "gptq": "GPTQ",
    "awq": "AWQ",
    "aqlm": "AQLM",
    "eetq": "EETQ",
    "hqq": "HQQ",
    "inc": "Intel Neural Compressor",
}


def unsupported_quantized_backend(layer: nn.Module) -> str | None:
    """The backend of a peft LoRA layer over a quantized base that X-LoRA does not mix, else ``None``."""
    module = type(layer).__module__
    prefix = "peft.tuners.lora."
    if module.startswith(prefix):
        return _UNSUPPORTED_QUANTIZED_MODULES.get(module[len(prefix) :].split(".")[0])
    return None


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    """A quantized weight: integer storage (bitsandbytes) or a tensor subclass (torchao, optimum-quanto).

    Such a weight must never be cast: its ``.to(dtype)`` either fails or silently dequantizes it.
    """
    if not tensor.is_floating_point():
        return True
    return type(tensor) not in (torch.Tensor, nn.Parameter)


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype the base model computes in: that of its first floating-point, non-quantized parameter."""
    for param in model.parameters():
        if param.is_floating_point() and not is_quantized_tensor(param):
            return param.dtype
    for param in model.parameters():  # everything quantized: torchao and quanto weights report their float dtype
        if param.is_floating_point():
            return param.dtype
    return torch.float32


def describe_quantization(model: nn.Module) -> str | None:
    """A short description of how the base model is quantized (``"bitsandbytes-nf4"``...), ``None`` if it is not.

    Read from the ``quantization_config`` transformers records, else from the layers themselves (a model
    quantized after loading, e.g. with ``torchao.quantize_`` or ``optimum.quanto.quantize``).
    """
    config = getattr(getattr(model, "config", None), "quantization_config", None)
    if config is not None:
        text = _describe_config(config.to_dict() if hasattr(config, "to_dict") else dict(config))
        if text:
            return text
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and is_quantized_tensor(weight):
            return _describe_weight(module, weight)
    return None


def _describe_config(config: dict[str, Any]) -> str | None:
    method = config.get("quant_method") or ""
    method = str(getattr(method, "value", method)).lower()  # transformers' QuantizationMethod enum
    if method in ("bitsandbytes", "bitsandbytes_4bit", "bitsandbytes_8bit"):
        if config.get("load_in_4bit"):
            text = f"bitsandbytes-{config.get('bnb_4bit_quant_type', 'fp4')}"
            return text + ("-double-quant" if config.get("bnb_4bit_use_double_quant") else "")
        if config.get("load_in_8bit"):
            return "bitsandbytes-int8"
    if method == "torchao":
        quant_type = config.get("quant_type")
        if isinstance(quant_type, dict):  # {"default": {"_type": "Int8WeightOnlyConfig", ...}}
            inner = quant_type.get("default", quant_type)
            quant_type = inner.get("_type", inner) if isinstance(inner, dict) else inner
        return f"torchao-{quant_type}" if quant_type else "torchao"
    if method == "quanto":
        return f"quanto-{config.get('weights', 'int8')}"
    return method or None


def _describe_weight(module: nn.Module, weight: torch.Tensor) -> str:
    kind = type(weight).__name__
    owner = type(weight).__module__.split(".")[0]
    if owner == "bitsandbytes":
        quant_type = getattr(weight, "quant_type", None)
        return f"bitsandbytes-{quant_type}" if quant_type else "bitsandbytes-int8"
    if owner in ("torchao", "optimum"):
        name = "quanto" if owner == "optimum" else owner
        qtype = getattr(getattr(module, "weight_qtype", None), "name", None)
        return f"{name}-{qtype or kind}"
    return f"{owner}-{kind}"
