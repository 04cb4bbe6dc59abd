"""The exact look-ahead scaling pass: one batched forward per token instead of two, the same tokens.

Plain X-LoRA runs two passes per token: the scaling pass over token ``t`` (its hidden state gives token ``t``'s
scalings) and then the real pass over ``t``. The scaling pass runs the model with every expert at
``scaling_pass_value``, so its own LM head also predicts token ``t + 1``: the *guess*. Look-ahead runs the real
pass over ``t`` and the scaling pass over the guess as one forward of ``2 * batch`` rows (real rows first, then
scaling rows; each row has its own KV history and its own scalings, the scaling rows those of the scaling pass).
When the token the real pass chooses equals the guess, that token's scaling pass is already done; when it does
not, a *redo* forward runs the scaling pass over the chosen token (real rows idle), and the guess's KV entry is
masked out of the scaling rows' history. The tokens are those of the plain path (the real pass always runs with
the scalings of the token it is fed); only the cost changes: one forward per token when guesses are right, two
when they are wrong.

The cache layout: one cache (dynamic or static, as the call asked) of ``2 * batch`` rows that grows by one slot
per forward. A row's slots that hold nothing of its own (real rows during a redo, a rejected guess in a scaling
row) are masked (attention mask 0), and every row carries its own position ids, so a row attends exactly to its
own history. With sampling, the token is drawn from the real pass's distribution exactly as ``transformers``
draws it (one ``torch.multinomial`` per step, so the random stream is consumed as on the plain path); the guess
is the argmax of the scaling pass's logits and draws nothing.

``"auto"`` starts with look-ahead and, after :data:`AUTO_WARMUP_STEPS` steps with an acceptance below
:data:`AUTO_MIN_ACCEPTANCE`, splits the cache back into the two passes' own and finishes with plain two-pass
steps (a step at low acceptance costs two forwards of ``2 * batch`` rows, more than the plain path's two of
``batch`` rows).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, StaticCache
from transformers.generation.utils import GenerateDecoderOnlyOutput

from .cache import XLoraStaticCache, cache_argument

if TYPE_CHECKING:  # pragma: no cover
    from .model import XLoraModel

LOOKAHEAD_MODES = (False, True, "auto")
"""What ``generate(scaling_lookahead=...)`` takes."""

AUTO_WARMUP_STEPS = 8
"""``"auto"``: steps of look-ahead before the acceptance so far decides whether it goes on."""

AUTO_MIN_ACCEPTANCE = 0.5
"""``"auto"``: below this acceptance (after the warm-up) the call finishes with plain two-pass steps."""


@dataclass
class XLoraGenerateOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus ``lookahead_acceptance``: the share of guesses the real pass confirmed
    (``None`` when look-ahead did not run)."""

    lookahead_acceptance: float | None = None


class _Acceptance:
    """Guesses made and confirmed in one call (over rows still generating), counted on the device (no sync per
    step; the rate is read at the end, or once by ``"auto"``)."""

    def __init__(self) -> None:
        self.made: torch.Tensor | int = 0
        self.confirmed: torch.Tensor | int = 0

    def add(self, accepted: torch.Tensor, live: torch.Tensor) -> None:
        self.made = self.made + live.sum()
        self.confirmed = self.confirmed + (accepted & live).sum()

    @property
    def rate(self) -> float | None:
        made = int(self.made)
        return int(self.confirmed) / made if made else None


def _joined(first: Cache, second: Cache, *, static_length: int | None, config) -> Cache:
    """One cache of ``first``'s rows then ``second``'s, of the same kind (static: sized ``static_length``)."""
    joined: Cache = (
        StaticCache(config=config, max_cache_len=static_length) if static_length else DynamicCache(config=config)
    )
    length = int(first.get_seq_length())
    for index, (a, b) in enumerate(zip(first.layers, second.layers)):
        keys = torch.cat([a.keys[:, :, :length], b.keys[:, :, :length]])
        values = torch.cat([a.values[:, :, :length], b.values[:, :, :length]])
        joined.update(keys, values, index)
    return joined


def _rows(cache: Cache, rows: slice, *, static_length: int | None, config) -> Cache:
    """A new cache holding ``rows`` of ``cache`` (of the same kind)."""
    part: Cache = (
        StaticCache(config=config, max_cache_len=static_length) if static_length else DynamicCache(config=config)
    )
    length = int(cache.get_seq_length())
    for index, layer in enumerate(cache.layers):
        part.update(layer.keys[rows, :, :length].clone(), layer.values[rows, :, :length].clone(), index)
    return part


def backbone_and_head(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The wrapped model's backbone (its ``base_model``) and LM head: the scaling rows need the backbone's last
    hidden state (the classifier's input, as in the plain scaling pass) and every row the head's logits."""
    backbone = getattr(model, "base_model", model)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    extra = [n for n in ("final_logit_softcapping", "logit_scale") if getattr(text, n, None) not in (None, 1, 1.0)]
    if backbone is model or head is None or extra:
        why = f"its logits are more than the LM head's ({', '.join(extra)})" if extra else "it has no separate LM head"
        raise ValueError(
            f"`scaling_lookahead` runs the backbone and the LM head of the model; {type(model).__name__}: {why}. "
            "Generate with `scaling_lookahead=False` (the same tokens, two passes per token)."
        )
    return backbone, head


def rows_forward(
    backbone: nn.Module,
    head: nn.Module,
    cache_argument: str,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    cache: Cache,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The backbone over one token per row, then the head: ``(logits [rows, 1, vocab], hidden [rows, 1, h])``.

    A plain function of its inputs (the routing is read from the X-LoRA layers' state): what ``torch.compile``
    captures for a static cache.
    """
    out = backbone(
        input_ids=tokens,
        position_ids=positions,
        attention_mask=mask,
        use_cache=True,
        return_dict=True,
        **{cache_argument: cache},
    )
    hidden = out.last_hidden_state
    return head(hidden), hidden


FOUR_D_MASK_MODELS = ("llama", "mistral", "qwen2", "qwen3")
"""Model types whose decoder builds its attention mask with ``transformers.masking_utils.create_causal_mask`` (which
takes a ready 4D mask as it is): with SDPA and full attention in every layer, look-ahead hands them its mask as 4D."""


def four_d_mask_ready(model: nn.Module) -> bool:
    """Whether the joined cache's 2D mask can be given to ``model`` as its 4D boolean mask ``[rows, 1, 1, slots]``.

    With one query token per row that attends to every slot its row has written, the causal mask transformers
    builds each step from the 2D mask is that 2D mask itself (the static cache's unwritten slots are 0 in it): the
    same boolean mask, without the mask-building code (padding checks, index expansion) at every step. Only for
    SDPA attention on model types known to pass a 4D mask through, with no sliding, chunked or bidirectional
    layers; any other model gets the 2D mask as before.
    """
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if getattr(text, "model_type", None) not in FOUR_D_MASK_MODELS:
        return False
    if getattr(text, "_attn_implementation", None) != "sdpa" or not getattr(text, "is_causal", True):
        return False
    if getattr(text, "sliding_window", None) is not None or getattr(text, "attention_chunk_size", None):
        return False
    layer_types = getattr(text, "layer_types", None)
    return layer_types is None or all(kind == "full_attention" for kind in layer_types)


class _Mask:
    """The 2D attention mask of the joined cache, one column per slot.

    Over a static cache it is preallocated at the cache's full length (zeros beyond the slots written) and filled
    in place, so every step has the same shapes and a compiled step is captured once; over a dynamic cache it
    grows by one column per forward, as the cache does.
    """

    def __init__(self, prompt_mask: torch.Tensor, *, static_length: int | None) -> None:
        self.length = prompt_mask.shape[1]
        if static_length is None:
            self.tensor = prompt_mask.long()
        else:
            self.tensor = prompt_mask.new_zeros((prompt_mask.shape[0], static_length), dtype=torch.long)
            self.tensor[:, : self.length] = prompt_mask
        self.static = static_length is not None

    def add(self, column: torch.Tensor) -> torch.Tensor:
        """Add the slot the next forward writes (``column``: 1 where the row attends to it); returns the mask."""
        if self.static:
            self.tensor[:, self.length] = column.long()
        else:
            self.tensor = torch.cat([self.tensor, column.long()[:, None]], dim=-1)
        self.length += 1
        return self.tensor

    def set_last(self, column: torch.Tensor) -> None:
        """Rewrite the last slot's column (a refused guess is forgotten)."""
        self.tensor[:, self.length - 1] = column.long()

    def rows(self, rows: slice) -> _Mask:
        part = _Mask.__new__(_Mask)
        part.length, part.static, part.tensor = self.length, self.static, self.tensor[rows].clone()
        return part


class _Stepper:
    """The forwards of one look-ahead call: the wrapped model run with per-row scalings, tokens and positions."""

    def __init__(self, xlora: XLoraModel, batch: int) -> None:
        self.xlora = xlora
        self.batch = batch
        self.backbone, self.head = backbone_and_head(xlora.model)
        self.four_d = four_d_mask_ready(xlora.model)  # eager steps only (see `forward`)
        self.cache_argument = cache_argument(self.backbone)
        config = xlora.xlora_config
        shape = (1, 1, xlora.n_layers if config.layerwise_scalings else 1, xlora.n_experts)
        weight = xlora.classifier.last_layer.weight
        idle = xlora._scaling_pass_scalings()
        self.scaling_rows = (
            torch.zeros(shape, dtype=weight.dtype, device=weight.device) if idle is None else idle
        ).expand(batch, -1, -1, -1)

    def scalings(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw classifier scalings ``[rows, 1, n_layers, n_experts]`` from the scaling rows' last hidden state."""
        return self.xlora.classifier(hidden.to(self.xlora.classifier.last_layer.weight.device))

    def forward(
        self,
        step,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: Cache,
        routing: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row; returns the last logits ``[rows, vocab]`` (float32) and hidden states ``[rows, 1, h]``.

        ``step`` is :func:`rows_forward` or its compiled form; the routing is set around it, as tensors it reads.
        """
        if self.four_d and step is rows_forward:  # a compiled step keeps the 2D mask it was captured with
            mask = mask[:, None, None, :].bool()
        self.xlora.routing.scalings = routing
        try:
            logits, hidden = step(
                self.backbone, self.head, self.cache_argument, tokens[:, None], positions[:, None], mask, cache
            )
        finally:
            self.xlora.routing.scalings = None
        # copies: a compiled step (CUDA graphs) reuses its output buffers at the next call
        return logits[:, -1].to(copy=True, dtype=torch.float32), hidden.clone()

    def real_routing(self, raw: torch.Tensor) -> torch.Tensor:
        """Real rows' processed scalings, then the scaling rows'; logs ``raw`` as the plain path does."""
        self.xlora._note_scalings(raw)
        processed = self.xlora._process_scalings(raw)
        return torch.cat([processed, self.scaling_rows.to(processed.dtype)])


def lookahead_loop(
    model: nn.Module,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    *,
    xlora: XLoraModel,
    mode: bool | str,
    **model_kwargs: Any,
):
    """The decoding method ``generate`` runs for ``scaling_lookahead`` (``custom_generate``): see the module."""
    cache = model_kwargs["cache"] if "cache" in model_kwargs else model_kwargs.get("past_key_values")
    static_length = None
    batch, prompt = input_ids.shape
    device = input_ids.device
    mask = model_kwargs.get("attention_mask")
    if mask is None:
        mask = torch.ones(batch, prompt, dtype=torch.long, device=device)
    positions = model_kwargs.get("position_ids")
    if positions is None:
        positions = (mask.long().cumsum(-1) - 1).clamp_min(0)
    pad = generation_config._pad_token_tensor
    has_eos = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    do_sample = generation_config.do_sample
    keep_scores = generation_config.return_dict_in_generate and generation_config.output_scores
    keep_logits = generation_config.return_dict_in_generate and generation_config.output_logits
    scores: tuple = ()
    raw_logits: tuple = ()
    stepper = _Stepper(xlora, batch)
    acceptance = _Acceptance()
    unfinished = torch.ones(batch, dtype=torch.long, device=device)

    def choose(logits: torch.Tensor) -> torch.Tensor:
        """The next token from the real pass's logits, exactly as transformers' ``_sample`` chooses it."""
        nonlocal input_ids, unfinished, scores, raw_logits
        processed = logits_processor(input_ids, logits)
        if keep_scores:
            scores += (processed,)
        if keep_logits:
            raw_logits += (logits,)
        if do_sample:
            token = torch.multinomial(nn.functional.softmax(processed, dim=-1), num_samples=1).squeeze(1)
        else:
            token = torch.argmax(processed, dim=-1)
        if has_eos:
            token = token * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, token[:, None]], dim=-1)
        unfinished = unfinished & ~stopping_criteria(input_ids, scores)
        return token

    # prefill: the two passes over the prompt, each in its own cache (as the plain path runs them)
    prefill = {"input_ids": input_ids, "attention_mask": mask, "position_ids": positions}
    raw = xlora.compute_scalings(prefill, cache)
    xlora.routing.scalings = xlora._process_scalings(raw)
    try:
        out = model(
            **prefill, use_cache=True, return_dict=True, logits_to_keep=1, **{xlora._decoder.cache_argument: cache}
        )
    finally:
        xlora.routing.scalings = None
    token = choose(out.logits[:, -1].float())
    del out
    position = positions[:, -1] + 1  # the position of `token`
    if isinstance(cache, XLoraStaticCache):
        static_length = prompt + 2 * (int(generation_config.max_length) - prompt) + 1
    joined = _joined(cache, cache.scaling_cache, static_length=static_length, config=xlora.config)
    mask = _Mask(torch.cat([mask, mask]), static_length=static_length)
    # a static joined cache has fixed shapes: the step compiles as transformers' own decode step does
    step = rows_forward
    if static_length and model._valid_auto_compile_criteria({"cache": joined}, generation_config):
        step = xlora._decoder.compiled_rows_forward(generation_config.compile_config or model._default_compile_config())
    two = torch.arange(2 * batch, device=device) >= batch  # True on the scaling rows
    next_raw = None  # token's scalings, when its scaling pass has run
    guess = None
    redo = torch.ones(batch, dtype=torch.bool, device=device)
    steps = 0
    looking_ahead = True
    while looking_ahead and unfinished.max() > 0:
        if redo.any():  # the scaling pass over `token` for the rows whose guess was wrong (real rows idle)
            logits, hidden = stepper.forward(
                step,
                torch.cat([token, token]),
                torch.cat([position, position]),
                mask.add(torch.cat([torch.zeros_like(redo), redo])),
                joined,
                torch.cat([stepper.scaling_rows, stepper.scaling_rows]),
            )
            fresh = stepper.scalings(hidden[batch:])
            fresh_guess = logits[batch:].argmax(-1)
            if next_raw is None:
                next_raw, guess = fresh, fresh_guess
            else:
                next_raw = torch.where(redo[:, None, None, None], fresh, next_raw)
                guess = torch.where(redo, fresh_guess, guess)
        if has_eos:  # a finished row is fed padding next: that is its guess
            guess = torch.where(unfinished.bool(), guess, pad)
        # the real pass over `token` and the scaling pass over the guess, in one forward
        logits, hidden = stepper.forward(
            step,
            torch.cat([token, guess]),
            torch.cat([position, position + 1]),
            mask.add(torch.ones_like(two)),
            joined,
            stepper.real_routing(next_raw),
        )
        live = unfinished.bool()
        token = choose(logits[:batch])
        position = position + 1
        accepted = token == guess
        acceptance.add(accepted, live)
        redo = ~accepted
        mask.set_last(torch.where(two, torch.cat([accepted, accepted]), True))  # a refused guess is forgotten
        next_raw = stepper.scalings(hidden[batch:])
        guess = logits[batch:].argmax(-1)
        steps += 1
        if mode == "auto" and steps == AUTO_WARMUP_STEPS and (acceptance.rate or 0.0) < AUTO_MIN_ACCEPTANCE:
            looking_ahead = False
    if unfinished.max() > 0:  # "auto" turned look-ahead off: plain two-pass steps on the split caches
        real = _rows(joined, slice(0, batch), static_length=static_length, config=xlora.config)
        scaling = _rows(joined, slice(batch, 2 * batch), static_length=static_length, config=xlora.config)
        real_mask, scaling_mask = mask.rows(slice(0, batch)), mask.rows(slice(batch, 2 * batch))
        while unfinished.max() > 0:  # the confirmed guesses' scaling pass is kept: only `redo` rows rerun it
            if redo.any():
                _, hidden = stepper.forward(
                    rows_forward, token, position, scaling_mask.add(redo), scaling, stepper.scaling_rows
                )
                fresh = stepper.scalings(hidden)
                next_raw = torch.where(redo[:, None, None, None], fresh, next_raw) if next_raw is not None else fresh
            stepper.xlora._note_scalings(next_raw)
            real_routing = xlora._process_scalings(next_raw)
            logits, _ = stepper.forward(
                rows_forward, token, position, real_mask.add(torch.ones_like(redo)), real, real_routing
            )
            token = choose(logits)
            position = position + 1
            redo = torch.ones(batch, dtype=torch.bool, device=device)
    xlora.lookahead_acceptance = acceptance.rate
    if generation_config.return_dict_in_generate:
        return XLoraGenerateOutput(
            sequences=input_ids,
            scores=scores or None,
            logits=raw_logits or None,
            lookahead_acceptance=acceptance.rate,
        )
    return input_ids


__all__ = [
    "backbone_and_head",
    "rows_forward",
    "AUTO_MIN_ACCEPTANCE",
    "AUTO_WARMUP_STEPS",
    "LOOKAHEAD_MODES",
    "XLoraGenerateOutput",
    "lookahead_loop",
]
