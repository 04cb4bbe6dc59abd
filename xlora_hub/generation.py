"""Decoding with X-LoRA: the KV cache of both passes and the routing of each step of ``generate``.

``transformers``' ``generate`` drives the wrapped model step by step, so X-LoRA rides along as two forward hooks
on it, registered once per model and active only during a call: before each step the scaling pass sets the
step's routing (``"dynamic"``, the X-LoRA of the paper and of peft) or the prompt's mean scalings are reused
(``"static"``); after it the routing is cleared. Both passes keep a KV cache, an :class:`~xlora_hub.cache.XLoraCache` (or, for
``cache_implementation="static"``, an :class:`~xlora_hub.cache.XLoraStaticCache`). ``scaling_lookahead`` runs
its own decoding loop instead (:mod:`xlora_hub.lookahead`), through ``generate``'s ``custom_generate``.

:class:`Decoder` is the seam for decoding work (static caches, compiled decode steps): it holds what decoding
remembers for one model and takes the model it decodes as an argument, so it keeps no reference to the model
(no cycle: the model is freed as soon as its last reference goes) and reads only the model's public members.
"""

from __future__ import annotations

import copy
import functools
import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache import CACHE_ARGUMENTS, XLORA_CACHE_TYPES, XLoraCache, XLoraStaticCache, cache_argument, take_xlora_cache
from .lookahead import LOOKAHEAD_MODES, XLoraGenerateOutput, backbone_and_head, lookahead_loop, rows_forward
from .scalings import process_scalings, prompt_mean

if TYPE_CHECKING:  # pragma: no cover
    from .model import XLoraModel

logger = logging.getLogger(__name__)

ROUTING_MODES = ("dynamic", "static")
"""What ``generate(routing=...)`` takes: a scaling pass per step, or the prompt's scalings for every step."""

CACHE_IMPLEMENTATIONS = (None, "dynamic", "static")
"""What ``generate(cache_implementation=...)`` takes on an X-LoRA model: the default (an :class:`XLoraCache`
over ``DynamicCache``) or ``"static"`` (an :class:`XLoraStaticCache` over ``StaticCache``)."""

DEFAULT_MAX_LENGTH = 20
"""``transformers``' own default ``max_length`` when neither it nor ``max_new_tokens`` is set."""


def supports_cache(model: XLoraModel) -> bool:
    """Whether the wrapped model keeps a KV cache X-LoRA can pair with its own (decoder-only generative models)."""
    can_generate = getattr(model.model, "can_generate", None)
    return bool(can_generate and can_generate() and not getattr(model.config, "is_encoder_decoder", False))


def prompt_scalings(model: XLoraModel, model_kwargs: dict[str, Any]) -> torch.Tensor:
    """Processed per-sequence scalings ``[batch, 1, n_layers, n_experts]``: the mean over the prompt's real tokens."""
    model_kwargs = {k: v for k, v in model_kwargs.items() if k not in CACHE_ARGUMENTS}
    mean = prompt_mean(model.compute_scalings(model_kwargs, None), model_kwargs.get("attention_mask"))
    return process_scalings(model.xlora_config, mean)


def cache_implementation(model: XLoraModel, kwargs: dict[str, Any]) -> str | None:
    """Pop ``cache_implementation`` (the call's, else the generation config's): ``None`` (dynamic) or ``"static"``.

    Any other value would make transformers build a cache without the scaling pass's, so it is refused here.
    """
    generation_config = kwargs.get("generation_config") or model.generation_config
    value = kwargs.pop("cache_implementation", None)
    if value is None:
        value = getattr(generation_config, "cache_implementation", None)
        if value is not None and generation_config is not None:
            generation_config = kwargs["generation_config"] = copy.copy(generation_config)
            generation_config.cache_implementation = None  # we build the cache it asks for
    if value not in CACHE_IMPLEMENTATIONS:
        raise ValueError(
            f"X-LoRA generation supports `cache_implementation` 'dynamic' (the default) or 'static', got {value!r}; "
            "the scaling pass keeps its own cache beside the real pass's, which only those two pair. Pass one of them."
        )
    if value == "static" and not supports_cache(model):
        raise ValueError(
            f'`cache_implementation="static"` needs a decoder-only generative model with a KV cache; '
            f"{type(model.model).__name__} has none. Generate without `cache_implementation`."
        )
    if value == "static" and not getattr(type(model.model), "_supports_default_dynamic_cache", lambda: True)():
        raise ValueError(
            f'`cache_implementation="static"`: {type(model.model).__name__} keeps its own kind of cache, not '
            "transformers' StaticCache. Generate without `cache_implementation`."
        )
    return None if value == "dynamic" else value


def with_acceptance(output: Any) -> Any:
    """A decoder-only ``generate`` output as :class:`XLoraGenerateOutput` (``lookahead_acceptance=None``: the plain
    path), so that every X-LoRA output carries the field; tensors and other outputs pass unchanged."""
    if type(output) is GenerateDecoderOnlyOutput:
        return XLoraGenerateOutput(**dict(output.items()), lookahead_acceptance=None)
    return output


def check_lookahead(model: XLoraModel, routing: str, kwargs: dict[str, Any]) -> None:
    """Refuse what ``scaling_lookahead`` cannot do, naming the option and the way out."""
    config = kwargs.get("generation_config") or model.generation_config
    beams = kwargs.get("num_beams", getattr(config, "num_beams", 1)) or 1
    refusals = {
        "beam search (`num_beams > 1`)": beams > 1,
        '`routing="static"` (it has no scaling pass per token to look ahead)': routing != "dynamic",
        "an assistant model": kwargs.get("assistant_model") is not None,
        "`inputs_embeds` (it feeds token ids to both passes)": kwargs.get("inputs_embeds") is not None,
        "a streamer": kwargs.get("streamer") is not None,
        "`output_attentions` / `output_hidden_states`": bool(
            kwargs.get("output_attentions", getattr(config, "output_attentions", False))
            or kwargs.get("output_hidden_states", getattr(config, "output_hidden_states", False))
        ),
        "a model without a KV cache": not supports_cache(model),
    }
    if supports_cache(model):
        backbone_and_head(model.model)  # refuses a model whose logits are more than its LM head's
    for what, refused in refusals.items():
        if refused:
            raise ValueError(
                f"`scaling_lookahead` does not support {what}; generate with `scaling_lookahead=False` (the same "
                "tokens, two passes per token)."
            )


def generation_length(model: XLoraModel, args: tuple, kwargs: dict[str, Any]) -> int:
    """The most tokens one ``generate`` call can hold in its cache: the prompt plus ``max_new_tokens`` (or
    ``max_length``), at least ``max_cache_len`` when given."""
    config = kwargs.get("generation_config") or model.generation_config
    ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
    embeds = kwargs.get("inputs_embeds")
    prompt = ids.shape[-1] if ids is not None else (embeds.shape[1] if embeds is not None else 1)
    max_new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
    if max_new is not None:
        length = prompt + int(max_new)
    else:
        length = int(kwargs.get("max_length", getattr(config, "max_length", None)) or DEFAULT_MAX_LENGTH)
    floor = kwargs.get("max_cache_len", getattr(config, "max_cache_len", None))
    return max(length, int(floor or 0))


class _StepRouting:
    """The two forward hooks that route each step ``generate`` runs on the wrapped model.

    Registered once per model (on its first ``generate``) and active only during a call (:meth:`start` /
    :meth:`stop`): the same hook objects at every call, so a compiled decode step (transformers' auto-compile
    guards on the module's hooks) is captured once, not once per call. Between calls they hold no model.
    """

    def __init__(self) -> None:
        self.model: XLoraModel | None = None
        self.routing = "dynamic"
        self.static: torch.Tensor | None = None  # "static": the prompt's scalings, computed at the first step

    def start(self, model: XLoraModel, routing: str) -> None:
        self.model, self.routing, self.static = model, routing, None

    def stop(self) -> None:
        self.model, self.static = None, None

    def before(self, module: nn.Module, hook_args: tuple, hook_kwargs: dict[str, Any]) -> None:
        """Set this step's routing: from the scaling pass over the step's tokens, or the prompt's (static)."""
        model = self.model
        if model is None:  # a forward outside generate (e.g. XLoraModel.forward's real pass)
            return
        model_kwargs = dict(hook_kwargs)
        if hook_args:
            model_kwargs["input_ids"] = hook_args[0]
        if self.routing == "static":
            if self.static is None:
                self.static = prompt_scalings(model, model_kwargs)
            model.routing.scalings = self.static
            return
        past = next((model_kwargs[n] for n in CACHE_ARGUMENTS if model_kwargs.get(n) is not None), None)
        if past is not None and not isinstance(past, XLORA_CACHE_TYPES):
            raise TypeError(
                f"X-LoRA generation got a {type(past).__name__} instead of its XLoraCache (a `cache_implementation` "
                "other than 'dynamic' or 'static'?); the scaling pass would lose its past tokens. Use the "
                'default cache, `cache_implementation="static"` or `use_cache=False`.'
            )
        scalings = model.compute_scalings(model_kwargs, past)
        model.routing.scalings = process_scalings(model.xlora_config, scalings)

    def after(self, module: nn.Module, hook_args: tuple, hook_kwargs: dict[str, Any], output: Any) -> None:
        """Clear the routing once the step has run (also when it raised)."""
        if self.model is not None:
            self.model.routing.scalings = None


class Decoder:
    """What decoding remembers for one :class:`~xlora_hub.model.XLoraModel`; every method takes that model.

    ``cache_argument`` is the name under which the wrapped model takes its KV cache (read once from its
    ``forward``); the no-cache warning is said once per model.
    """

    def __init__(self, wrapped: nn.Module) -> None:
        self.cache_argument = cache_argument(wrapped)
        self.warned_no_cache = False
        self.static_cache_length = 0  # the longest static cache made so far (transformers keeps the same)
        self.hooks: _StepRouting | None = None
        self.compiled_rows: dict[str, Any] = {}  # look-ahead's compiled step, per compile setting

    def prepare_cache(self, model: XLoraModel, model_kwargs: dict[str, Any]) -> XLoraCache | None:
        """Pick the cache of one forward (in ``model_kwargs``): the caller's XLoraCache, a new one, or none."""
        past = take_xlora_cache(model_kwargs, self.cache_argument)
        if past is not None:
            model_kwargs[self.cache_argument] = past
            return past
        use_cache = model_kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(model.config, "use_cache", False))
        if use_cache and supports_cache(model):
            cache = XLoraCache(config=model.config)
            model_kwargs[self.cache_argument] = cache
            return cache
        model_kwargs[self.cache_argument] = None
        return None

    def _use_cache(self, model: XLoraModel, kwargs: dict[str, Any]) -> bool:
        """Whether ``generate`` runs with a KV cache, as transformers decides it; warns when the model's own
        generation config (not the caller) turned it off."""
        generation_config = kwargs.get("generation_config") or model.generation_config
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(generation_config, "use_cache", None)
        if use_cache is None:  # transformers' own default: generate with a cache
            use_cache = True
        if not use_cache and kwargs.get("use_cache") is None and kwargs.get("generation_config") is None:
            self.warn_no_cache(model)
        return bool(use_cache)

    def new_cache(
        self, model: XLoraModel, args: tuple, kwargs: dict[str, Any], implementation: str | None
    ) -> XLoraCache | XLoraStaticCache:
        """The cache of one ``generate`` call: dynamic, or static sized for the whole call (as transformers sizes
        its own ``StaticCache``: prompt plus new tokens, never shrinking between calls so compiled steps are reused)."""
        if implementation != "static":
            return XLoraCache(config=model.config)
        length = max(generation_length(model, args, kwargs), self.static_cache_length)
        self.static_cache_length = length
        return XLoraStaticCache(config=model.config, max_cache_len=length)

    def generate(
        self,
        model: XLoraModel,
        *args: Any,
        routing: str = "dynamic",
        scaling_lookahead: bool | str = False,
        **kwargs: Any,
    ):
        """``model.model.generate`` with X-LoRA routing every step (see :meth:`XLoraModel.generate`)."""
        if routing not in ROUTING_MODES:
            raise ValueError(f"`routing` must be 'dynamic' or 'static', got {routing!r}.")
        if not any(scaling_lookahead is mode for mode in LOOKAHEAD_MODES[:2]) and scaling_lookahead != "auto":
            raise ValueError(f"`scaling_lookahead` must be True, False or 'auto', got {scaling_lookahead!r}.")
        model.lookahead_acceptance = None
        if not model.adapters_enabled:
            return model.model.generate(*args, **kwargs)
        if scaling_lookahead:
            check_lookahead(model, routing, kwargs)
        implementation = cache_implementation(model, kwargs)
        use_cache = self._use_cache(model, kwargs)
        past = take_xlora_cache(kwargs, self.cache_argument)
        if past is not None and implementation is not None:
            raise ValueError(
                f"Pass either a cache or `cache_implementation={implementation!r}` to generate, not both (the cache "
                "given would be replaced)."
            )
        if past is None and use_cache and supports_cache(model):
            past = self.new_cache(model, args, kwargs, implementation)
        if past is not None:
            kwargs[self.cache_argument] = past
        for layer in model.xlora_layers:  # built before a compiled step captures them
            layer.prepare_stack()
        fixed = model.routing.stacks_fixed
        model.routing.stacks_fixed = True  # no expert changes inside one call: the layers skip their version check
        try:
            return self._generate(model, args, kwargs, routing=routing, scaling_lookahead=scaling_lookahead, past=past)
        finally:
            model.routing.stacks_fixed = fixed

    def _generate(
        self,
        model: XLoraModel,
        args: tuple,
        kwargs: dict[str, Any],
        *,
        routing: str,
        scaling_lookahead: bool | str,
        past: XLoraCache | XLoraStaticCache | None,
    ):
        """The decoding loop of :meth:`generate` once the cache is chosen: look-ahead's or transformers' own."""
        if scaling_lookahead:
            if past is None:
                raise ValueError(
                    "`scaling_lookahead` needs the KV cache (it batches the cached passes); drop `use_cache=False`."
                )
            if past.get_seq_length() != 0:
                raise ValueError(
                    "`scaling_lookahead` starts from an empty cache (it builds its own layout of both passes); pass "
                    "no cache, or generate without `scaling_lookahead` to continue from a filled one."
                )
            method = functools.partial(lookahead_loop, xlora=model, mode=scaling_lookahead)
            try:
                return model.model.generate(*args, custom_generate=method, **kwargs)
            finally:
                model.routing.scalings = None
        hooks = self.step_routing(model)
        hooks.start(model, routing)
        try:
            return with_acceptance(model.model.generate(*args, **kwargs))
        finally:
            hooks.stop()
            model.routing.scalings = None

    def compiled_rows_forward(self, compile_config: Any):
        """:func:`~xlora_hub.lookahead.rows_forward` compiled with ``compile_config`` (kept: one capture per
        setting, reused by every look-ahead call over a static cache)."""
        key = repr(sorted(compile_config.to_dict().items()))
        if key not in self.compiled_rows:
            self.compiled_rows[key] = torch.compile(rows_forward, **compile_config.to_dict())
        return self.compiled_rows[key]

    def step_routing(self, model: XLoraModel) -> _StepRouting:
        """The routing hooks on the wrapped model, registered on the first call and kept (inactive between calls)."""
        if self.hooks is None:
            self.hooks = _StepRouting()
            model.model.register_forward_pre_hook(self.hooks.before, with_kwargs=True)
            model.model.register_forward_hook(self.hooks.after, with_kwargs=True, always_call=True)
        return self.hooks

    def warn_no_cache(self, model: XLoraModel) -> None:
        """Say once per model that generation runs without a KV cache because the model's own config turned it off.

        peft's X-LoRA needs ``use_cache=False`` in the base model's config, so models prepared for it carry that
        setting into their generation config; X-LoRA here keeps its own two-pass cache, so generation can use it.
        """
        if self.warned_no_cache or not supports_cache(model):
            return
        self.warned_no_cache = True
        logger.warning(
            "Generating without a KV cache (about 4x slower) because the base model's generation config has "
            "use_cache=False (peft's X-LoRA requires that setting; xlora-hub does not). Pass `use_cache=True` to "
            "generate, or set `model.generation_config.use_cache = True`, to generate with the cache."
        )


__all__ = ["CACHE_IMPLEMENTATIONS", "ROUTING_MODES", "Decoder", "prompt_scalings", "supports_cache"]
