"""Decoding with X-LoRA: the KV cache of both passes and the routing of each step of ``generate``.

``transformers``' ``generate`` drives the wrapped model step by step, so X-LoRA rides along as two forward hooks
on it, registered once per call: before each step the scaling pass sets the step's routing (``"dynamic"``, the
X-LoRA of the paper and of peft) or the prompt's mean scalings are reused (``"static"``); after it the routing
is cleared. Both passes keep a KV cache, an :class:`~xlora_hub.cache.XLoraCache`.

:class:`Decoder` is the seam for decoding work (static caches, compiled decode steps): it holds what decoding
remembers for one model and takes the model it decodes as an argument, so it keeps no reference to the model
(no cycle: the model is freed as soon as its last reference goes) and reads only the model's public members.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .cache import CACHE_ARGUMENTS, XLoraCache, cache_argument, take_xlora_cache
from .scalings import process_scalings, prompt_mean

if TYPE_CHECKING:  # pragma: no cover
    from .model import XLoraModel

logger = logging.getLogger(__name__)

ROUTING_MODES = ("dynamic", "static")
"""What ``generate(routing=...)`` takes: a scaling pass per step, or the prompt's scalings for every step."""


def supports_cache(model: XLoraModel) -> bool:
    """Whether the wrapped model keeps a KV cache X-LoRA can pair with its own (decoder-only generative models)."""
    can_generate = getattr(model.model, "can_generate", None)
    return bool(can_generate and can_generate() and not getattr(model.config, "is_encoder_decoder", False))


def prompt_scalings(model: XLoraModel, model_kwargs: dict[str, Any]) -> torch.Tensor:
    """Processed per-sequence scalings ``[batch, 1, n_layers, n_experts]``: the mean over the prompt's real tokens."""
    model_kwargs = {k: v for k, v in model_kwargs.items() if k not in CACHE_ARGUMENTS}
    mean = prompt_mean(model.compute_scalings(model_kwargs, None), model_kwargs.get("attention_mask"))
    return process_scalings(model.xlora_config, mean)


class _StepRouting:
    """The two forward hooks that route each step ``generate`` runs on the wrapped model."""

    def __init__(self, model: XLoraModel, routing: str) -> None:
        self.model = model
        self.routing = routing
        self.static: torch.Tensor | None = None  # "static": the prompt's scalings, computed at the first step

    def before(self, module: nn.Module, hook_args: tuple, hook_kwargs: dict[str, Any]) -> None:
        """Set this step's routing: from the scaling pass over the step's tokens, or the prompt's (static)."""
        model_kwargs = dict(hook_kwargs)
        if hook_args:
            model_kwargs["input_ids"] = hook_args[0]
        if self.routing == "static":
            if self.static is None:
                self.static = prompt_scalings(self.model, model_kwargs)
            self.model.routing.scalings = self.static
            return
        past = next((model_kwargs[n] for n in CACHE_ARGUMENTS if model_kwargs.get(n) is not None), None)
        if past is not None and not isinstance(past, XLoraCache):
            raise TypeError(
                f"X-LoRA generation got a {type(past).__name__} instead of its XLoraCache (a `cache_implementation` "
                "other than the default dynamic cache?); the scaling pass would lose its past tokens. Use the "
                "default cache or `use_cache=False`."
            )
        scalings = self.model.compute_scalings(model_kwargs, past)
        self.model.routing.scalings = process_scalings(self.model.xlora_config, scalings)

    def after(self, module: nn.Module, hook_args: tuple, hook_kwargs: dict[str, Any], output: Any) -> None:
        """Clear the routing once the step has run (also when it raised)."""
        self.model.routing.scalings = None


class Decoder:
    """What decoding remembers for one :class:`~xlora_hub.model.XLoraModel`; every method takes that model.

    ``cache_argument`` is the name under which the wrapped model takes its KV cache (read once from its
    ``forward``); the no-cache warning is said once per model.
    """

    def __init__(self, wrapped: nn.Module) -> None:
        self.cache_argument = cache_argument(wrapped)
        self.warned_no_cache = False

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

    def generate(self, model: XLoraModel, *args: Any, routing: str = "dynamic", **kwargs: Any):
        """``model.model.generate`` with X-LoRA routing every step (see :meth:`XLoraModel.generate`)."""
        if routing not in ROUTING_MODES:
            raise ValueError(f"`routing` must be 'dynamic' or 'static', got {routing!r}.")
        if not model.adapters_enabled:
            return model.model.generate(*args, **kwargs)
        use_cache = self._use_cache(model, kwargs)
        past = take_xlora_cache(kwargs, self.cache_argument)
        if past is None and use_cache and supports_cache(model):
            past = XLoraCache(config=model.config)
        if past is not None:
            kwargs[self.cache_argument] = past
        hooks = _StepRouting(model, routing)
        pre = model.model.register_forward_pre_hook(hooks.before, with_kwargs=True)
        post = model.model.register_forward_hook(hooks.after, with_kwargs=True, always_call=True)
        try:
            return model.model.generate(*args, **kwargs)
        finally:
            pre.remove()
            post.remove()
            model.routing.scalings = None

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


__all__ = ["ROUTING_MODES", "Decoder", "prompt_scalings", "supports_cache"]
