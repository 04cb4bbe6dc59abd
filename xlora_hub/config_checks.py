"""The bounds and value checks of an X-LoRA config, kept apart from the dataclass that holds it.

A config is a few hundred bytes, so without bounds a stranger's file could ask for a classifier of any size, a
NaN temperature or an infinite weight (each gives NaN logits). Everything here is plain Python (no torch) and
runs before anything is built or allocated; every failure is an :class:`~xlora_hub.errors.InvalidConfigError`
naming the field and the fix.
"""

from __future__ import annotations

import keyword
import math
from typing import TYPE_CHECKING, Any

from .errors import InvalidConfigError, short_repr

if TYPE_CHECKING:
    from .config import XLoraConfig

MAX_EXPERTS = 1024
MAX_LAYERS = 16384
MAX_XLORA_DEPTH = 64
MAX_XLORA_SIZE = 65536
MAX_HIDDEN_SIZE = 131072
MAX_CLASSIFIER_PARAMETERS = 2**30
"""At most ~1.07e9 classifier parameters (4 GiB in float32); real mixtures have a few million."""
MIN_SOFTMAX_TEMPERATURE = 1e-3
"""Below this the logits divided by the temperature overflow (inf, then NaN scalings) in half precision."""
MAX_SCALING = 1e4
"""Largest magnitude of `global_scaling_weight` and `scaling_pass_value`: beyond it the outputs overflow."""
MAX_EXPERT_NAME_LENGTH = 64

# Attributes of the objects an expert name is set on (torch's nn.Module / nn.ModuleDict, through peft's
# ModuleDicts and plain dicts of adapter values): such a name passes as an identifier but fails or shadows
# a method in torch. Kept here so this module stays torch-free; tests check it covers torch's and peft's.
_RESERVED_NAMES = frozenset(
    """
    T_destination add_module apply bfloat16 buffers call_super_init children clear compile copy cpu cuda
    double dump_patches eval extra_repr float forward fromkeys get get_buffer get_extra_state get_parameter
    get_submodule half ipu items keys load_state_dict modules mtia named_buffers named_children named_modules
    named_parameters parameters pop popitem register_backward_hook register_buffer
    register_forward_hook register_forward_pre_hook register_full_backward_hook
    register_full_backward_pre_hook register_load_state_dict_post_hook register_load_state_dict_pre_hook
    register_module register_parameter register_state_dict_post_hook register_state_dict_pre_hook
    requires_grad_ set_extra_state set_submodule setdefault share_memory smart_apply state_dict to to_empty
    train training type update values xpu zero_grad
    """.split()
)


def check_expert_name(name: Any, *, what: str = "Expert name") -> str:
    """The one check for an expert name, which becomes a module attribute, a dict key and a folder name.

    A Python identifier (not a keyword, not starting with '_'), at most ``MAX_EXPERT_NAME_LENGTH``
    characters, and not an attribute of ``nn.Module`` / ``nn.ModuleDict`` / ``dict`` (``keys``,
    ``forward``, ``training``...), which torch and peft would refuse or confuse with a method.
    """
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
        raise InvalidConfigError(
            f"{what} {short_repr(name, limit=80)} is not a valid identifier; use letters, digits and '_' "
            "(for example 'math' or 'code_v2')."
        )
    if len(name) > MAX_EXPERT_NAME_LENGTH:
        raise InvalidConfigError(
            f"{what} {short_repr(name, limit=80)} has {len(name)} characters; the limit is "
            f"{MAX_EXPERT_NAME_LENGTH} (it becomes a folder name and a module attribute). Use a shorter name."
        )
    if name.startswith("_") or name in _RESERVED_NAMES:
        raise InvalidConfigError(
            f"{what} {name!r} is reserved: it is an attribute of torch's module dicts (or starts with '_'), "
            f"so torch and peft cannot use it as an adapter name. Rename it, for example {name.strip('_') + '_expert'!r}."
        )
    return name


def classifier_parameter_count(config: XLoraConfig, *, hidden_size: int, n_layers: int, n_experts: int) -> int:
    """Parameters of the classifier a config describes, by arithmetic (nothing is built)."""
    out_features = n_experts * n_layers if config.layerwise_scalings else n_experts
    if config.xlora_depth <= 1:
        return hidden_size * out_features + out_features
    size = config.xlora_size
    first = hidden_size * size + size
    middle = (config.xlora_depth - 2) * (size * size + size)
    return first + middle + size * out_features + out_features


def check_classifier_size(
    config: XLoraConfig, *, hidden_size: int, n_layers: int, n_experts: int, source: str = "config"
) -> None:
    """Refuse a classifier larger than the bounds above, before it is built or its shapes are listed."""
    for field_name, value, limit in (
        ("hidden_size", hidden_size, MAX_HIDDEN_SIZE),
        ("n_layers", n_layers, MAX_LAYERS),
        ("n_experts", n_experts, MAX_EXPERTS),
    ):
        if value > limit:
            raise InvalidConfigError(
                f"{source}: `{field_name}` is {value:,d}, above the limit of {limit:,d}; this is not a mixture "
                "xlora-hub can build."
            )
    count = classifier_parameter_count(config, hidden_size=hidden_size, n_layers=n_layers, n_experts=n_experts)
    if count > MAX_CLASSIFIER_PARAMETERS:
        raise InvalidConfigError(
            f"{source}: the classifier would have {count:,d} parameters (xlora_depth={config.xlora_depth}, "
            f"xlora_size={config.xlora_size}, hidden_size={hidden_size}, {n_layers} layers, {n_experts} experts), "
            f"above the limit of {MAX_CLASSIFIER_PARAMETERS:,d}. Lower `xlora_size` or `xlora_depth`."
        )


_BOOL_FIELDS = ("enable_softmax", "enable_softmax_topk", "layerwise_scalings", "use_trainable_adapters")
_INT_FIELDS = ("xlora_depth", "xlora_size")
_FLOAT_FIELDS = ("softmax_temperature", "xlora_dropout_p", "global_scaling_weight")


def _check_finite(name: str, value: int | float) -> None:
    """Refuse NaN, infinities and integers too large for a float: each gives NaN logits downstream."""
    try:
        finite = math.isfinite(value)
    except OverflowError:  # an int beyond float range
        finite = False
    if not finite:
        raise InvalidConfigError(f"`{name}` must be a finite number, got {short_repr(value, limit=40)}.")


def check_settings(config: XLoraConfig, *, n_experts: int) -> None:
    """Every field of ``config`` (with ``n_experts`` experts): types, finite values, bounds, classifier size."""
    _check_types(config, n_experts=n_experts)
    _check_bounds(config)
    _check_routing(config, n_experts=n_experts)
    _check_structure(config, n_experts=n_experts)


def _check_types(config: XLoraConfig, *, n_experts: int) -> None:
    """At least one expert; booleans, integers and finite numbers where the fields say so."""
    if n_experts == 0:
        raise InvalidConfigError("An X-LoRA mixture needs at least one expert; `experts` is empty.")
    for name in _BOOL_FIELDS:
        if not isinstance(getattr(config, name), bool):
            raise InvalidConfigError(f"`{name}` must be true or false, got {short_repr(getattr(config, name))}.")
    for name in _INT_FIELDS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidConfigError(f"`{name}` must be an integer, got {short_repr(value)}.")
    for name in _FLOAT_FIELDS:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InvalidConfigError(f"`{name}` must be a number, got {short_repr(value)}.")
        _check_finite(name, value)
    if config.hidden_size is not None and (
        isinstance(config.hidden_size, bool) or not isinstance(config.hidden_size, int) or config.hidden_size <= 0
    ):
        raise InvalidConfigError(f"`hidden_size` must be a positive integer, got {short_repr(config.hidden_size)}.")


def _check_bounds(config: XLoraConfig) -> None:
    """The classifier's depth and width, dropout, temperature and global weight within their ranges."""
    if config.xlora_depth <= 0:
        raise InvalidConfigError(f"`xlora_depth` must be at least 1, got {config.xlora_depth}.")
    if config.xlora_size <= 0:
        raise InvalidConfigError(f"`xlora_size` must be at least 1, got {config.xlora_size}.")
    for name, limit in (("xlora_depth", MAX_XLORA_DEPTH), ("xlora_size", MAX_XLORA_SIZE)):
        if getattr(config, name) > limit:
            raise InvalidConfigError(
                f"`{name}` is {short_repr(getattr(config, name), limit=40)}, above the limit of {limit:,d}; "
                "real classifiers have a depth of 1 to 4 and a width of a few thousand."
            )
    if not 0.0 <= config.xlora_dropout_p < 1.0:
        raise InvalidConfigError(f"`xlora_dropout_p` must be in [0, 1), got {config.xlora_dropout_p}.")
    if config.softmax_temperature <= 0:
        raise InvalidConfigError(
            f"`softmax_temperature` must be > 0, got {config.softmax_temperature}; lower values give sharper routing."
        )
    if config.softmax_temperature < MIN_SOFTMAX_TEMPERATURE:
        raise InvalidConfigError(
            f"`softmax_temperature` is {config.softmax_temperature}, below the minimum of {MIN_SOFTMAX_TEMPERATURE} "
            "(the scaled logits would overflow to NaN); for hard routing use `top_k_lora=1`."
        )
    if abs(config.global_scaling_weight) > MAX_SCALING:
        raise InvalidConfigError(
            f"`global_scaling_weight` is {config.global_scaling_weight}, beyond ±{MAX_SCALING:g}; the outputs "
            "would overflow. Typical values are 0 to 2."
        )


def _check_routing(config: XLoraConfig, *, n_experts: int) -> None:
    """``top_k_lora`` (and the top-k softmax that needs it) and the scaling pass's value."""
    if config.top_k_lora is not None:
        if isinstance(config.top_k_lora, bool) or not isinstance(config.top_k_lora, int):
            raise InvalidConfigError(f"`top_k_lora` must be an integer or null, got {short_repr(config.top_k_lora)}.")
        if not 1 <= config.top_k_lora <= n_experts:
            raise InvalidConfigError(
                f"`top_k_lora` must be between 1 and the number of experts ({n_experts}), "
                f"got {short_repr(config.top_k_lora, limit=40)}."
            )
    if config.enable_softmax_topk and config.top_k_lora is None:
        raise InvalidConfigError("`enable_softmax_topk=True` needs `top_k_lora` to be set (for example 2).")
    if config.scaling_pass_value is not None:
        if isinstance(config.scaling_pass_value, bool) or not isinstance(config.scaling_pass_value, (int, float)):
            raise InvalidConfigError(
                "`scaling_pass_value` must be a number or null (1/n_experts), "
                f"got {short_repr(config.scaling_pass_value)}."
            )
        _check_finite("scaling_pass_value", config.scaling_pass_value)
        if abs(config.scaling_pass_value) > MAX_SCALING:
            raise InvalidConfigError(
                f"`scaling_pass_value` is {config.scaling_pass_value}, beyond ±{MAX_SCALING:g}; the scaling pass "
                "would overflow. Typical values are 0 or 1/n_experts (null)."
            )


def _check_structure(config: XLoraConfig, *, n_experts: int) -> None:
    """The layer names, and the classifier's size from the config (before anything is built)."""
    if config.layer_names is not None:
        if not isinstance(config.layer_names, list) or not all(isinstance(x, str) for x in config.layer_names):
            raise InvalidConfigError("`layer_names` must be a list of module names (strings).")
        if len(config.layer_names) > MAX_LAYERS:
            raise InvalidConfigError(
                f"`layer_names` lists {len(config.layer_names):,d} layers, above the limit of {MAX_LAYERS:,d}."
            )
    if config.hidden_size is not None:
        check_classifier_size(
            config, hidden_size=config.hidden_size, n_layers=len(config.layer_names or [None]), n_experts=n_experts
        )
