"""X-LoRA layers: every expert of one peft LoRA layer, weighted per token, in one stacked computation.

Each wrapper takes the place of a peft ``LoraLayer`` in its parent module and re-registers that
layer's children under the same names, so parameter names and state-dict keys stay exactly
peft's (``q_proj.base_layer.weight``, ``q_proj.lora_A.<expert>.weight``) and the peft layer can be
put back unchanged (:meth:`XLoraLayer.unwrap`).

The LoRA factors of all experts are concatenated once (``A: [sum_r, in]``, ``B: [out, sum_r]``), so
a layer costs two matrix products whatever the number of experts. The per-token scalings, each
expert's ``alpha/r`` and the global weight are folded into one ``[.., sum_r]`` column multiplier.
The concatenated copies are rebuilt only when a source weight changes (device move, load,
in-place update); trainable experts and training-mode dropout take the per-expert path so
gradients and dropout masks behave as in peft.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from peft.tuners import lora
from torch import nn
from torch.nn.modules import module as _module

from .errors import IncompatibleExpertError
from .quantization import quantized_linear_lora_classes, supported_layers_text, unsupported_quantized_backend

SUPPORTED_LORA_LAYERS = (lora.Linear, lora.Embedding, lora.Conv2d)


def supported_lora_layers() -> tuple[type, ...]:
    """Every peft LoRA layer class X-LoRA mixes: :data:`SUPPORTED_LORA_LAYERS` and the quantized Linears installed."""
    return SUPPORTED_LORA_LAYERS + quantized_linear_lora_classes()


class RoutingState:
    """The scalings of the pass being run, shared by every X-LoRA layer of one model.

    The model sets it before a pass and clears it after (:meth:`XLoraModel._routing`): layers read
    it, nothing registers hooks. ``scalings`` is ``[batch, seq, n_layers or 1, n_experts]`` with
    top-k, the top-k softmax and the global weight already applied (``None``: experts are skipped,
    which is exactly the base model). Layers with the same experts and ranks share one column
    multiplier per pass, kept in ``multipliers`` until the scalings change.

    ``stacks_fixed`` is set by ``generate`` once every layer's stacked factors are built (and cleared after):
    the experts cannot change inside one ``generate`` call (no gradients), so the layers skip the check of
    their source tensors' versions at every step (16 version reads per layer and step).
    """

    __slots__ = ("_scalings", "multipliers", "stacks_fixed")

    def __init__(self, scalings: torch.Tensor | None = None) -> None:
        self._scalings = scalings
        self.multipliers: dict[tuple, torch.Tensor] = {}
        self.stacks_fixed = False

    @property
    def scalings(self) -> torch.Tensor | None:
        return self._scalings

    @scalings.setter
    def scalings(self, value: torch.Tensor | None) -> None:
        self._scalings = value
        self.multipliers = {}


_PATTERN_IDS: dict[tuple[int, ...], int] = {}


class _StackCache:
    """Concatenated expert factors, rebuilt when any source tensor changes."""

    __slots__ = ("key", "tensors")

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.tensors: tuple[torch.Tensor, ...] = ()


def _tensor_key(tensors: list[torch.Tensor]) -> tuple:
    # in-place updates (optimizer steps, load_state_dict) bump the version counter; device and dtype
    # moves go through ``_apply``, which drops the stack
    return tuple([t._version for t in tensors])  # a list comprehension: faster than a generator here


class XLoraLayer(nn.Module):
    """Base of the X-LoRA wrappers; see the module docstring."""

    def __init__(
        self,
        lora_layer: lora.LoraLayer,
        *,
        layer_index: int,
        expert_names: list[str],
        routing: RoutingState,
        module_name: str = "",
    ) -> None:
        super().__init__()
        # The peft layer itself is not registered (its children are, under their own names).
        object.__setattr__(self, "lora_layer", lora_layer)
        object.__setattr__(self, "routing", routing)
        for name, child in lora_layer.named_children():
            self.add_module(name, child)
        for name, param in lora_layer.named_parameters(recurse=False):
            self.register_parameter(name, param)
        self.layer_index = layer_index
        self.module_name = module_name
        adapters = self._adapter_keys()
        self.local_experts = [name for name in expert_names if name in adapters]
        for name in self.local_experts:
            if lora_layer.use_dora.get(name, False) or name in getattr(lora_layer, "lora_variant", {}):
                raise IncompatibleExpertError(
                    f"Expert {name!r} uses DoRA (or another LoRA variant) on {module_name or type(lora_layer).__name__}; "
                    "X-LoRA mixes plain LoRA experts only. Retrain it with `use_dora=False`."
                )
            if getattr(lora_layer, "lora_bias", {}).get(name, False):
                raise IncompatibleExpertError(
                    f"Expert {name!r} was trained with `lora_bias=True` on {module_name}; "
                    "X-LoRA mixes LoRA experts without a bias on B. Retrain it with `lora_bias=False`."
                )
        ranks = [int(lora_layer.r[name]) for name in self.local_experts]
        global_index = [expert_names.index(name) for name in self.local_experts]
        col_expert = torch.repeat_interleave(torch.tensor(global_index, dtype=torch.long), torch.tensor(ranks))
        col_scale = torch.repeat_interleave(
            torch.tensor([float(lora_layer.scaling[name]) for name in self.local_experts], dtype=torch.float64),
            torch.tensor(ranks),
        )
        self.register_buffer("col_expert", col_expert, persistent=False)
        self.register_buffer("col_scale", col_scale, persistent=False)
        self.global_index = global_index
        self._pattern_id = _PATTERN_IDS.setdefault(tuple(col_expert.tolist()), len(_PATTERN_IDS))
        dropouts = getattr(lora_layer, "lora_dropout", {})
        self._has_dropout = any(
            isinstance(dropouts[n], nn.Dropout) and dropouts[n].p > 0 for n in self.local_experts if n in dropouts
        )
        self._stack = _StackCache()
        self.refresh()

    def _apply(self, fn, recurse: bool = True):
        result = super()._apply(fn, recurse)
        self._stack = _StackCache()  # .to() / .half() / .cuda() gave the experts new storage
        return result

    def refresh(self) -> None:
        """Re-read the expert tensors (after their parameters were replaced, e.g. ``load_state_dict(assign=True)``)."""
        self._sources = self._source_tensors() if self.local_experts else []
        # Offloaded by accelerate (``device_map`` with "disk", or "cpu" beside an accelerator): the weights are
        # meta tensors that its hooks swap for real ones during each forward, so only the per-expert path,
        # which calls the expert modules, sees them on the execution device.
        self._offloaded = any(t.is_meta for t in self._sources)
        self._stack = _StackCache()

    # -- helpers ----------------------------------------------------------------------------
    def _adapter_keys(self) -> set[str]:
        return set(self.lora_layer.lora_A.keys())

    def _source_tensors(self) -> list[torch.Tensor]:
        raise NotImplementedError

    def _build_stack(self) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _stacked(self) -> tuple[torch.Tensor, ...]:
        """The concatenated factors, with each expert's alpha/r folded into A (built once, checked each call).

        Built lazily on first use, so a model moved to another device builds them there. Inside a compiled
        region (``torch.compile``) the version check is skipped: the factors built before capture
        (:meth:`prepare_stack`, or any eager forward) are graph inputs, and a change to the experts after capture
        needs a new :meth:`prepare_stack` (what ``compile_decode_step`` does).
        """
        if torch.compiler.is_compiling():
            return self._stack.tensors if self._stack.tensors else self._build_stack()
        key = _tensor_key(self._sources)
        if self._stack.key != key:
            with torch.inference_mode(False), torch.no_grad():
                self._stack.tensors = tuple(t.detach().clone() for t in self._build_stack())
            self._stack.key = key
        return self._stack.tensors

    def prepare_stack(self) -> None:
        """Build the concatenated factors now (before a ``torch.compile`` capture reads them)."""
        if self.local_experts and not self._offloaded:
            self._stacked()

    def _use_loop(self) -> bool:
        """Per-expert path: when experts train (gradients must reach their own weights), dropout is live, or the
        experts are offloaded."""
        if self._offloaded:
            return True
        if torch.is_grad_enabled() and any(t.requires_grad for t in self._sources):
            return True
        return self.training and self._has_dropout

    def _layer_scalings(self, dtype: torch.dtype, device: torch.device | None = None) -> tuple[int, torch.Tensor]:
        """``[b, s, n_experts]`` scalings of this layer (top-k and global weight folded in), on ``device``."""
        scalings = self.routing.scalings
        index = self.layer_index if scalings.shape[2] > 1 else 0
        layer = scalings[:, :, index, :]
        device = layer.device if device is None else device
        return index, layer if (layer.dtype, layer.device) == (dtype, device) else layer.to(device=device, dtype=dtype)

    def _column_multiplier(
        self, dtype: torch.dtype, *, with_lora_scale: bool, device: torch.device | None = None
    ) -> torch.Tensor:
        """``[b, s, sum_r]``: the per-token scaling of each rank column.

        The stacked path folds alpha/r into A, so its multiplier is the routing alone and is shared
        by every layer with the same experts and ranks in this pass. ``device``: where the layer computes
        (layers of a model split across devices by ``device_map`` get the scalings on their own).
        """
        routing = self.routing
        index = self.layer_index if routing.scalings.shape[2] > 1 else 0
        key = (index, self._pattern_id, dtype, device)
        if not with_lora_scale and key in routing.multipliers:
            return routing.multipliers[key]
        _, scalings = self._layer_scalings(dtype, device)
        multiplier = scalings.index_select(-1, self.col_expert.to(scalings.device))
        if with_lora_scale:
            return multiplier * self.col_scale.to(device=multiplier.device, dtype=dtype)
        routing.multipliers[key] = multiplier
        return multiplier

    def unwrap(self) -> lora.LoraLayer:
        """The original peft layer, unchanged (its children are the same objects)."""
        return self.lora_layer

    def extra_repr(self) -> str:
        return f"layer_index={self.layer_index}, experts={self.local_experts}"


def _hooked(module: nn.Module) -> bool:
    """Whether calling ``module`` does more than its ``forward``: its own or global hooks, a replaced ``forward``
    (accelerate's offload hooks), a TorchScript trace (the same test ``nn.Module.__call__`` makes)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or "forward" in module.__dict__
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
        or torch._C._get_tracing_state()
    )


def _base_output(base: nn.Module, x: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
    """``base(x)``; a plain ``nn.Linear`` with nothing hooked is computed as its own forward does (``F.linear``)
    without the module call, whose dispatch costs a decode step's 1-token Linear about a third of its time (and
    every X-LoRA Linear runs one in both passes)."""
    if type(base) is nn.Linear and not args and not kwargs and not _hooked(base):
        params = base._parameters
        return F.linear(x, params["weight"], params["bias"])
    return base(x, *args, **kwargs)


def _tokens_view(multiplier: torch.Tensor, x: torch.Tensor, module_name: str) -> torch.Tensor:
    """Broadcast ``[b, s, R]`` multipliers to the layer's input.

    Most layers see ``[b, s, in]``; some models flatten tokens to ``[b*s, in]`` (OPT's fc1/fc2).
    A layer that sees one vector per sample (``[b, in]``, e.g. BERT's pooler, which reads the first
    token) uses the first token's scalings. A layer that sees only the last positions (an ``lm_head``
    under ``logits_to_keep``, as in generation) uses those positions' scalings.
    """
    if x.dim() == multiplier.dim():
        seq = x.shape[-2]
        if multiplier.shape[1] in (1, seq) or seq > multiplier.shape[1]:
            return multiplier
        return multiplier[:, -seq:, :]
    lead = x.shape[:-1]
    rows = multiplier.shape[0] * multiplier.shape[1]
    if rows == 1:
        return multiplier.reshape((1,) * len(lead) + multiplier.shape[-1:])
    if rows == lead.numel():
        return multiplier.reshape(*lead, multiplier.shape[-1])
    if len(lead) == 1 and lead[0] == multiplier.shape[0]:
        return multiplier[:, 0, :]
    if multiplier.shape[1] == 1 and len(lead) == 1 and lead[0] % multiplier.shape[0] == 0:
        # one scaling vector per sequence (static routing) over flattened tokens
        return multiplier[:, 0, :].repeat_interleave(lead[0] // multiplier.shape[0], dim=0)
    raise RuntimeError(
        f"X-LoRA layer {module_name!r} got an input of shape {tuple(x.shape)} but scalings for "
        f"{multiplier.shape[0]}x{multiplier.shape[1]} tokens; the layer's tokens must match the model's input tokens."
    )


class XLoraLinear(XLoraLayer):
    """X-LoRA over a peft ``lora.Linear`` (also GPT-2's ``Conv1D`` base layers) and peft's LoRA layers over
    quantized Linears (bitsandbytes 4/8-bit, torchao, optimum-quanto): their forward too is ``base_layer(x)``
    plus the LoRA delta, and the quantized base layer is only called, never read or cast."""

    def _source_tensors(self) -> list[torch.Tensor]:
        layer = self.lora_layer
        return [layer.lora_A[n].weight for n in self.local_experts] + [
            layer.lora_B[n].weight for n in self.local_experts
        ]

    def _build_stack(self) -> tuple[torch.Tensor, ...]:
        # stored transposed and contiguous, [in, R] and [R, out], for plain mm / addmm
        layer = self.lora_layer
        a = torch.cat([layer.lora_A[n].weight for n in self.local_experts], dim=0)
        a = a * self.col_scale.to(device=a.device, dtype=a.dtype)[:, None]
        b = torch.cat([layer.lora_B[n].weight for n in self.local_experts], dim=1)
        return a.t().contiguous(), b.t().contiguous()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        # the child straight from the registry (nn.Module.__getattr__ costs more than this whole pass-through in
        # the scaling pass, where every X-LoRA Linear runs its base layer alone)
        result = _base_output(self._modules["base_layer"], x, args, kwargs)
        if self.routing._scalings is None:
            return result
        dtype = self._sources[0].dtype
        xe = x if x.dtype == dtype else x.to(dtype)
        if self._use_loop():
            return result + self._loop_delta(xe).to(result.dtype)
        # inside generate the stack was built before the first step (RoutingState.stacks_fixed)
        stack = self._stack.tensors
        a_t, b_t = stack if stack and self.routing.stacks_fixed else self._stacked()
        h = torch.mm(xe.reshape(-1, xe.shape[-1]), a_t)
        multiplier = self._row_multiplier(dtype, xe)
        # in place when no gradient is recorded (generation, eval): one allocation less per layer
        grad = torch.is_grad_enabled()
        h = h * multiplier if grad else h.mul_(multiplier)
        if result.dtype != dtype:
            return result + torch.mm(h, b_t).view(*result.shape[:-1], -1).to(result.dtype)
        flat = result.reshape(-1, result.shape[-1])
        if grad:
            return torch.addmm(flat, h, b_t).view(result.shape)
        # the base layer's output is this layer's own fresh tensor: adding into it skips the copy of it that
        # out-of-place addmm makes first (the largest overhead of the real pass, ~4% of a prefill)
        return torch.addmm(flat, h, b_t, out=flat).view(result.shape)  # out=, not addmm_: FLOP counters see it

    def _row_multiplier(self, dtype: torch.dtype, xe: torch.Tensor) -> torch.Tensor:
        """``[tokens, sum_r]``: :meth:`_column_multiplier` matched to the rows of the flattened input ``xe``.

        Shaped once per pass, experts pattern and input shape and shared like the column multiplier (kept in
        ``RoutingState.multipliers``): the views, broadcast and reshape it takes cost a layer more Python time than
        its multiply does at prefill sizes.
        """
        routing = self.routing
        index = self.layer_index if routing._scalings.shape[2] > 1 else 0
        key = ("rows", index, self._pattern_id, dtype, xe.device, xe.shape[:-1])
        rows = routing.multipliers.get(key)
        if rows is None:
            multiplier = _tokens_view(
                self._column_multiplier(dtype, with_lora_scale=False, device=xe.device), xe, self.module_name
            )
            rank = multiplier.shape[-1]
            if multiplier.shape[:-1] != xe.shape[:-1]:
                multiplier = multiplier.expand(*xe.shape[:-1], rank)
            rows = multiplier.reshape(-1, rank)
            routing.multipliers[key] = rows
        return rows

    def _loop_delta(self, xe: torch.Tensor) -> torch.Tensor:
        """peft's per-expert loop: used when experts train or LoRA dropout is live."""
        layer = self.lora_layer
        multiplier = _tokens_view(
            self._column_multiplier(xe.dtype, with_lora_scale=True, device=xe.device), xe, self.module_name
        )
        delta = None
        start = 0
        for name in self.local_experts:
            r = layer.lora_A[name].out_features
            h = layer.lora_A[name](layer.lora_dropout[name](xe)) * multiplier[..., start : start + r]
            start += r
            out = layer.lora_B[name](h)
            delta = out if delta is None else delta + out
        return delta


class XLoraEmbedding(XLoraLayer):
    """X-LoRA over a peft ``lora.Embedding`` (experts on token embeddings)."""

    def _adapter_keys(self) -> set[str]:
        return set(self.lora_layer.lora_embedding_A.keys())

    def _source_tensors(self) -> list[torch.Tensor]:
        layer = self.lora_layer
        return [layer.lora_embedding_A[n] for n in self.local_experts] + [
            layer.lora_embedding_B[n] for n in self.local_experts
        ]

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        layer = self.lora_layer
        a_t = torch.cat([layer.lora_embedding_A[n].T for n in self.local_experts], dim=1)  # [num_emb, R]
        b_t = torch.cat([layer.lora_embedding_B[n].T for n in self.local_experts], dim=0)  # [R, out]
        return a_t * self.col_scale.to(device=a_t.device, dtype=a_t.dtype), b_t

    def _build_stack(self) -> tuple[torch.Tensor, ...]:
        return self._factors()

    def _use_loop(self) -> bool:
        return self._offloaded or (torch.is_grad_enabled() and any(t.requires_grad for t in self._sources))

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.routing.scalings is None or not self.local_experts:
            return result
        layer = self.lora_layer
        multiplier = self._column_multiplier(self._sources[0].dtype, with_lora_scale=False, device=result.device)
        if x.dim() == 1:
            multiplier = multiplier.reshape(-1, multiplier.shape[-1])
        # trainable experts: concatenate with autograd so gradients reach each expert's own tensors
        a_t, b_t = self._factors() if self._use_loop() else self._stacked()
        delta = (layer._embed(x, a_t) * multiplier) @ b_t
        embed_scale = layer._get_embed_scale() if hasattr(layer, "_get_embed_scale") else None
        if embed_scale is not None:
            delta = delta * embed_scale.to(delta.dtype)
        return result + delta.to(result.dtype)


class XLoraConv2d(XLoraLayer):
    """X-LoRA over a peft ``lora.Conv2d``: one scaling vector per sample (sequence length 1)."""

    def _source_tensors(self) -> list[torch.Tensor]:
        layer = self.lora_layer
        return [layer.lora_A[n].weight for n in self.local_experts] + [
            layer.lora_B[n].weight for n in self.local_experts
        ]

    def _build_stack(self) -> tuple[torch.Tensor, ...]:
        layer = self.lora_layer
        a = torch.cat([layer.lora_A[n].weight for n in self.local_experts], dim=0)
        a = a * self.col_scale.to(device=a.device, dtype=a.dtype)[:, None, None, None]
        b = torch.cat([layer.lora_B[n].weight for n in self.local_experts], dim=1)
        return a, b

    def _use_loop(self) -> bool:
        return super()._use_loop() or self.base_layer.groups != 1

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = self.base_layer(x, *args, **kwargs)
        if self.routing.scalings is None or not self.local_experts:
            return result
        layer = self.lora_layer
        first_a = layer.lora_A[self.local_experts[0]]
        dtype = first_a.weight.dtype
        loop = self._use_loop()
        multiplier = self._column_multiplier(dtype, with_lora_scale=loop, device=x.device)  # [b, s, R]
        if multiplier.shape[1] != 1:
            raise RuntimeError(
                f"X-LoRA Conv2d layer {self.module_name!r} needs one scaling vector per sample, got scalings for "
                f"{multiplier.shape[1]} positions."
            )
        multiplier = multiplier[:, 0, :, None, None]  # [b, R, 1, 1]
        xe = x.to(dtype)
        if loop:
            delta = None
            start = 0
            for name in self.local_experts:
                r = layer.lora_A[name].out_channels
                h = layer.lora_A[name](layer.lora_dropout[name](xe)) * multiplier[:, start : start + r]
                start += r
                out = layer.lora_B[name](h)
                delta = out if delta is None else delta + out
        else:
            a, b = self._stacked()
            h = F.conv2d(xe, a, None, first_a.stride, first_a.padding, first_a.dilation, first_a.groups)
            delta = F.conv2d(h * multiplier, b)
        return result + delta.to(result.dtype)


def wrap_lora_layer(
    lora_layer: nn.Module, *, layer_index: int, expert_names: list[str], routing: RoutingState, module_name: str
) -> XLoraLayer:
    """Pick the X-LoRA wrapper for a peft LoRA layer (exact types: subclasses may change semantics)."""
    if type(lora_layer) is lora.Embedding:
        cls: type[XLoraLayer] = XLoraEmbedding
    elif type(lora_layer) is lora.Conv2d:
        cls = XLoraConv2d
    elif type(lora_layer) is lora.Linear or type(lora_layer) in quantized_linear_lora_classes():
        cls = XLoraLinear
    else:
        raise IncompatibleExpertError(_unsupported_layer_message(lora_layer, module_name))
    return cls(lora_layer, layer_index=layer_index, expert_names=expert_names, routing=routing, module_name=module_name)


def _unsupported_layer_message(lora_layer: nn.Module, module_name: str) -> str:
    """Why a peft layer cannot be mixed and what to do: a quantized backend is a loading choice, not the expert's."""
    name = type(lora_layer).__name__
    supported = supported_layers_text()
    backend = unsupported_quantized_backend(lora_layer)
    if backend is not None:
        return (
            f"Module {module_name!r} is a {name} (peft's LoRA over a {backend}-quantized layer), which X-LoRA does not "
            f"mix. Supported: {supported}. Load the base model with one of those quantizations (for example "
            "`BitsAndBytesConfig(load_in_4bit=True)`) or unquantized; the experts need no change."
        )
    return (
        f"Module {module_name!r} is a {name}, which X-LoRA does not mix. Supported: {supported}. "
        "Retrain the expert without this module in `target_modules`."
    )
