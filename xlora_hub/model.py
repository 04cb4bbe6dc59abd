"""``XLoraModel``: a transformers model, its LoRA experts, and the gating classifier.

Every forward runs two passes. The scaling pass (no gradients) gives the last hidden state; the
classifier turns it into per-token expert scalings; the real pass runs with the experts weighted
by them. The scalings reach the X-LoRA layers through one :class:`~xlora_hub.layers.RoutingState`
owned by the model: set before a pass, cleared after.

Both passes keep a KV cache (:class:`~xlora_hub.cache.XLoraCache`): the scaling pass is causal, so
the scalings of past tokens never change and generation is linear in the number of new tokens.

The Hub methods (``from_pretrained``, ``save_pretrained``, ``push_to_hub``) live in
:mod:`xlora_hub.hub`; the thin methods here only forward to it, so this module knows nothing of the
Hub.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .cache import CACHE_ARGUMENTS, XLoraCache, cache_argument, take_xlora_cache
from .classifier import XLoraClassifier
from .config import BaseModelRef, ExpertRef, XLoraConfig
from .errors import IncompatibleExpertError, InvalidConfigError, InvalidMixtureError
from .experts import ResolvedExpert, cached_commit_sha, check_expert_matches_model, resolve_expert
from .finite import first_non_finite
from .layers import SUPPORTED_LORA_LAYERS, RoutingState, XLoraLayer, wrap_lora_layer

logger = logging.getLogger(__name__)


class _Unset:
    """Type of :data:`_UNSET`, the "option not given" default of :meth:`XLoraModel.routing_options`."""

    def __repr__(self) -> str:
        return "<not given>"


_UNSET = _Unset()

# Arguments of the real pass that the scaling pass must not see (it only needs the last hidden state).
_REAL_PASS_ONLY = frozenset(
    {
        "labels",
        "output_hidden_states",
        "output_attentions",
        "return_dict",
        "logits_to_keep",
        "num_logits_to_keep",
        *CACHE_ARGUMENTS,
        "use_cache",
        "return_loss",
    }
)


def _hidden_size(model: nn.Module) -> int:
    config = model.config
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text_config, attr, None)
        if isinstance(value, int):
            return value
    raise InvalidConfigError(
        f"Cannot read the hidden size of {type(model).__name__} from its config; set `hidden_size` in XLoraConfig."
    )


def _check_hidden_size(model: nn.Module, config: XLoraConfig) -> int:
    hidden_size = _hidden_size(model)
    if config.hidden_size is not None and config.hidden_size != hidden_size:
        raise InvalidMixtureError(
            f"The mixture was made for hidden size {config.hidden_size} but the base model "
            f"({type(model).__name__}) has hidden size {hidden_size}: load it on its own base model."
        )
    return hidden_size


def _base_model_ref(model: nn.Module) -> BaseModelRef | None:
    name = getattr(model, "name_or_path", None) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not name:
        return None
    if os.path.isdir(os.path.expanduser(str(name))):
        # a local folder: recorded absolute, so the mixture does not depend on the directory it was made from
        return BaseModelRef(repo_id=os.path.abspath(os.path.expanduser(str(name))))
    revision = getattr(getattr(model, "config", None), "_commit_hash", None) or cached_commit_sha(str(name))
    return BaseModelRef(repo_id=str(name), revision=revision or None)


class XLoraModel(nn.Module):
    """An X-LoRA mixture of LoRA experts over a ``transformers`` model.

    Build one with :meth:`from_experts` (new mixture) or :meth:`from_pretrained` (saved mixture).
    ``model.model`` is the wrapped ``transformers`` model, ``model.classifier`` the gating MLP and
    ``model.xlora_config`` the settings; ``model.config`` is the base model's config, as
    ``transformers`` code expects.
    """

    def __init__(
        self,
        model: nn.Module,
        xlora_config: XLoraConfig,
        *,
        experts: list[ResolvedExpert],
        peft_model: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        object.__setattr__(self, "_peft_model", peft_model)
        self.experts: list[ResolvedExpert] = list(experts)
        self.routing = RoutingState()
        self._disabled = False
        self._latest_scalings: torch.Tensor | None = None
        self._scalings_logging = False
        self._scalings_log: list[torch.Tensor] = []
        self._cache_argument = cache_argument(model)
        self._warned_no_cache = False

        names = xlora_config.expert_names
        self.xlora_layers: list[XLoraLayer] = []
        targets = [(n, m) for n, m in model.named_modules() if isinstance(m, LoraLayer)]
        if not targets:
            raise IncompatibleExpertError("None of the experts adapts any layer of this base model.")
        for index, (module_name, module) in enumerate(targets):
            wrapper = wrap_lora_layer(
                module, layer_index=index, expert_names=names, routing=self.routing, module_name=module_name
            )
            parent_name, _, child_name = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child_name, wrapper)
            self.xlora_layers.append(wrapper)
        layer_names = [w.module_name for w in self.xlora_layers]
        if xlora_config.layer_names is not None and xlora_config.layer_names != layer_names:
            raise InvalidMixtureError(_layer_mismatch_message(xlora_config.layer_names, layer_names))
        hidden_size = _check_hidden_size(model, xlora_config)
        param = next(model.parameters())
        self.classifier = XLoraClassifier(  # holds the config: see the `xlora_config` property
            xlora_config.replace(layer_names=layer_names, hidden_size=hidden_size),
            hidden_size=hidden_size,
            n_layers=len(self.xlora_layers),
            n_experts=len(names),
            dtype=param.dtype if param.is_floating_point() else None,
            device=param.device,
        )
        self._apply_trainability()
        self.eval()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_experts(
        cls,
        base_model: nn.Module,
        config: XLoraConfig | Mapping[str, Any],
        *,
        device: torch.device | str | None = None,
        torch_dtype: torch.dtype | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        base_dir: str | os.PathLike[str] | None = None,
        upcast_experts: bool = False,
    ) -> XLoraModel:
        """A new mixture with an untrained classifier, from a base model and the experts named in ``config``.

        Experts may be local peft adapter folders or Hub repos (``owner/name[@revision][:subfolder]``);
        ``token``, ``cache_dir``, ``local_files_only`` and ``force_download`` apply to their download.
        Every expert is checked (plain LoRA, target modules and sizes that fit the base model) before
        the base model is modified. Experts are kept in the base model's dtype unless
        ``upcast_experts=True`` (float32).
        """
        if not isinstance(config, XLoraConfig):
            config = XLoraConfig(**dict(config))
        if config.base_model is None:
            config = config.replace(base_model=_base_model_ref(base_model))
        resolved = [
            resolve_expert(
                name,
                ref,
                base_dir=base_dir,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                force_download=force_download,
            )
            for name, ref in config.experts.items()
        ]
        _check_hidden_size(base_model, config)
        for expert in resolved:  # the adapter config, then its tensors' header against it and the model
            check_expert_matches_model(expert, base_model)
        if device is not None or torch_dtype is not None:
            base_model.to(device=device, dtype=torch_dtype)
        return cls._build(base_model, config, resolved, upcast_experts=upcast_experts)

    @classmethod
    def _build(
        cls, base_model: nn.Module, config: XLoraConfig, resolved: list[ResolvedExpert], *, upcast_experts: bool
    ) -> XLoraModel:
        from peft import PeftModel

        trainable = config.use_trainable_adapters
        peft_model = None
        try:
            for i, expert in enumerate(resolved):
                kwargs = dict(adapter_name=expert.name, is_trainable=trainable, autocast_adapter_dtype=False)
                if i == 0:
                    peft_model = PeftModel.from_pretrained(base_model, str(expert.local_dir), **kwargs)
                else:
                    peft_model.load_adapter(str(expert.local_dir), **kwargs)
            hf_model = peft_model.base_model.model
            dtype = torch.float32 if upcast_experts else next(base_model.parameters()).dtype
            for module_name, module in hf_model.named_modules():
                if isinstance(module, SUPPORTED_LORA_LAYERS):
                    _check_expert_factors_finite(module_name, module)
                    for name, param in module.named_parameters():
                        if "lora_" in name and param.is_floating_point() and param.dtype != dtype:
                            param.data = param.data.to(dtype)
            return cls(hf_model, config, experts=resolved, peft_model=peft_model)
        except Exception:
            if peft_model is not None:  # leave the caller's base model as it was
                with contextlib.suppress(Exception):
                    _restore_peft_layers(peft_model.base_model.model)
                    peft_model.base_model.unload()
            raise

    def _apply_trainability(self) -> None:
        train_experts = self.xlora_config.use_trainable_adapters
        for name, param in self.model.named_parameters():
            param.requires_grad = train_experts and ("lora_" in name)
        for param in self.classifier.parameters():
            param.requires_grad = True

    # ------------------------------------------------------------------ properties
    @property
    def config(self):
        """The base model's ``transformers`` config (``xlora_config`` holds the X-LoRA settings)."""
        return self.model.config

    @property
    def xlora_config(self) -> XLoraConfig:
        """The mixture's settings. Kept in one place, the classifier's ``config`` (which its softmax reads), so
        the setters below and :meth:`routing_options` change the temperature everywhere at once."""
        return self.classifier.config

    @xlora_config.setter
    def xlora_config(self, config: XLoraConfig) -> None:
        self.classifier.config = config

    @property
    def generation_config(self):
        return getattr(self.model, "generation_config", None)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    @property
    def expert_names(self) -> list[str]:
        return self.xlora_config.expert_names

    @property
    def n_experts(self) -> int:
        return self.xlora_config.n_experts

    @property
    def layer_names(self) -> list[str]:
        return [layer.module_name for layer in self.xlora_layers]

    @property
    def n_layers(self) -> int:
        return len(self.xlora_layers)

    @property
    def peft_model(self):
        """The ``peft.PeftModel`` that loaded the experts (shares every weight with this model)."""
        return self._peft_model

    # ------------------------------------------------------------------ routing
    @contextlib.contextmanager
    def _routing(self, scalings: torch.Tensor | None) -> Iterator[None]:
        previous = self.routing.scalings
        self.routing.scalings = scalings
        try:
            yield
        finally:
            self.routing.scalings = previous

    def _process_scalings(self, scalings: torch.Tensor) -> torch.Tensor:
        """Apply top-k, the top-k softmax and the global weight (as peft does in each layer), once per pass."""
        config = self.xlora_config
        if not config.layerwise_scalings:
            scalings = scalings[:, :, :1, :]
        if config.top_k_lora is not None:
            _, top = torch.topk(scalings, k=config.top_k_lora, dim=-1)
            mask = torch.zeros_like(scalings, dtype=torch.bool).scatter_(-1, top, True)
            scalings = scalings * mask.to(scalings.dtype)
        if config.enable_softmax_topk:
            nonzero = scalings != 0
            scalings = torch.softmax(scalings.masked_fill(~nonzero, float("-inf")), dim=-1).masked_fill(~nonzero, 0.0)
        if config.global_scaling_weight != 1:
            scalings = scalings * config.global_scaling_weight
        return scalings

    def _scaling_pass_scalings(self) -> torch.Tensor | None:
        value = self.xlora_config.resolved_scaling_pass_value()
        if value == 0:
            return None  # exactly the base model: no expert math at all
        n_layers = self.n_layers if self.xlora_config.layerwise_scalings else 1
        dummy = torch.full((1, 1, n_layers, self.n_experts), value, dtype=self.classifier.last_layer.weight.dtype)
        return self._process_scalings(dummy.to(self.device))

    def _last_hidden_state(self, model_kwargs: dict[str, Any], cache: XLoraCache | None) -> torch.Tensor:
        kwargs = {k: v for k, v in model_kwargs.items() if k not in _REAL_PASS_ONLY}
        if cache is not None:
            kwargs[self._cache_argument] = cache.scaling_cache
            kwargs["use_cache"] = True
        elif self._supports_cache():
            kwargs["use_cache"] = False
        backbone = getattr(self.model, "base_model", self.model)
        with torch.no_grad(), self._routing(self._scaling_pass_scalings()):
            if backbone is not self.model:
                return backbone(**kwargs, return_dict=True).last_hidden_state
            return self.model(**kwargs, output_hidden_states=True, return_dict=True).hidden_states[-1]

    def _supports_cache(self) -> bool:
        can_generate = getattr(self.model, "can_generate", None)
        return bool(can_generate and can_generate() and not getattr(self.config, "is_encoder_decoder", False))

    def _prepare_cache(self, model_kwargs: dict[str, Any]) -> XLoraCache | None:
        """Pick the cache of this call: the caller's XLoraCache, a new one, or none."""
        past = take_xlora_cache(model_kwargs, self._cache_argument)
        if past is not None:
            model_kwargs[self._cache_argument] = past
            return past
        use_cache = model_kwargs.get("use_cache")
        if use_cache is None:
            use_cache = bool(getattr(self.config, "use_cache", False))
        if use_cache and self._supports_cache():
            cache = XLoraCache(config=self.config)
            model_kwargs[self._cache_argument] = cache
            return cache
        model_kwargs[self._cache_argument] = None
        return None

    def compute_scalings(self, model_kwargs: dict[str, Any], cache: XLoraCache | None = None) -> torch.Tensor:
        """Run the scaling pass and the classifier: scalings ``[batch, seq, n_layers, n_experts]``."""
        hidden = self._last_hidden_state(model_kwargs, cache)
        scalings = self.classifier(hidden)
        self._latest_scalings = scalings
        if self._scalings_logging:
            self._scalings_log.append(scalings.detach())
        return scalings

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        **kwargs: Any,
    ):
        """The two passes; takes and returns what the wrapped ``transformers`` model does.

        The KV cache (``cache``, or ``past_key_values`` as before transformers 5.24) must be an
        :class:`XLoraCache` (one is made when ``use_cache`` is on) so that the scaling pass keeps its own cache.
        """
        # The common arguments are named (not only in **kwargs) so that `transformers.Trainer` finds
        # `labels` and keeps these dataset columns, as it does for the wrapped model.
        for name, value in (("input_ids", input_ids), ("attention_mask", attention_mask), ("labels", labels)):
            if value is not None:
                kwargs[name] = value
        if self._disabled:
            return self.model(**kwargs)
        cache = self._prepare_cache(kwargs)
        scalings = self.compute_scalings(kwargs, cache)
        with self._routing(self._process_scalings(scalings)):
            return self.model(**kwargs)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, *args: Any, routing: str = "dynamic", **kwargs: Any):
        """``transformers`` generation with X-LoRA, KV-cached in both passes unless ``use_cache=False``.

        Takes every argument of ``model.generate`` (greedy, sampling, beam search, ``max_new_tokens``,
        ``eos_token_id``, left-padded batches...).

        ``routing="static"`` runs the scaling pass once, on the prompt, and routes every token of each
        sequence with the prompt's mean scalings: generation then costs about one pass per token. It
        changes the outputs (the default, ``"dynamic"``, is the X-LoRA of the paper and of peft).
        """
        if routing not in ("dynamic", "static"):
            raise ValueError(f"`routing` must be 'dynamic' or 'static', got {routing!r}.")
        if self._disabled:
            return self.model.generate(*args, **kwargs)
        generation_config = kwargs.get("generation_config") or self.generation_config
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(generation_config, "use_cache", None)
        if use_cache is None:  # transformers' own default: generate with a cache
            use_cache = True
        if not use_cache and kwargs.get("use_cache") is None and kwargs.get("generation_config") is None:
            self._warn_no_cache()
        past = take_xlora_cache(kwargs, self._cache_argument)
        if past is None and use_cache and self._supports_cache():
            past = XLoraCache(config=self.config)
        if past is not None:
            kwargs[self._cache_argument] = past
        static: list[torch.Tensor] = []

        def before(module: nn.Module, hook_args: tuple, hook_kwargs: dict[str, Any]):
            model_kwargs = dict(hook_kwargs)
            if hook_args:
                model_kwargs["input_ids"] = hook_args[0]
            if routing == "static":
                if not static:
                    static.append(self._prompt_scalings(model_kwargs))
                self.routing.scalings = static[0]
                return
            past = next((model_kwargs[n] for n in CACHE_ARGUMENTS if model_kwargs.get(n) is not None), None)
            if past is not None and not isinstance(past, XLoraCache):
                raise TypeError(
                    f"X-LoRA generation got a {type(past).__name__} instead of its XLoraCache (a `cache_implementation` "
                    "other than the default dynamic cache?); the scaling pass would lose its past tokens. Use the "
                    "default cache or `use_cache=False`."
                )
            scalings = self.compute_scalings(model_kwargs, past)
            self.routing.scalings = self._process_scalings(scalings)

        def after(module: nn.Module, hook_args: tuple, hook_kwargs: dict[str, Any], output: Any):
            self.routing.scalings = None

        pre = self.model.register_forward_pre_hook(before, with_kwargs=True)
        post = self.model.register_forward_hook(after, with_kwargs=True, always_call=True)
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            pre.remove()
            post.remove()
            self.routing.scalings = None

    def _warn_no_cache(self) -> None:
        """Say once per model that generation runs without a KV cache because the model's own config turned it off.

        peft's X-LoRA needs ``use_cache=False`` in the base model's config, so models prepared for it carry that
        setting into their generation config; X-LoRA here keeps its own two-pass cache, so generation can use it.
        """
        if self._warned_no_cache or not self._supports_cache():
            return
        self._warned_no_cache = True
        logger.warning(
            "Generating without a KV cache (about 4x slower) because the base model's generation config has "
            "use_cache=False (peft's X-LoRA requires that setting; xlora-hub does not). Pass `use_cache=True` to "
            "generate, or set `model.generation_config.use_cache = True`, to generate with the cache."
        )

    def _prompt_scalings(self, model_kwargs: dict[str, Any]) -> torch.Tensor:
        """Processed per-sequence scalings ``[batch, 1, n_layers, n_experts]``: the mean over the prompt's real tokens."""
        model_kwargs = {k: v for k, v in model_kwargs.items() if k not in CACHE_ARGUMENTS}
        scalings = self.compute_scalings(model_kwargs, None)
        mask = model_kwargs.get("attention_mask")
        if mask is None or mask.dim() != 2:
            mean = scalings.mean(dim=1, keepdim=True)
        else:
            weights = mask[:, -scalings.shape[1] :].to(scalings.dtype)[:, :, None, None]
            mean = (scalings * weights).sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp_min(1)
        return self._process_scalings(mean)

    # ------------------------------------------------------------------ control API (peft's names)
    def set_topk_lora(self, value: int | None) -> None:
        """Keep only the ``value`` largest scalings of each token (``None``: dense)."""
        self.xlora_config = self.xlora_config.replace(top_k_lora=value)

    def set_global_scaling_weight(self, weight: float) -> None:
        """Multiply every expert's output in the real pass by ``weight``."""
        self.xlora_config = self.xlora_config.replace(global_scaling_weight=float(weight))

    def get_global_scaling_weight(self) -> float:
        return self.xlora_config.global_scaling_weight

    def set_scaling_pass_value(self, value: float | None) -> None:
        """Scaling of every expert in the scaling pass; ``None`` means 1/n_experts, 0 skips the experts."""
        self.xlora_config = self.xlora_config.replace(scaling_pass_value=value)

    def set_softmax_temperature(self, temperature: float) -> None:
        """Temperature of the classifier's softmax (lower gives sharper routing)."""
        self.xlora_config = self.xlora_config.replace(softmax_temperature=float(temperature))

    @contextlib.contextmanager
    def routing_options(
        self,
        *,
        top_k_lora: int | None | _Unset = _UNSET,
        global_scaling_weight: float | _Unset = _UNSET,
        softmax_temperature: float | _Unset = _UNSET,
    ) -> Iterator[XLoraConfig]:
        """Context manager: routing settings for the ``with`` block only, then the previous values again.

        Only the options given change (``top_k_lora=None`` means dense, as in :meth:`set_topk_lora`). All of
        them are validated together before any is applied, like the setters, so a bad value raises
        :class:`~xlora_hub.errors.InvalidConfigError` with nothing changed. On exit, even by an exception, the
        options given get their previous values back; other settings changed inside the block stay. Yields the
        config in force. One model, one block at a time: the settings are the model's, not the thread's.
        """
        changes: dict[str, Any] = {}
        if not isinstance(top_k_lora, _Unset):
            changes["top_k_lora"] = top_k_lora
        if not isinstance(global_scaling_weight, _Unset):
            changes["global_scaling_weight"] = float(global_scaling_weight)
        if not isinstance(softmax_temperature, _Unset):
            changes["softmax_temperature"] = float(softmax_temperature)
        before = self.xlora_config
        during = before.replace(**changes)  # validates every change before any is applied
        self.xlora_config = during
        try:
            yield during
        finally:
            current = self.xlora_config
            if current is during:
                self.xlora_config = before
            else:  # a setter ran inside the block: keep its change, restore only ours
                self.xlora_config = current.replace(**{name: getattr(before, name) for name in changes})

    def get_latest_scalings(self) -> torch.Tensor | None:
        """Scalings of the latest forward, ``[batch, seq, n_layers, n_experts]`` (seq is the new tokens only
        when a KV cache was used), or ``None`` before the first forward."""
        return self._latest_scalings

    def enable_scalings_logging(self) -> None:
        self._scalings_logging = True

    def disable_scalings_logging(self) -> None:
        """Stop logging; the log is kept."""
        self._scalings_logging = False

    def clear_scalings_log(self) -> None:
        self._scalings_log.clear()

    def get_scalings_log(self) -> list[torch.Tensor]:
        """A copy of the log list (the tensors are shared), each ``[batch, seq, n_layers, n_experts]``."""
        return list(self._scalings_log)

    def get_bucketed_scalings_log(self) -> dict[int, tuple[list[int], list[torch.Tensor]]]:
        """The log bucketed by sequence length: ``{seq_len: (positions in the log, tensors)}``."""
        buckets: dict[int, tuple[list[int], list[torch.Tensor]]] = {}
        for position, scalings in enumerate(self._scalings_log):
            positions, tensors = buckets.setdefault(scalings.shape[1], ([], []))
            positions.append(position)
            tensors.append(scalings)
        return buckets

    def enable_adapter_layers(self) -> None:
        self._disabled = False

    def disable_adapter_layers(self) -> None:
        """Run exactly the base model (no scaling pass, no expert) until re-enabled."""
        self._disabled = True

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Context manager: the base model alone inside the block."""
        previous = self._disabled
        self._disabled = True
        try:
            yield
        finally:
            self._disabled = previous

    @property
    def adapters_enabled(self) -> bool:
        return not self._disabled

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(
            f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"
        )

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.parameters())
        return trainable, total

    # ------------------------------------------------------------------ Hub (implemented in xlora_hub.hub)
    def save_pretrained(self, save_directory: str | os.PathLike[str], *, bundle_experts: bool = False, **kwargs: Any):
        from .hub import save_mixture

        return save_mixture(self, save_directory, bundle_experts=bundle_experts, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        from .hub import push_mixture

        return push_mixture(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, repo_id_or_path: str | os.PathLike[str], **kwargs: Any) -> XLoraModel:
        from .hub import load_mixture

        return load_mixture(repo_id_or_path, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:  # new parameter objects: the layers must re-read them
            for layer in self.xlora_layers:
                layer.refresh()
        return result

    def unwrap(self) -> nn.Module:
        """Put peft's own LoRA layers back and return the ``transformers`` model (still holding the experts)."""
        _restore_peft_layers(self.model)
        return self.model


def _check_expert_factors_finite(module_name: str, module: nn.Module) -> None:
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


def _restore_peft_layers(model: nn.Module) -> None:
    for name, module in list(model.named_modules()):
        if isinstance(module, XLoraLayer):
            parent_name, _, child_name = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child_name, module.unwrap())


def _layer_mismatch_message(expected: list[str], actual: list[str]) -> str:
    missing = [n for n in expected if n not in actual][:3]
    extra = [n for n in actual if n not in expected][:3]
    detail = f"missing {missing}, unexpected {extra}" if (missing or extra) else "same layers in another order"
    return (
        f"The mixture's X-LoRA layers ({len(expected)}) do not match the layers built on this base model "
        f"({len(actual)}): {detail}. The classifier would route to the wrong layers; load the mixture on the base "
        "model and experts it was made with."
    )


__all__ = ["XLoraModel", "XLoraCache", "ExpertRef"]
