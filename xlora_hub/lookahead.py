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

from .cache import XLoraStaticCache

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
    """Guesses made and confirmed in one call (over rows still generating)."""

    def __init__(self) -> None:
        self.made = 0
        self.confirmed = 0

    def add(self, accepted: torch.Tensor, live: torch.Tensor) -> None:
        self.made += int(live.sum())
        self.confirmed += int((accepted & live).sum())

    @property
    def rate(self) -> float | None:
        return self.confirmed / self.made if self.made else None


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


class _Stepper:
    """The forwards of one look-ahead call: the wrapped model run with per-row scalings, tokens and positions."""

    def __init__(self, xlora: XLoraModel, batch: int) -> None:
        self.xlora = xlora
        self.batch = batch
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
        model: nn.Module,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        mask: torch.Tensor,
        cache: Cache,
        routing: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row; returns the last logits ``[rows, vocab]`` and last hidden states ``[rows, 1, h]``."""
        self.xlora.routing.scalings = routing
        try:
            out = model(
                input_ids=tokens[:, None],
                position_ids=positions[:, None],
                attention_mask=mask,
                use_cache=True,
                output_hidden_states=True,
                return_dict=True,
                logits_to_keep=1,
                **{self.xlora._decoder.cache_argument: cache},
            )
        finally:
            self.xlora.routing.scalings = None
        return out.logits[:, -1].float(), out.hidden_states[-1][:, -1:]

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
    mask = torch.cat([mask, mask])
    two = torch.arange(2 * batch, device=device) >= batch  # True on the scaling rows
    next_raw = None  # token's scalings, when its scaling pass has run
    guess = None
    redo = torch.ones(batch, dtype=torch.bool, device=device)
    steps = 0
    looking_ahead = True
    while unfinished.max() > 0:
        if not looking_ahead:
            break
        if redo.any():  # the scaling pass over `token` for the rows whose guess was wrong (real rows idle)
            column = torch.cat([torch.zeros_like(redo), redo])[:, None].long()
            mask = torch.cat([mask, column], dim=-1)
            logits, hidden = stepper.forward(
                model,
                torch.cat([token, token]),
                torch.cat([position, position]),
                mask,
                joined,
                torch.cat([stepper.scaling_rows, stepper.scaling_rows]),
            )
            fresh = stepper.scalings(hidden[batch:])
            fresh_guess = logits[batch:].argmax(-1)
            if next_raw is None:
                next_raw, guess = fresh, fresh_guess
            else:
                pick = redo[:, None, None, None]
                next_raw = torch.where(pick, fresh, next_raw)
                guess = torch.where(redo, fresh_guess, guess)
        if has_eos:  # a finished row is fed padding next: that is its guess
            guess = torch.where(unfinished.bool(), guess, pad)
        # the real pass over `token` and the scaling pass over the guess, in one forward
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=-1)
        logits, hidden = stepper.forward(
            model,
            torch.cat([token, guess]),
            torch.cat([position, position + 1]),
            mask,
            joined,
            stepper.real_routing(next_raw),
        )
        live = unfinished.bool()
        token = choose(logits[:batch])
        position = position + 1
        accepted = token == guess
        acceptance.add(accepted, live)
        redo = ~accepted
        mask[:, -1] = torch.where(two, torch.cat([accepted, accepted]), True).long()  # a wrong guess is forgotten
        next_raw = stepper.scalings(hidden[batch:])
        guess = logits[batch:].argmax(-1)
        steps += 1
        if mode == "auto" and steps == AUTO_WARMUP_STEPS and (acceptance.rate or 0.0) < AUTO_MIN_ACCEPTANCE:
            looking_ahead = False
    if unfinished.max() > 0:  # "auto" turned look-ahead off: plain two-pass steps on the split caches
        real = _rows(joined, slice(0, batch), static_length=static_length, config=xlora.config)
        scaling = _rows(joined, slice(batch, 2 * batch), static_length=static_length, config=xlora.config)
        real_mask, scaling_mask = mask[:batch], mask[batch:]  # the confirmed guesses' scaling pass is kept
        while unfinished.max() > 0:
            if redo.any():
                scaling_mask = torch.cat([scaling_mask, redo[:, None].long()], dim=-1)
                _, hidden = stepper.forward(model, token, position, scaling_mask, scaling, stepper.scaling_rows)
                fresh = stepper.scalings(hidden)
                next_raw = torch.where(redo[:, None, None, None], fresh, next_raw) if next_raw is not None else fresh
            real_mask = torch.cat([real_mask, torch.ones_like(real_mask[:, :1])], dim=-1)
            stepper.xlora._note_scalings(next_raw)
            logits, _ = stepper.forward(model, token, position, real_mask, real, xlora._process_scalings(next_raw))
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


__all__ = ["AUTO_MIN_ACCEPTANCE", "AUTO_WARMUP_STEPS", "LOOKAHEAD_MODES", "XLoraGenerateOutput", "lookahead_loop"]
