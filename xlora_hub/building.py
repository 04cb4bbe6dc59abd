"""Building an X-LoRA mixture: the steps of ``XLoraModel.from_experts`` before and around the model itself.

The order is the point: every expert is resolved and checked against the base model (config, tensor headers,
hidden size) before the base is touched; then peft loads the experts into it (:func:`peft_experts`), whose
failure, or a failure of the model built inside its block, puts the caller's base model back as it was. The
X-LoRA layers then take the place of peft's LoRA layers (:func:`wrap_lora_layers`) and
:func:`restore_peft_layers` undoes that.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from torch import nn

from .config import BaseModelRef, XLoraConfig
from .errors import IncompatibleExpertError, InvalidConfigError, InvalidMixtureError
from .finite import first_non_finite
from .hub import ResolvedExpert, cached_commit_sha, check_expert_matches_model, resolve_expert
from .layers import RoutingState, XLoraLayer, supported_lora_layers, wrap_lora_layer
from .placement import absolute_offload_paths, peft_writes_inside
from .quantization import compute_dtype, describe_quantization, is_quantized_tensor


# ---------------------------------------------------------------------------------------------- checks
def hidden_size_of(model: nn.Module) -> int:
    """The hidden size in the base model's (text) config, under the names transformers models use for it."""
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int):
            return value
    raise InvalidConfigError(
        f"Cannot read the hidden size of {type(model).__name__} from its config; set `hidden_size` in XLoraConfig."
    )


def check_hidden_size(model: nn.Module, config: XLoraConfig) -> int:
    """The base model's hidden size, refused when the mixture was made for another one."""
    hidden_size = hidden_size_of(model)
    if config.hidden_size is not None and config.hidden_size != hidden_size:
        raise InvalidMixtureError(
            f"The mixture was made for hidden size {config.hidden_size} but the base model "
            f"({type(model).__name__}) has hidden size {hidden_size}: load it on its own base model."
        )
    return hidden_size


def base_model_ref(model: nn.Module) -> BaseModelRef | None:
    """The ref a new mixture records for its base model: an absolute folder, or a Hub id at its commit."""
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    if os.path.isdir(os.path.expanduser(str(name))):
        # a local folder: recorded absolute, so the mixture does not depend on the directory it was made from
        return BaseModelRef(repo_id=os.path.abspath(os.path.expanduser(str(name))))
    revision = getattr(getattr(model, "config", None), "_commit_hash", None) or cached_commit_sha(str(name))
    return BaseModelRef(repo_id=str(name), revision=revision or None)


def with_quantization(config: XLoraConfig, model: nn.Module) -> BaseModelRef | None:
    """The config's base model ref recording how this base is quantized (information only: nothing reads it back)."""
    ref = config.base_model
    if ref is None:
        return None
    quantization = describe_quantization(model)
    return ref if ref.quantization == quantization else dataclasses.replace(ref, quantization=quantization)


def resolve_experts(
    config: XLoraConfig,
    *,
    base_dir: str | os.PathLike[str] | None,
    token: str | bool | None,
    cache_dir: str | os.PathLike[str] | None,
    local_files_only: bool,
    force_download: bool,
    base_model: nn.Module | None = None,
) -> list[ResolvedExpert]:
    """Every expert of ``config`` as local adapter files (downloaded from the Hub where it is a Hub ref).

    With ``base_model``, a Hub expert's weight header is read remotely and checked against it before its
    weights are downloaded, so an expert that does not fit costs no download."""

    def precheck(expert: ResolvedExpert, header: dict[str, tuple[list[int], str]]) -> None:
        check_expert_matches_model(expert, base_model, header=header)

    return [
        resolve_expert(
            name,
            ref,
            base_dir=base_dir,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
            precheck=precheck if base_model is not None else None,
        )
        for name, ref in config.experts.items()
    ]


def check_experts_fit(base_model: nn.Module, config: XLoraConfig, experts: list[ResolvedExpert]) -> None:
    """Refuse, before the base is modified, a mixture whose hidden size or experts do not fit the base model."""
    check_hidden_size(base_model, config)
    for expert in experts:  # the adapter config, then its tensors' header against it and the model
        check_expert_matches_model(expert, base_model)


def check_expert_factors_finite(module_name: str, module: nn.Module) -> None:
    """Refuse an expert whose loaded factors hold NaN/Inf (they would make every logit NaN), naming it."""
    bad = first_non_finite((n, p) for n, p in module.named_parameters() if "lora_" in n)
    if bad is not None:
        factor, _, rest = bad.partition(".")
        expert = rest.split(".")[0]
        raise IncompatibleExpertError(
            f"Expert {expert!r}: tensor {module_name}.{factor} holds NaN or infinite values, which would make every "
            "output NaN. Its adapter_model.safetensors is corrupt or comes from a diverged training run; use a good "
            "copy (`force_download=True`) or retrain the expert."
        )


def layer_mismatch_message(expected: list[str], actual: list[str]) -> str:
    """Why a saved mixture's layer names do not fit the layers built on this base, with a few of the differences."""
    missing = [n for n in expected if n not in actual][:3]
    extra = [n for n in actual if n not in expected][:3]
    detail = f"missing {missing}, unexpected {extra}" if (missing or extra) else "same layers in another order"
    return (
        f"The mixture's X-LoRA layers ({len(expected)}) do not match the layers built on this base model "
        f"({len(actual)}): {detail}. The classifier would route to the wrong layers; load the mixture on the base "
        "model and experts it was made with."
    )


# ---------------------------------------------------------------------------------------------- peft loading
def _prepare_expert_factors(hf_model: nn.Module, dtype: torch.dtype) -> None:
    """Check every expert's loaded factors are finite and give them ``dtype`` (quantized tensors stay as they are)."""
    for module_name, module in hf_model.named_modules():
        if isinstance(module, supported_lora_layers()):
            check_expert_factors_finite(module_name, module)
            for name, param in module.named_parameters():
                if "lora_" in name and not is_quantized_tensor(param) and param.dtype != dtype:
                    param.data = param.data.to(dtype)


@contextlib.contextmanager
def peft_experts(
    base_model: nn.Module,
    experts: list[ResolvedExpert],
    *,
    trainable: bool,
    upcast_experts: bool,
    offload: Mapping[str, Any] | None = None,
) -> Iterator[Any]:
    """Context manager: the ``peft.PeftModel`` of ``base_model`` with every expert loaded, checked and cast.

    Experts keep the base model's compute dtype unless ``upcast_experts`` (float32). If loading, or the block
    (building the X-LoRA model on it), fails, peft's layers are taken out again so the caller's base model is
    left as it was.
    """
    peft_model = None
    try:
        with peft_writes_inside(offload) as stage:
            for expert in experts:
                kwargs = dict(adapter_name=expert.name, is_trainable=trainable, autocast_adapter_dtype=False)
                kwargs.update(offload or {})
                if peft_model is None:
                    peft_model = PeftModel.from_pretrained(base_model, str(expert.local_dir), **kwargs)
                else:
                    peft_model.load_adapter(str(expert.local_dir), **kwargs)
        if stage is not None:
            absolute_offload_paths(peft_model, stage)
        dtype = torch.float32 if upcast_experts else compute_dtype(base_model)
        _prepare_expert_factors(peft_model.base_model.model, dtype)
        yield peft_model
    except Exception:
        if peft_model is not None:  # leave the caller's base model as it was
            with contextlib.suppress(Exception):
                restore_peft_layers(peft_model.base_model.model)
                peft_model.base_model.unload()
        raise


# ---------------------------------------------------------------------------------------------- X-LoRA layers
def wrap_lora_layers(model: nn.Module, *, expert_names: list[str], routing: RoutingState) -> list[XLoraLayer]:
    """Put an X-LoRA layer in the place of each of peft's LoRA layers in ``model``, all reading ``routing``."""
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    if not targets:
        raise IncompatibleExpertError("None of the experts adapts any layer of this base model.")
    wrappers: list[XLoraLayer] = []
    for index, (module_name, module) in enumerate(targets):
        wrapper = wrap_lora_layer(
            module, layer_index=index, expert_names=expert_names, routing=routing, module_name=module_name
        )
        parent_name, _, child_name = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child_name, wrapper)
        wrappers.append(wrapper)
    return wrappers


def restore_peft_layers(model: nn.Module) -> None:
    """Put peft's own LoRA layer back in the place of every X-LoRA layer of ``model``."""
    for name, module in list(model.named_modules()):
        if isinstance(module, XLoraLayer):
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child_name, module.unwrap())


__all__ = [
    "base_model_ref",
    "check_expert_factors_finite",
    "check_experts_fit",
    "check_hidden_size",
    "hidden_size_of",
    "layer_mismatch_message",
    "peft_experts",
    "resolve_experts",
    "restore_peft_layers",
    "with_quantization",
    "wrap_lora_layers",
]
