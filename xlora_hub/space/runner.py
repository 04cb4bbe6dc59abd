"""Running one request of the Space: checking its input, streaming a generation from another thread, and the
routing it leaves.

The model keeps per-pass routing state, so one generation runs at a time (:attr:`MixtureRunner.lock`), and
each request's routing settings are applied with ``model.routing_options`` so that however it ends, the
next request finds the model as it was. Input errors are ``gr.Error`` with the message the page shows.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator
from typing import Any

import gradio as gr
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from ..routing import routing_from_log

__all__ = ["MAX_PROMPT_CHARS_PER_TOKEN", "GenerationStats", "MixtureRunner", "TokenTextStreamer"]

MAX_PROMPT_CHARS_PER_TOKEN = 32  # cheap guard before tokenising a huge paste


class GenerationStats:
    """Counts generate handlers in flight, to show that the queue's concurrency limit holds."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0
        self.completed = 0

    def enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def leave(self, *, completed: bool) -> None:
        with self._lock:
            self.in_flight -= 1
            self.completed += int(completed)


class _StopFlag(StoppingCriteria):
    """Stops ``generate`` when the request goes away (the client disconnected or the event was cancelled)."""

    def __init__(self, event: threading.Event) -> None:
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class TokenTextStreamer(BaseStreamer):
    """The decoded new text after every token, as an iterator fed by ``generate`` in another thread.

    ``transformers.TextIteratorStreamer`` holds text back until a space, which a character-level model
    may never write; decoding the whole answer again per token is cheap at these lengths.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prompt_seen = False
        self._queue: queue.Queue[str | None] = queue.Queue()

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() passes the prompt first
            self._prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._queue.put(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def end(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[str]:
        while (text := self._queue.get()) is not None:
            yield text


class MixtureRunner:
    """Validates requests and streams generations from one model, one at a time."""

    def __init__(self, model: Any, tokenizer: Any, *, max_new_tokens_cap: int, max_prompt_tokens: int) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.lock = threading.Lock()
        self.stats = GenerationStats()
        self.max_new_tokens_cap = int(max_new_tokens_cap)
        self.max_prompt_tokens = int(max_prompt_tokens)
        self.context = getattr(model.config, "max_position_embeddings", None)

    # -------------------------------------------------------------- input checks (each a message in the UI)
    def encode(self, prompt: Any, max_new_tokens: Any, top_k: Any) -> tuple[dict[str, torch.Tensor], int, int | None]:
        if not isinstance(prompt, str) or not prompt.strip():
            raise gr.Error("The prompt is empty: type some text to continue.", print_exception=False)
        cap = self.max_new_tokens_cap
        if max_new_tokens is None or not float(max_new_tokens).is_integer() or not 1 <= max_new_tokens <= cap:
            raise gr.Error(
                f"Max new tokens must be a whole number from 1 to {cap} (this Space's cap); got {max_new_tokens}.",
                print_exception=False,
            )
        n_experts = self.model.n_experts
        if top_k is None or not float(top_k).is_integer() or not 0 <= top_k <= n_experts:
            raise gr.Error(
                f"Top-k experts must be a whole number from 0 (use all experts) to {n_experts} (the number of "
                f"experts in this mixture); got {top_k}.",
                print_exception=False,
            )
        too_long = f"The prompt is too long: this Space takes at most {self.max_prompt_tokens} tokens. Shorten it."
        if len(prompt) > self.max_prompt_tokens * MAX_PROMPT_CHARS_PER_TOKEN:
            raise gr.Error(too_long, print_exception=False)
        inputs = self.tokenizer(prompt, return_tensors="pt")
        n_prompt = inputs["input_ids"].shape[1]
        if n_prompt > self.max_prompt_tokens:
            raise gr.Error(f"{too_long} (It has {n_prompt} tokens.)", print_exception=False)
        if self.context is not None and n_prompt + int(max_new_tokens) > self.context:
            raise gr.Error(
                f"The prompt ({n_prompt} tokens) plus {int(max_new_tokens)} new tokens exceeds the model's context of "
                f"{self.context} tokens: shorten the prompt or lower Max new tokens.",
                print_exception=False,
            )
        inputs = {k: v.to(self.model.device) for k, v in inputs.items() if k in ("input_ids", "attention_mask")}
        return inputs, int(max_new_tokens), (int(top_k) or None)

    # -------------------------------------------------------------- generation
    def stream(
        self, inputs: dict[str, torch.Tensor], gen_kwargs: dict[str, Any], *, seed: int, adapters: bool
    ) -> Iterator[tuple[str, torch.Tensor | None]]:
        """Yield ``(text so far, None)`` while generating, then ``(text, new token ids)``. Call under ``lock``."""
        streamer = TokenTextStreamer(self.tokenizer)
        stop = threading.Event()
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                torch.manual_seed(seed)
                kwargs = dict(
                    inputs, streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopFlag(stop)]), **gen_kwargs
                )
                if adapters:
                    result["ids"] = self.model.generate(**kwargs)
                else:
                    with self.model.disable_adapter():
                        result["ids"] = self.model.generate(**kwargs)
            except BaseException as err:  # re-raised in the handler's thread
                result["error"] = err
                streamer.end()

        thread = threading.Thread(target=work, name="xlora-generate", daemon=True)
        thread.start()
        text = ""
        try:
            for text in streamer:
                yield text, None
        finally:
            stop.set()
            thread.join()
        if "error" in result:
            raise result["error"]
        new_ids = result["ids"][0, inputs["input_ids"].shape[1] :]
        yield self.tokenizer.decode(new_ids, skip_special_tokens=True), new_ids

    def token_texts(self, ids: list[int]) -> list[str]:
        """Each token as text, keeping the leading space that sentencepiece marks with '▁'."""
        texts = []
        for token_id, token in zip(ids, self.tokenizer.convert_ids_to_tokens(ids)):
            text = self.tokenizer.decode([token_id])
            if isinstance(token, str) and token.startswith("▁") and not text.startswith(" "):
                text = " " + text
            texts.append(text.replace("\n", "↵") or "∅")
        return texts

    # -------------------------------------------------------------- one routed generation
    def routed_stream(
        self, inputs: dict[str, torch.Tensor], gen_kwargs: dict[str, Any], *, seed: int, options: dict[str, Any]
    ):
        """Stream the mixture's text with the request's routing settings and the scalings log on; the settings and
        the log are the model's, so both are put back however the generation ends (the next user sees neither).
        Call under ``lock``. Yields ``(text, None, None)`` while streaming, then ``(text, new_ids, log)``."""
        model = self.model
        with model.routing_options(**options):
            model.clear_scalings_log()
            model.enable_scalings_logging()
            try:
                text, new_ids = "", None
                for text, new_ids in self.stream(inputs, gen_kwargs, seed=seed, adapters=True):
                    if new_ids is None:
                        yield text, None, None
                log = model.get_scalings_log()
            finally:
                model.disable_scalings_logging()
                model.clear_scalings_log()
        yield text, new_ids, log

    def routing_state(self, inputs: dict[str, torch.Tensor], new_ids: torch.Tensor, log) -> tuple[dict[str, Any], int]:
        """What the page keeps of one generation (``gr.State``: tokens, prompt length, per-token routing), and
        the number of routed tokens."""
        ids = inputs["input_ids"][0].tolist() + new_ids.tolist()
        routing = routing_from_log(log, len(ids))
        state = {
            "tokens": self.token_texts(ids),
            "n_prompt": inputs["input_ids"].shape[1],
            "n_layers": routing.shape[1],
            "routing": routing.flatten().tolist(),
        }
        return state, routing.shape[0]
