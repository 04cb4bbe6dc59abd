"""``XLoraModel``: a transformers model, its LoRA experts, and the gating classifier.

Every forward runs two passes. The scaling pass (no gradients) gives the last hidden state; the
classifier turns it into per-token expert scalings; the real pass runs with the experts weighted
by them. The scalings reach the X-LoRA layers through one :class:`~xlora_hub.layers.RoutingState`
owned by the model: set before a pass, cleared after.

Both passes keep a KV cache (:class:`~xlora_hub.cache.XLoraCache`): the scaling pass is causal, so
the scalings of past tokens never change and generation is linear in the number of new tokens.

The Hub methods (``from_pretrained``, ``save_pretrained``, ``push_to_hub``) leave the files to
:mod:`xlora_hub.hub`: ``from_pretrained`` calls its ``open_mixture`` once (fetch and checks, base model) and
builds the model here; the Hub package never imports this module.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from peft.tuners.lora import LoraLayer
from torch import nn

from .cache import CACHE_ARGUMENTS, XLoraCache, cache_argument, take_xlora_cache
from .classifier import XLoraClassifier
from .config import BaseModelRef, ExpertRef, XLoraConfig
from .errors import IncompatibleExpertError, InvalidConfigError, InvalidMixtureError
from .experts import ResolvedExpert, cached_commit_sha, check_expert_matches_model, resolve_expert
from .finite import first_non_finite
from .layers import RoutingState, XLoraLayer, supported_lora_layers, wrap_lora_layer
from .quantization import compute_dtype, describe_quantization, is_quantized_tensor

if TYPE_CHECKING:
    from pathlib import Path

    from huggingface_hub import CommitInfo

logger = logging.getLogger(__name__)

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
        self.xlora_config = xlora_config.replace(
            layer_names=layer_names, hidden_size=hidden_size, base_model=_with_quantization(xlora_config, model)
        )
        self.classifier = XLoraClassifier(
            self.xlora_config,
            hidden_size=hidden_size,
            n_layers=len(self.xlora_layers),
            n_experts=len(names),
            dtype=compute_dtype(model),
            device=_hidden_state_device(model),
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
        device_map: str | dict[str, Any] | None = None,
        max_memory: dict[Any, Any] | None = None,
        offload_folder: str | os.PathLike[str] | None = None,
    ) -> XLoraModel:
        """A new mixture with an untrained classifier, from a base model and the experts named in ``config``.

        Experts may be local peft adapter folders or Hub repos (``owner/name[@revision][:subfolder]``);
        ``token``, ``cache_dir``, ``local_files_only`` and ``force_download`` apply to their download.
        Every expert is checked (plain LoRA, target modules and sizes that fit the base model) before
        the base model is modified. Experts are kept in the base model's dtype unless
        ``upcast_experts=True`` (float32).

        A base placed by accelerate (loaded with ``device_map``, some layers offloaded to "cpu" or "disk")
        keeps its placement: peft re-dispatches it with the experts using ``device_map`` (default: the base's
        own ``hf_device_map``), ``max_memory`` and ``offload_folder`` (default: the folder it was offloaded to).
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
        _move_base_model(base_model, device=device, torch_dtype=torch_dtype)
        offload = _offload_kwargs(
            base_model, device_map=device_map, max_memory=max_memory, offload_folder=offload_folder
        )
        return cls._build(base_model, config, resolved, upcast_experts=upcast_experts, offload=offload)

    @classmethod
    def _build(
        cls,
        base_model: nn.Module,
        config: XLoraConfig,
        resolved: list[ResolvedExpert],
        *,
        upcast_experts: bool,
        offload: Mapping[str, Any] | None = None,
    ) -> XLoraModel:
        from peft import PeftModel

        trainable = config.use_trainable_adapters
        peft_model = None
        try:
            with _peft_writes_inside(offload) as stage:
                for i, expert in enumerate(resolved):
                    kwargs = dict(adapter_name=expert.name, is_trainable=trainable, autocast_adapter_dtype=False)
                    kwargs.update(offload or {})
                    if i == 0:
                        peft_model = PeftModel.from_pretrained(base_model, str(expert.local_dir), **kwargs)
                    else:
                        peft_model.load_adapter(str(expert.local_dir), **kwargs)
            if stage is not None:
                _absolute_offload_paths(peft_model, stage)
            hf_model = peft_model.base_model.model
            dtype = torch.float32 if upcast_experts else compute_dtype(base_model)
            for module_name, module in hf_model.named_modules():
                if isinstance(module, supported_lora_layers()):
                    _check_expert_factors_finite(module_name, module)
                    for name, param in module.named_parameters():
                        if "lora_" in name and not is_quantized_tensor(param) and param.dtype != dtype:
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
        return self._process_scalings(dummy.to(self.classifier.last_layer.weight.device))

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
        scalings = self.classifier(hidden.to(self.classifier.last_layer.weight.device))
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
        self.classifier.softmax_temperature = float(temperature)

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

    # ------------------------------------------------------------------ Hub (the files: xlora_hub.hub)
    def save_pretrained(
        self, save_directory: str | os.PathLike[str], *, bundle_experts: bool = False, overwrite: bool = True
    ) -> Path:
        """Save the mixture in a local folder: config, classifier, model card, and the experts that live nowhere else.

        Hub experts stay references to their repos; local-folder experts are copied into ``experts/<name>/``
        and trained experts (``use_trainable_adapters``) are exported with peft, so a saved mixture never
        points at an absolute path. The new folder is written beside the target and swapped in whole.

        Args:
            save_directory (`str` or `os.PathLike`):
                The mixture folder to write (created if needed).
            bundle_experts (`bool`, *optional*, defaults to `False`):
                Copy the Hub experts into the folder too, for a self-contained mixture.
            overwrite (`bool`, *optional*, defaults to `True`):
                Replace a mixture already in the folder (its other files are kept), as transformers does;
                `False` refuses any folder that is not empty.

        Returns:
            `Path`: the mixture folder.
        """
        from .hub import save_mixture

        return save_mixture(self, save_directory, bundle_experts=bundle_experts, overwrite=overwrite)

    def push_to_hub(
        self,
        repo_id: str,
        *,
        private: bool | None = None,
        token: str | bool | None = None,
        commit_message: str | None = None,
        branch: str | None = None,
        create_pr: bool = False,
        bundle_experts: bool = False,
        push_local_experts: bool = False,
        revision: str | None = None,
        base_model: str | None = None,
    ) -> CommitInfo:
        """Push the mixture to a Hub repo in one commit, each Hub expert (and the base model) pinned to a commit.

        The repo is created if needed; its id is the one the Hub returns (a name without a namespace lands in
        the token's user namespace). Experts that exist only as local folders must be bundled or pushed to
        their own repos, else nothing is pushed; trained experts are always bundled.

        Args:
            repo_id (`str`):
                The mixture repo, `owner/name` or `name`.
            private (`bool`, *optional*):
                Whether a repo created here (the mixture's, and the experts' with `push_local_experts`) is private.
            token (`str` or `bool`, *optional*):
                The Hub token; `None` uses the saved login.
            commit_message (`str`, *optional*):
                The commit message (default: "Upload X-LoRA mixture of N experts (xlora-hub)").
            branch (`str`, *optional*):
                The branch to push to (created if needed); default the main branch.
            create_pr (`bool`, *optional*, defaults to `False`):
                Open a pull request instead of committing to the branch.
            bundle_experts (`bool`, *optional*, defaults to `False`):
                Copy every expert into the mixture repo's `experts/` instead of referencing it.
            push_local_experts (`bool`, *optional*, defaults to `False`):
                Push each local-folder expert to its own repo `<repo_id>-<name>` and reference it there.
            revision (`str`, *optional*):
                An alias of `branch`.
            base_model (`str`, *optional*):
                The Hub repo id to record as the base model (for a mixture made on a local copy of it); a local
                base model folder is never published.

        Returns:
            `huggingface_hub.CommitInfo`: the commit that was made.
        """
        from .hub import push_mixture

        return push_mixture(
            self,
            repo_id,
            private=private,
            token=token,
            commit_message=commit_message,
            branch=branch,
            create_pr=create_pr,
            bundle_experts=bundle_experts,
            push_local_experts=push_local_experts,
            revision=revision,
            base_model=base_model,
        )

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: str | os.PathLike[str],
        *,
        base_model: nn.Module | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | os.PathLike[str] | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        torch_dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        device_map: str | dict[str, Any] | None = None,
        max_memory: dict[Any, Any] | None = None,
        offload_folder: str | os.PathLike[str] | None = None,
        quantization_config: Any = None,
    ) -> XLoraModel:
        """Load a saved mixture (local folder or Hub repo) with its experts and, unless given, its base model.

        Checked before anything is built: the config (format version, types, bounds, paths inside the
        mixture), the classifier's shapes against the config and its values (finite); then, while building,
        each expert against the base model and the layer names against the wrapped model.

        Args:
            repo_id_or_path (`str` or `os.PathLike`):
                A mixture folder, or a Hub repo id (`owner/name`).
            base_model (`torch.nn.Module`, *optional*):
                The transformers model to build on; default the base model the mixture records (a relative path
                is taken inside the mixture folder), loaded at its recorded revision.
            revision (`str`, *optional*):
                The branch, tag or commit of a Hub mixture.
            token (`str` or `bool`, *optional*):
                The Hub token for the mixture, its experts and its base model; `None` uses the saved login.
            cache_dir (`str` or `os.PathLike`, *optional*):
                The Hub cache folder (default: the `huggingface_hub` cache).
            local_files_only (`bool`, *optional*, defaults to `False`):
                Use only files already in the cache (no network).
            force_download (`bool`, *optional*, defaults to `False`):
                Download the mixture's and experts' files again even if cached.
            torch_dtype (`torch.dtype`, *optional*):
                The dtype the base model is loaded in (or cast to, when given); the experts follow it.
            device (`torch.device` or `str`, *optional*):
                Where to move the model once built.
            device_map (`str` or `dict`, *optional*):
                Passed to transformers when it loads the base model (accelerate's placement).
            max_memory (`dict`, *optional*):
                Passed to transformers with the base model and to peft with the experts.
            offload_folder (`str` or `os.PathLike`, *optional*):
                Where transformers and peft offload weights to disk.
            quantization_config (*optional*):
                A transformers quantization config for the base model (bitsandbytes, torchao, quanto).

        Returns:
            `XLoraModel`: the mixture, in eval mode.
        """
        from .hub import clear_connection_errors, open_mixture, warn_on_base_mismatch

        files = open_mixture(
            repo_id_or_path,
            base_model=base_model,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
            torch_dtype=torch_dtype,
            device_map=device_map,
            max_memory=max_memory,
            offload_folder=offload_folder,
            quantization_config=quantization_config,
        )
        with clear_connection_errors(f"Mixture {files.label}: experts {files.config.expert_names}", token=token):
            model = cls.from_experts(
                files.base_model,
                files.config,
                device=device,
                torch_dtype=torch_dtype,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
                force_download=force_download,
                base_dir=files.folder,  # bundled experts are resolved inside the mixture (origin "bundled")
                max_memory=max_memory,
                offload_folder=offload_folder,
            )
        model.classifier.load_state_dict(files.classifier_state, strict=True)
        warn_on_base_mismatch(model.experts, model.xlora_config.base_model)
        return model.eval()

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


load_mixture = XLoraModel.from_pretrained
"""``xlora_hub.load_mixture(repo_id_or_path, *, base_model=None, ...)``: :meth:`XLoraModel.from_pretrained` as a
function (the same signature and checks), for code that loads mixtures without naming the class."""


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


def _with_quantization(config: XLoraConfig, model: nn.Module) -> BaseModelRef | None:
    """The config's base model ref recording how this base is quantized (information only: nothing reads it back)."""
    ref = config.base_model
    if ref is None:
        return None
    quantization = describe_quantization(model)
    return ref if ref.quantization == quantization else dataclasses.replace(ref, quantization=quantization)


def _offload_kwargs(
    model: nn.Module,
    *,
    device_map: str | dict[str, Any] | None,
    max_memory: dict[Any, Any] | None,
    offload_folder: str | os.PathLike[str] | None,
) -> dict[str, Any]:
    """peft's loading arguments for a base accelerate placed with offloaded layers (nothing for other bases).

    peft re-dispatches such a base with each adapter; without its map and offload folder it moves the
    offloaded (meta) weights and fails ("Cannot copy out of meta tensor").
    """
    placement = getattr(model, "hf_device_map", None)
    if not placement or not {"cpu", "disk"} & {str(v) for v in placement.values()}:
        return {}
    if device_map is None:  # peft dispatches the PeftModel, whose modules sit under "base_model.model."
        device_map = {f"base_model.model.{name}" if name else "base_model.model": d for name, d in placement.items()}
    if offload_folder is None:
        offload_folder = next(
            (
                getattr(getattr(module._hf_hook, "weights_map", None), "dataset", None)
                for module in model.modules()
                if getattr(getattr(getattr(module, "_hf_hook", None), "weights_map", None), "dataset", None)
            ),
            None,
        )
        offload_folder = getattr(offload_folder, "save_folder", None)
    if offload_folder is None and "disk" in {str(v) for v in placement.values()}:
        raise InvalidConfigError(
            "The base model has layers offloaded to disk but no offload folder is known; pass `offload_folder=` "
            "(the folder peft may write the offloaded layers with their experts to)."
        )
    kwargs: dict[str, Any] = {"device_map": device_map}
    if max_memory is not None:
        kwargs["max_memory"] = max_memory
    if offload_folder is not None:
        kwargs["offload_folder"] = str(offload_folder)
    return kwargs


@contextlib.contextmanager
def _peft_writes_inside(offload: Mapping[str, Any] | None) -> Iterator[os.PathLike[str] | None]:
    """Run peft's loading from a folder inside the offload folder, when it re-dispatches a disk-offloaded base.

    peft rewrites each offloaded checkpoint shard with the experts' tensors to the shard's path with its
    leading "/" dropped, i.e. relative to the working directory (from "/" it would overwrite the base's own
    checkpoint). Started from ``<offload_folder>/peft-offload`` its writes stay in the offload folder. The
    working directory is the process's: do not load models from other threads meanwhile.
    """
    folder = (offload or {}).get("offload_folder")
    if folder is None:
        yield None
        return
    from pathlib import Path

    stage = Path(folder).resolve() / "peft-offload"
    stage.mkdir(parents=True, exist_ok=True)
    previous = os.getcwd()
    os.chdir(stage)
    try:
        yield stage
    finally:
        os.chdir(previous)


def _absolute_offload_paths(model: nn.Module, stage: os.PathLike[str]) -> None:
    """Make the shard paths peft recorded relative to ``stage`` (see :func:`_peft_writes_inside`) absolute."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for single in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            weights = getattr(single, "weights_map", None)
            index = getattr(getattr(weights, "dataset", weights), "index", None)
            for info in (index or {}).values():
                path = info.get("safetensors_file") if isinstance(info, dict) else None
                if path and not os.path.isabs(path):
                    info["safetensors_file"] = os.path.join(os.fspath(stage), path)


def _hidden_state_device(model: nn.Module) -> torch.device:
    """Where the last hidden state comes out, for the classifier: the execution device of the layer reading it
    (the output embeddings) under accelerate, else the device of the first real (not offloaded) weight."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hook = getattr(head, "_hf_hook", None) if head is not None else None
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device) if not isinstance(device, int) else torch.device("cuda", device)
    for param in model.parameters():
        if not param.is_meta:
            return param.device
    return torch.device("cpu")


def _move_base_model(model: nn.Module, *, device: torch.device | str | None, torch_dtype: torch.dtype | None) -> None:
    """``model.to(device, dtype)`` for the arguments given; a quantized base is never cast to another dtype."""
    if torch_dtype is not None and describe_quantization(model) is not None:
        if torch_dtype == compute_dtype(model):
            torch_dtype = None
        else:
            raise InvalidConfigError(
                f"The base model is quantized ({describe_quantization(model)}) and cannot be cast to {torch_dtype}: "
                "choose its compute dtype when loading it (`dtype=` in transformers' `from_pretrained`, or "
                "`bnb_4bit_compute_dtype`), and leave `torch_dtype` unset here."
            )
    kwargs = {k: v for k, v in (("device", device), ("dtype", torch_dtype)) if v is not None}
    if kwargs:
        model.to(**kwargs)


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
