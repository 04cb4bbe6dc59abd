"""Running the Space's requests: checking each one's input, batching the requests that wait (streamed to
each), and the routing each leaves.

The model keeps per-pass routing state, so one batch runs at a time (:attr:`MixtureRunner.lock`); the
requests waiting when it becomes free run as the next batch (:mod:`.batching`), each with the output it
would have alone. Each batch's routing settings are applied with ``model.routing_options`` so that however
it ends, the next batch finds the model as it was. Input errors are ``gr.Error`` with the message the page
shows.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import gradio as gr
import torch

from .batching import Batcher, GenerationRequest, RowResult
from .gpu import gpu_function

__all__ = ["DEFAULT_MAX_BATCH_SIZE", "MAX_PROMPT_CHARS_PER_TOKEN", "GenerationStats", "MixtureRunner"]

MAX_PROMPT_CHARS_PER_TOKEN = 32  # cheap guard before tokenising a huge paste
DEFAULT_MAX_BATCH_SIZE = 8
"""Requests one batch runs at most: the Space's default (1 is the old one-at-a-time queue)."""


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


class MixtureRunner:
    """Validates requests and streams their generations from one model, in batches of ``max_batch_size``."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        max_new_tokens_cap: int,
        max_prompt_tokens: int,
        max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.lock = threading.Lock()
        self.stats = GenerationStats()
        self.batcher = Batcher(model, tokenizer, lock=self.lock, max_batch_size=max_batch_size, wrap=gpu_function)
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
    def generation(
        self,
        inputs: dict[str, torch.Tensor],
        gen_kwargs: dict[str, Any],
        *,
        seed: int,
        options: dict[str, Any],
        compare_base: bool,
    ) -> Iterator[tuple[str, str, RowResult | None]]:
        """Queue one request for the next batch (at once) and return its events (see :class:`~.batching.Batcher`):
        ``("text", text, None)`` while the mixture streams, ``("done", text, result)``, then with
        ``compare_base`` the base model's ``("base_text", ...)`` and ``("base_done", text, result)``."""
        request = GenerationRequest(
            input_ids=inputs["input_ids"],
            gen_kwargs=gen_kwargs,
            seed=seed,
            options=options,
            compare_base=compare_base,
        )
        return self.batcher.submit(request)

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

    def routing_state(
        self, inputs: dict[str, torch.Tensor], new_ids: torch.Tensor, routing: torch.Tensor
    ) -> tuple[dict[str, Any], int]:
        """What the page keeps of one generation (``gr.State``: tokens, prompt length, per-token routing), and
        the number of routed tokens; ``routing`` is the request's ``[tokens, n_layers, n_experts]``."""
        ids = inputs["input_ids"][0].tolist() + new_ids.tolist()
        state = {
            "tokens": self.token_texts(ids),
            "n_prompt": inputs["input_ids"].shape[1],
            "n_layers": routing.shape[1] if routing.dim() == 3 else 0,
            "routing": routing.flatten().tolist(),
        }
        return state, routing.shape[0]
