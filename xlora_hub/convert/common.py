"""What every foreign format shares: the record a reader returns, the classifier's tensors, building the model.

A reader (:mod:`.peft_format`, :mod:`.original`) turns a foreign checkpoint into a :class:`ForeignCheckpoint`
(our config and the classifier's linear layers); :func:`build` checks its shapes and makes an
:class:`~xlora_hub.model.XLoraModel` of it. What the writers share is :mod:`.writing`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import nn

from ..config import XLoraConfig
from ..errors import InvalidConfigError, InvalidMixtureError, UnsupportedFormatError
from ..finite import check_finite_tensors
from ..hub import PICKLE_WEIGHTS_NAME, load_base_model, read_classifier_header
from ..jsonfile import read_json_object

if TYPE_CHECKING:
    from ..model import XLoraModel

FORMAT_XLORA_HUB = "xlora-hub"
FORMAT_PEFT = "peft"
FORMAT_ORIGINAL = "xlora"
FORMATS = (FORMAT_XLORA_HUB, FORMAT_PEFT, FORMAT_ORIGINAL)

# Settings with the same name and meaning in peft's XLoraConfig, the original package and xlora-hub.
SHARED_SETTINGS = (
    "enable_softmax",
    "enable_softmax_topk",
    "softmax_temperature",
    "layerwise_scalings",
    "top_k_lora",
    "xlora_depth",
    "xlora_size",
    "xlora_dropout_p",
    "use_trainable_adapters",
    "scaling_pass_value",
    "global_scaling_weight",
)

Linears = list[tuple[torch.Tensor, torch.Tensor | None]]
"""A classifier as its linear layers in order: ``(weight, bias or None)``."""


@dataclass
class ForeignCheckpoint:
    """A checkpoint read from another format: our config (no layer names yet) and the classifier's linear layers."""

    config: XLoraConfig
    linears: Linears
    what: str


@dataclass(frozen=True)
class LoadOptions:
    """Where and how the base model and the experts are fetched and placed: the options :func:`import_mixture`
    passes on unchanged, to :func:`~xlora_hub.hub.load_mixture` or to :func:`build`, kept in one value."""

    token: str | bool | None = None
    cache_dir: str | os.PathLike[str] | None = None
    local_files_only: bool = False
    force_download: bool = False
    torch_dtype: torch.dtype | None = None
    device: torch.device | str | None = None

    def kwargs(self) -> dict[str, Any]:
        """The options as keyword arguments (``load_mixture`` and ``XLoraModel.from_experts`` take all of them)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def fetch_kwargs(self) -> dict[str, Any]:
        """The options that say where files come from (``hf_hub_download`` and ``snapshot_download`` take them)."""
        return {"token": self.token, "cache_dir": self.cache_dir, "local_files_only": self.local_files_only}

    def base_model_kwargs(self) -> dict[str, Any]:
        """The options :func:`~xlora_hub.hub.load_base_model` takes."""
        return {**self.fetch_kwargs(), "torch_dtype": self.torch_dtype}


# ---------------------------------------------------------------------------------------------- reading
def read_json(path: Path, *, what: str) -> dict[str, Any]:
    """A foreign format's JSON config, through the one bounded reader (size, depth, finite numbers, an object)."""
    return read_json_object(path, what=f"{what}: {path.name}")


def foreign_config(
    raw: Mapping[str, Any], experts: Mapping[str, Any], *, base_model: Any, settings: dict[str, Any], what: str
) -> XLoraConfig:
    """Our config for a foreign checkpoint; a setting it cannot hold is an error naming the checkpoint."""
    try:
        return XLoraConfig(experts=experts, base_model=base_model or None, hidden_size=raw["hidden_size"], **settings)
    except (InvalidConfigError, TypeError) as err:
        raise InvalidConfigError(f"{what}: {err}") from None


def shared_settings(raw: Mapping[str, Any]) -> dict[str, Any]:
    """The settings a foreign config spells as xlora-hub does (:data:`SHARED_SETTINGS`), as given."""
    return {k: raw[k] for k in SHARED_SETTINGS if k in raw}


def classifier_linear_names(config: XLoraConfig) -> list[str]:
    """Names (``layers.N``) of the Linear layers of our classifier for a config, in order."""
    from ..classifier import XLoraClassifier

    meta = XLoraClassifier(
        config.replace(layerwise_scalings=False), hidden_size=1, n_layers=1, n_experts=config.n_experts, device="meta"
    )
    return [f"layers.{n}" for n, m in meta.layers.named_children() if isinstance(m, nn.Linear)]


def load_classifier_tensors(path: Path, *, what: str) -> dict[str, torch.Tensor]:
    """A foreign classifier file: safetensors only (a pickle is refused by name), its header checked, finite."""
    if not path.is_file():
        pickle = path.with_suffix(".pt")
        if pickle.is_file() or path.with_name(PICKLE_WEIGHTS_NAME).is_file():
            raise UnsupportedFormatError(
                f"{what}: the classifier is only saved as a pickle file; xlora-hub reads safetensors only and never "
                "unpickles downloaded files. Re-save it with safetensors."
            )
        raise InvalidMixtureError(f"{what}: classifier file {path.name} is missing.")
    read_classifier_header(path, what=what)  # a clear error for truncated files
    tensors = load_file(str(path))
    check_finite_tensors(tensors.items(), what=f"{what}: {path.name}")
    return tensors


# ---------------------------------------------------------------------------------------------- building
def check_linears(foreign: ForeignCheckpoint) -> None:
    """Shapes of the foreign classifier against its config, before any model is built."""
    config, what = foreign.config, foreign.what
    width = config.hidden_size
    for i, (weight, bias) in enumerate(foreign.linears):
        if weight.dim() != 2 or weight.shape[1] != width:
            raise InvalidMixtureError(
                f"{what}: classifier layer {i} has weight shape {list(weight.shape)}, expected input size {width} "
                f"(hidden_size={config.hidden_size}, xlora_size={config.xlora_size})."
            )
        if bias is not None and list(bias.shape) != [weight.shape[0]]:
            raise InvalidMixtureError(f"{what}: classifier layer {i} has bias shape {list(bias.shape)}.")
        width = weight.shape[0]
    out = foreign.linears[-1][0].shape[0]
    if (not config.layerwise_scalings and out != config.n_experts) or out % config.n_experts:
        raise InvalidMixtureError(
            f"{what}: the classifier has {out} outputs but there are {config.n_experts} experts "
            f"(layerwise_scalings={config.layerwise_scalings})."
        )


def build(foreign: ForeignCheckpoint, *, base_model: nn.Module | None, options: LoadOptions) -> XLoraModel:
    """The model of a foreign checkpoint: its experts on ``base_model`` (else the one it names), its classifier."""
    from ..model import XLoraModel

    check_linears(foreign)
    config = foreign.config
    if base_model is None:
        if config.base_model is None:
            raise InvalidMixtureError(f"{foreign.what} names no base model; pass `base_model=`.")
        base_model = load_base_model(config.base_model, **options.base_model_kwargs())
    model = XLoraModel.from_experts(base_model, config, **options.kwargs())
    _load_classifier(model, foreign)
    return model.eval()


def _load_classifier(model: XLoraModel, foreign: ForeignCheckpoint) -> None:
    """Put the foreign linear layers into the built model's classifier (a missing bias is zero)."""
    names = classifier_linear_names(model.xlora_config)
    state: dict[str, torch.Tensor] = {}
    for name, (weight, bias) in zip(names, foreign.linears):
        state[f"{name}.weight"] = weight
        state[f"{name}.bias"] = bias if bias is not None else torch.zeros(weight.shape[0], dtype=weight.dtype)
    expected = model.classifier.shapes()
    if {k: list(v.shape) for k, v in state.items()} != expected:
        raise InvalidMixtureError(
            f"{foreign.what}: the classifier was trained for another number of X-LoRA layers "
            f"(this base model and these experts give {model.n_layers})."
        )
    model.classifier.load_state_dict(state, strict=True)  # casts (for example bfloat16) to the model's dtype
