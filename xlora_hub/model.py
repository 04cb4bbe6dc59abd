"""``XLoraModel``: a transformers model, its LoRA experts, and the gating classifier.

Every forward runs two passes. The scaling pass (no gradients) gives the last hidden state; the
classifier turns it into per-token expert scalings; the real pass runs with the experts weighted
by them. The scalings reach the X-LoRA layers through one :class:`~xlora_hub.layers.RoutingState`
owned by the model: set before a pass, cleared after.

Both passes keep a KV cache (:class:`~xlora_hub.cache.XLoraCache`): the scaling pass is causal, so
the scalings of past tokens never change and generation is linear in the number of new tokens.

Building (resolving and checking the experts, peft loading, wrapping peft's layers) lives in
:mod:`xlora_hub.building` and :mod:`xlora_hub.placement`, decoding (caches, ``generate``'s hooks) in
:mod:`xlora_hub.generation`; this module is the model itself: its two passes and its control API.

The Hub methods (``from_pretrained``, ``save_pretrained``, ``push_to_hub``) leave the files to
:mod:`xlora_hub.hub`: ``from_pretrained`` calls its ``open_mixture`` once (fetch and checks, base model) and
builds the model here; the Hub package never imports this module.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .building import (
    base_model_ref,
    check_experts_fit,
    check_hidden_size,
    layer_mismatch_message,
    peft_experts,
    resolve_experts,
    restore_peft_layers,
    with_quantization,
    wrap_lora_layers,
)
from .cache import CACHE_ARGUMENTS, XLoraCache, XLoraStaticCache
from .classifier import XLoraClassifier
from .config import ExpertRef, XLoraConfig
from .errors import InvalidMixtureError
from .generation import Decoder, supports_cache
from .hub import ResolvedExpert
from .hub_mixin import XLoraHubMixin
from .layers import RoutingState, XLoraLayer
from .placement import hidden_state_device, move_base_model, offload_kwargs
from .quantization import compute_dtype
from .scalings import process_scalings, scaling_pass_scalings

if TYPE_CHECKING:
    pass

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


class XLoraModel(XLoraHubMixin, nn.Module):
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
        self._decoder = Decoder(model)  # decoding state: the cache argument's name, warnings said
        self.lookahead_acceptance: float | None = None  # of the last generate call (None: no look-ahead ran)

        names = xlora_config.expert_names
        self.xlora_layers: list[XLoraLayer] = wrap_lora_layers(model, expert_names=names, routing=self.routing)
        layer_names = [w.module_name for w in self.xlora_layers]
        if xlora_config.layer_names is not None and xlora_config.layer_names != layer_names:
            raise InvalidMixtureError(layer_mismatch_message(xlora_config.layer_names, layer_names))
        hidden_size = check_hidden_size(model, xlora_config)
        self.classifier = XLoraClassifier(  # holds the config: see the `xlora_config` property
            xlora_config.replace(
                layer_names=layer_names, hidden_size=hidden_size, base_model=with_quantization(xlora_config, model)
            ),
            hidden_size=hidden_size,
            n_layers=len(self.xlora_layers),
            n_experts=len(names),
            dtype=compute_dtype(model),
            device=hidden_state_device(model),
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
            config = config.replace(base_model=base_model_ref(base_model))
        resolved = resolve_experts(
            config,
            base_dir=base_dir,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
            base_model=base_model,
        )
        check_experts_fit(base_model, config, resolved)  # everything that can fail, before the base is modified
        move_base_model(base_model, device=device, torch_dtype=torch_dtype)
        offload = offload_kwargs(
            base_model, device_map=device_map, max_memory=max_memory, offload_folder=offload_folder
        )
        trainable = config.use_trainable_adapters
        with peft_experts(
            base_model, resolved, trainable=trainable, upcast_experts=upcast_experts, offload=offload
        ) as peft_model:  # a failure inside (e.g. a layer mismatch) leaves the caller's base model as it was
            return cls(peft_model.base_model.model, config, experts=resolved, peft_model=peft_model)

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
        return process_scalings(self.xlora_config, scalings)

    def _scaling_pass_scalings(self) -> torch.Tensor | None:
        weight = self.classifier.last_layer.weight
        return scaling_pass_scalings(
            self.xlora_config,
            n_layers=self.n_layers,
            n_experts=self.n_experts,
            dtype=weight.dtype,
            device=weight.device,
        )

    def _last_hidden_state(self, model_kwargs: dict[str, Any], cache: XLoraCache | None) -> torch.Tensor:
        kwargs = {k: v for k, v in model_kwargs.items() if k not in _REAL_PASS_ONLY}
        if cache is not None:
            kwargs[self._decoder.cache_argument] = cache.scaling_cache
            kwargs["use_cache"] = True
        elif supports_cache(self):
            kwargs["use_cache"] = False
        backbone = getattr(self.model, "base_model", self.model)
        with torch.no_grad(), self._routing(self._scaling_pass_scalings()):
            if backbone is not self.model:
                return backbone(**kwargs, return_dict=True).last_hidden_state
            return self.model(**kwargs, output_hidden_states=True, return_dict=True).hidden_states[-1]

    def compute_scalings(self, model_kwargs: dict[str, Any], cache: XLoraCache | None = None) -> torch.Tensor:
        """Run the scaling pass and the classifier: scalings ``[batch, seq, n_layers, n_experts]``."""
        hidden = self._last_hidden_state(model_kwargs, cache)
        scalings = self.classifier(hidden.to(self.classifier.last_layer.weight.device))
        self._note_scalings(scalings)
        return scalings

    def _note_scalings(self, scalings: torch.Tensor) -> None:
        """Keep ``scalings`` as the latest (and in the log when logging): every real pass's scalings pass here."""
        self._latest_scalings = scalings
        if self._scalings_logging:
            self._scalings_log.append(scalings.detach())

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
        cache = self._decoder.prepare_cache(self, kwargs)
        scalings = self.compute_scalings(kwargs, cache)
        with self._routing(self._process_scalings(scalings)):
            return self.model(**kwargs)

    # ------------------------------------------------------------------ generation (xlora_hub.generation)
    @torch.no_grad()
    def generate(self, *args: Any, routing: str = "dynamic", scaling_lookahead: bool | str = False, **kwargs: Any):
        """``transformers`` generation with X-LoRA, KV-cached in both passes unless ``use_cache=False``.

        Takes every argument of ``model.generate`` (greedy, sampling, beam search, ``max_new_tokens``,
        ``eos_token_id``, left-padded batches...). ``cache_implementation="static"`` puts both passes on
        ``StaticCache`` (an :class:`~xlora_hub.cache.XLoraStaticCache`), which transformers' auto-compile of the
        decode step (``compile_config``) needs.

        ``routing="static"`` runs the scaling pass once, on the prompt, and routes every token of each
        sequence with the prompt's mean scalings: generation then costs about one pass per token. It
        changes the outputs (the default, ``"dynamic"``, is the X-LoRA of the paper and of peft).

        ``scaling_lookahead=True`` runs each token's real pass and the next token's scaling pass (over the
        scaling pass's own guess) as one batched forward: the same tokens, about one forward per token when the
        guesses are right (:mod:`xlora_hub.lookahead`); ``"auto"`` turns it off for the rest of a call whose
        guesses are mostly wrong. Greedy and sampling, dynamic and static caches; not beam search. The share of
        guesses confirmed is :attr:`lookahead_acceptance` afterwards (and ``lookahead_acceptance`` of the output
        with ``return_dict_in_generate=True``).
        """
        return self._decoder.generate(self, *args, routing=routing, scaling_lookahead=scaling_lookahead, **kwargs)

    def decode_step(
        self,
        input_ids: torch.Tensor,
        position_ids: torch.Tensor,
        cache: XLoraCache | XLoraStaticCache,
        attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One decoding step by hand: both passes over ``input_ids`` ``[batch, 1]`` at ``position_ids``, writing
        ``cache``; returns the last position's logits ``[batch, vocab]``. What :meth:`compile_decode_step` compiles."""
        out = self(
            input_ids=input_ids,
            position_ids=position_ids,
            attention_mask=attention_mask,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return out.logits[:, -1]

    def compile_decode_step(self, *, backend: str = "inductor", mode: str | None = None):
        """:meth:`decode_step` under ``torch.compile(fullgraph=True, dynamic=False)`` (no graph break: the routing
        is tensors, the experts' stacked factors are built here, before capture). Use it with an
        :class:`~xlora_hub.cache.XLoraStaticCache` and, for batches with padding, a 2D ``attention_mask`` of the
        cache's full length (fixed shapes: one capture for every step). ``mode="reduce-overhead"`` adds CUDA
        graphs on a GPU. Call it again after changing the experts' weights."""
        for layer in self.xlora_layers:
            layer.prepare_stack()
        return torch.compile(self.decode_step, fullgraph=True, dynamic=False, backend=backend, mode=mode)

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

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        if assign:  # new parameter objects: the layers must re-read them
            for layer in self.xlora_layers:
                layer.refresh()
        return result

    def unwrap(self) -> nn.Module:
        """Put peft's own LoRA layers back and return the ``transformers`` model (still holding the experts)."""
        restore_peft_layers(self.model)
        return self.model


load_mixture = XLoraModel.from_pretrained
"""``xlora_hub.load_mixture(repo_id_or_path, *, base_model=None, ...)``: :meth:`XLoraModel.from_pretrained` as a
function (the same signature and checks), for code that loads mixtures without naming the class."""


__all__ = ["XLoraModel", "XLoraCache", "ExpertRef"]
