"""Batching the Space's concurrent requests: one left-padded ``generate`` for every request waiting, each
request's output the same as if it had run alone.

Requests that are waiting when the model becomes free run together, up to ``max_batch_size``, when they can
share a batch: greedy decoding with the same routing settings (the model's routing settings are global to a
pass). Each row stops on its own (its EOS, its ``max_new_tokens``, its client leaving), so requests with
different lengths still batch; a sampled request runs alone (its seed must give the same sample as alone).
A batch is one ``generate`` over the left-padded prompts with the attention mask, so a row's tokens are its
unbatched tokens; its routing is its row of the scalings log, pads dropped.

This is batching inside the app, not gradio's ``batch=True``: gradio 6's batch mode runs no generators (the
page streams every token) and fails every request of a batch when one fails (each request here keeps its own
error message); its ``validator=`` hook is broken in batch mode (gradio 6.31).

On ZeroGPU hardware the batch's generation runs in :func:`~xlora_hub.space.gpu.gpu_function`, i.e. under
``spaces.GPU`` (a no-op elsewhere), in a thread that carries the context of the request that started it.
"""

from __future__ import annotations

import contextvars
import itertools
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..routing import routing_from_log

__all__ = ["BatchStats", "Batcher", "GenerationRequest", "RowResult"]

_DONE = object()
_ids = itertools.count()


@dataclass(eq=False)  # a request is itself (its tensors have no truth value to compare)
class GenerationRequest:
    """One checked request: its prompt ids (one row), ``generate`` options, seed, routing options, base comparison."""

    input_ids: torch.Tensor
    gen_kwargs: dict[str, Any]
    seed: int = 0
    options: dict[str, Any] = field(default_factory=dict)
    compare_base: bool = False
    id: int = field(default_factory=lambda: next(_ids))
    events: queue.Queue = field(default_factory=queue.Queue, repr=False)
    gone: threading.Event = field(default_factory=threading.Event, repr=False)

    @property
    def max_new_tokens(self) -> int:
        return int(self.gen_kwargs["max_new_tokens"])

    def batch_key(self) -> tuple:
        """Requests with equal keys can share a batch: greedy, same routing options, same other options."""
        if self.gen_kwargs.get("do_sample"):
            return ("alone", self.id)
        rest = sorted((k, v) for k, v in self.gen_kwargs.items() if k != "max_new_tokens")
        return ("greedy", tuple(sorted(self.options.items())), tuple(rest))


@dataclass
class RowResult:
    """What one row of a batch produced: its new token ids, and (for the mixture) its per-token routing."""

    new_ids: torch.Tensor
    routing: torch.Tensor | None = None
    batch_size: int = 1


@dataclass
class BatchStats:
    """The size and timing of every batch run, for the run info, monitoring and tests."""

    sizes: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def record(self, size: int) -> None:
        with self.lock:
            self.sizes.append(size)

    @property
    def max_size(self) -> int:
        with self.lock:
            return max(self.sizes, default=0)


class _RowStops(StoppingCriteria):
    """Per row: stop at its own ``max_new_tokens`` or when its request is gone (its client left)."""

    def __init__(self, limits: list[int], ids: list[int], gone: set[int], prompt_length: int) -> None:
        self.limits = torch.tensor(limits)
        self.ids = ids
        self.gone = gone
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        done = (input_ids.shape[1] - self.prompt_length) >= self.limits
        gone = torch.tensor([i in self.gone for i in self.ids])
        return (done | gone).to(input_ids.device)


class _QueueStreamer(BaseStreamer):
    """``generate``'s stream as a queue of ``[batch]`` token tensors (the prompts skipped), ended by ``None``."""

    def __init__(self) -> None:
        self.queue: queue.Queue[torch.Tensor | None] = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() passes the prompts first
            self._prompt_seen = True
            return
        self.queue.put(value.detach().reshape(-1).cpu())

    def end(self) -> None:
        self.queue.put(None)


class _RowTexts:
    """Each request's decoded text after every one of its tokens (up to its limit and its first EOS)."""

    def __init__(self, tokenizer: Any, batch: list[GenerationRequest], eos: set[int]) -> None:
        self.tokenizer = tokenizer
        self.batch = batch
        self.eos = eos
        self.ids: list[list[int]] = [[] for _ in batch]
        self.finished = [False] * len(batch)

    def add(self, tokens: list[int]) -> Iterator[tuple[GenerationRequest, str]]:
        for row, token in enumerate(tokens):
            request = self.batch[row]
            if self.finished[row] or len(self.ids[row]) >= request.max_new_tokens:
                continue
            self.ids[row].append(token)
            self.finished[row] = token in self.eos
            yield request, self.tokenizer.decode(self.ids[row], skip_special_tokens=True)


def _eos_ids(model: Any, gen_kwargs: dict[str, Any]) -> set[int]:
    """The token ids that end a row: the request's ``eos_token_id``, else the model's generation config's."""
    eos = gen_kwargs.get("eos_token_id")
    if eos is None:
        eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return set()
    return {int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])}


def _row_new_ids(row: torch.Tensor, limit: int, eos: set[int]) -> torch.Tensor:
    """A row's new tokens as a lone generation would return them: up to its limit and its first EOS (kept)."""
    row = row[:limit]
    for index, token in enumerate(row.tolist()):
        if token in eos:
            return row[: index + 1]
    return row


class Batcher:
    """Runs queued requests in left-padded batches on one model, one batch at a time.

    :meth:`submit` queues a request and yields its events: ``("start", time, None)`` when its batch starts,
    ``("text", text, None)`` while the mixture streams, ``("done", text, RowResult)``, then, with
    ``compare_base``, ``("base_text", ...)`` and ``("base_done", text, RowResult)``, and ``("end", time, None)``
    when its batch is over (both times taken under the lock, so batches never overlap); an error is raised in
    the caller's thread. The first request that
    finds no worker starts one (a thread with that request's context); it takes the waiting requests as a
    batch each time the model is free (``lock``), until none is waiting.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        lock: threading.Lock,
        max_batch_size: int = 8,
        wrap: Callable[[Callable[..., Any]], Callable[..., Any]] | None = None,
    ) -> None:
        if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a whole number of at least 1, got {max_batch_size!r}.")
        self.model = model
        self.tokenizer = tokenizer
        self.lock = lock
        self.max_batch_size = max_batch_size
        self.stats = BatchStats()
        self._pending: list[GenerationRequest] = []
        self._cond = threading.Condition()
        self._worker_running = False
        self._gone: set[int] = set()  # ids of requests whose client left (their rows stop early)
        self._generate_rows = (wrap or (lambda fn: fn))(self._generate_rows_impl)

    @property
    def waiting(self) -> int:
        """Requests queued for the next batch."""
        with self._cond:
            return len(self._pending)

    # -------------------------------------------------------------- queueing
    def submit(self, request: GenerationRequest) -> Iterator[tuple[str, str, RowResult | None]]:
        """Queue ``request`` now (not at the first ``next``) and return the iterator of its events, which ends
        when it is done; closing the iterator early marks the request gone."""
        with self._cond:
            self._pending.append(request)
            start = not self._worker_running
            self._worker_running = True
        if start:
            context = contextvars.copy_context()  # ZeroGPU reads the request from a context variable
            threading.Thread(target=context.run, args=(self._work,), name="xlora-batch", daemon=True).start()
        return self._events(request)

    def _events(self, request: GenerationRequest) -> Iterator[tuple[str, str, RowResult | None]]:
        finished = False
        try:
            while (event := request.events.get()) is not _DONE:
                if isinstance(event, BaseException):
                    raise event
                yield event
            finished = True
        finally:
            if not finished:  # the caller stopped listening: its row stops at the next step
                request.gone.set()
                self._gone.add(request.id)
            with self._cond:
                if request in self._pending:
                    self._pending.remove(request)

    def _take_batch(self) -> list[GenerationRequest]:
        """The oldest waiting request and the waiting requests that can share its batch (oldest first)."""
        with self._cond:
            if not self._pending:
                self._worker_running = False
                return []
            key = self._pending[0].batch_key()
            batch = [r for r in self._pending if r.batch_key() == key][: self.max_batch_size]
            for request in batch:
                self._pending.remove(request)
            return batch

    def _work(self) -> None:
        """Run batches until no request waits. Each batch is taken once the model is free (under ``lock``),
        so every request that arrived while the model was busy can join it."""
        while True:
            with self.lock:
                batch = self._take_batch()
                if not batch:
                    return
                self.stats.record(len(batch))
                try:
                    started = time.time()
                    for request in batch:
                        request.events.put(("start", started, None))
                    self._run(batch)
                    ended = time.time()
                    for request in batch:
                        request.events.put(("end", ended, None))
                except BaseException as err:  # every request of the batch sees the error in its own thread
                    for request in batch:
                        request.events.put(err)
                finally:
                    for request in batch:
                        request.events.put(_DONE)
                    self._gone.difference_update(r.id for r in batch)

    # -------------------------------------------------------------- one batch
    def _run(self, batch: list[GenerationRequest]) -> None:
        """The mixture over the whole batch, then the base model over the requests that compare with it."""
        self._run_rows(batch, adapters=True)
        base = [r for r in batch if r.compare_base and not r.gone.is_set()]
        if base:
            self._run_rows(base, adapters=False)

    def _run_rows(self, batch: list[GenerationRequest], *, adapters: bool) -> None:
        """Stream one batched generation to its requests, then hand each its :class:`RowResult`."""
        input_ids, mask, pads = _padded(batch)
        gen_kwargs = dict(batch[0].gen_kwargs, max_new_tokens=max(r.max_new_tokens for r in batch))
        eos = _eos_ids(self.model, gen_kwargs)
        texts = _RowTexts(self.tokenizer, batch, eos)
        kind = "text" if adapters else "base_text"
        limits = [r.max_new_tokens for r in batch]
        prompt_lengths = [r.input_ids.shape[-1] for r in batch]
        for event in self._generate_rows(
            input_ids,
            mask,
            gen_kwargs=gen_kwargs,
            options=batch[0].options if adapters else None,
            seed=batch[0].seed,
            limits=limits,
            ids=[r.id for r in batch],
            pads=pads,
            prompt_lengths=prompt_lengths,
            eos=sorted(eos),
        ):
            if event[0] == "tokens":
                for request, text in texts.add(event[1]):
                    request.events.put((kind, text, None))
            else:
                for request, result in zip(batch, event[1]):
                    result.batch_size = len(batch)
                    text = self.tokenizer.decode(result.new_ids, skip_special_tokens=True)
                    request.events.put(("done" if adapters else "base_done", text, result))

    def _generate_rows_impl(
        self,
        input_ids: torch.Tensor,
        mask: torch.Tensor,
        *,
        gen_kwargs: dict[str, Any],
        options: dict[str, Any] | None,
        seed: int,
        limits: list[int],
        ids: list[int],
        pads: list[int],
        prompt_lengths: list[int],
        eos: list[int],
    ) -> Iterator[tuple[str, Any]]:
        """One ``generate`` over left-padded prompts: the mixture under ``options``, or the base model (adapters
        off) when ``options`` is ``None``. Yields ``("tokens", [one per row])`` after every step, then
        ``("results", [RowResult per row])``: new ids up to each row's limit and first EOS, and the mixture's
        routing per row, pads dropped.

        Everything it takes and yields is plain data (tensors, lists, dicts): on ZeroGPU it runs under
        ``spaces.GPU``, which pickles both to and from its GPU process.
        """
        model = self.model
        device = getattr(model, "device", None) or input_ids.device
        streamer = _QueueStreamer()
        kwargs = dict(
            input_ids=input_ids.to(device),
            attention_mask=mask.to(device),
            streamer=streamer,
            stopping_criteria=StoppingCriteriaList([_RowStops(limits, ids, self._gone, input_ids.shape[1])]),
            **gen_kwargs,
        )
        outcome: dict[str, Any] = {}

        def work() -> None:
            try:
                torch.manual_seed(seed)  # a sampled request runs alone: its seed gives its lone sample
                if options is None:
                    with model.disable_adapter():
                        outcome["output"] = model.generate(**kwargs)
                    return
                with model.routing_options(**options):
                    model.clear_scalings_log()
                    model.enable_scalings_logging()
                    try:
                        outcome["output"] = model.generate(**kwargs)
                        outcome["log"] = model.get_scalings_log()
                    finally:
                        model.disable_scalings_logging()
                        model.clear_scalings_log()
            except BaseException as err:  # re-raised in the batch's thread
                outcome["error"] = err
                streamer.end()

        thread = threading.Thread(target=work, name="xlora-generate", daemon=True)
        thread.start()
        try:
            while (tokens := streamer.queue.get()) is not None:
                yield "tokens", tokens.tolist()
        finally:
            thread.join()
        if "error" in outcome:
            raise outcome["error"]
        output, log = outcome["output"], outcome.get("log")
        results = []
        for row, limit in enumerate(limits):
            new_ids = _row_new_ids(output[row, input_ids.shape[1] :].cpu(), limit, set(eos))
            routing = None
            if log is not None:
                n_routed = prompt_lengths[row] + new_ids.shape[0] - 1  # the last token is never fed back
                routing = routing_from_log(log, row=row)[pads[row] : pads[row] + n_routed]
            results.append(RowResult(new_ids=new_ids, routing=routing))
        yield "results", results


def _padded(batch: list[GenerationRequest]) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The prompts left-padded to one length, their attention mask, and each row's number of pads."""
    pad = batch[0].gen_kwargs.get("pad_token_id")
    pad = 0 if pad is None else int(pad)
    length = max(r.input_ids.shape[-1] for r in batch)
    input_ids = torch.full((len(batch), length), pad, dtype=torch.long)
    mask = torch.zeros((len(batch), length), dtype=torch.long)
    pads = []
    for row, request in enumerate(batch):
        ids = request.input_ids.reshape(-1).cpu()
        input_ids[row, length - ids.shape[0] :] = ids
        mask[row, length - ids.shape[0] :] = 1
        pads.append(length - ids.shape[0])
    return input_ids, mask, pads
