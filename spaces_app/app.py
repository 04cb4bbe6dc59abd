"""Gradio Space for an X-LoRA mixture: generate text, see which expert routes each token, compare with the base model.

Runs as a Hugging Face Space (this file at the Space root, next to a copy of ``xlora_hub``) or locally with
``xlora-hub demo``. The mixture comes from ``XLORA_MIXTURE`` (a Hub repo id or a local folder; revision in
``XLORA_REVISION``), else from the Space's ``xlora_space.json``, else the embedded default mixture.

The model keeps per-pass routing state, so it runs one generation at a time: the generate event has a
concurrency limit of 1 in the queue, and a lock guards the model as well.
"""

from __future__ import annotations

import logging
import math
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr
import torch
from matplotlib.figure import Figure
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from xlora_hub.errors import XLoraHubError
from xlora_hub.routing import dominant_experts, layer_view, routing_from_log
from xlora_hub.space import (
    MAX_UPLOAD_BYTES,
    DemoMixture,
    display_name,
    expert_infos,
    hide_local_paths,
    load_demo,
    model_card_summary,
    space_target,
)

logger = logging.getLogger(__name__)

# tab10: distinct colours, readable behind dark text at the HighlightedText's opacity.
PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"]
ALL_LAYERS = "mean over layers"
MAX_PROMPT_CHARS_PER_TOKEN = 32  # cheap guard before tokenising a huge paste


def expert_colors(names: list[str]) -> dict[str, str]:
    """One colour per expert, the same in the token view, the legend and the heatmap's strip."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


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


# ------------------------------------------------------------------------------------------ routing picture
def _layer_index(choice: str | None) -> int | None:
    if not choice or choice == ALL_LAYERS:
        return None
    return int(str(choice).split(":", 1)[0])


def render_routing(state: dict[str, Any] | None, layer_choice: str | None, names: list[str]):
    """Token view, heatmap and per-expert means of one generation for one layer (or the mean over layers)."""
    if not state:
        return None, None, None
    routing = torch.tensor(state["routing"], dtype=torch.float32).reshape(-1, state["n_layers"], len(names))
    layer = _layer_index(layer_choice)
    weights = layer_view(routing, layer)
    dominant = dominant_experts(weights)
    tokens = state["tokens"]
    highlighted = [(tok, names[dominant[i]] if i < len(dominant) else None) for i, tok in enumerate(tokens)]
    view = ALL_LAYERS if layer is None else f"layer {layer_choice}"
    figure = routing_figure(weights, tokens, names, n_prompt=state["n_prompt"], title=f"Routing weights ({view})")
    means = {name: float(weights[:, j].mean()) if weights.shape[0] else 0.0 for j, name in enumerate(names)}
    return highlighted, figure, means


def routing_figure(weights: torch.Tensor, tokens: list[str], names: list[str], *, n_prompt: int, title: str) -> Figure:
    """Tokens x experts heatmap, with a strip of each token's dominant-expert colour above it.

    Axes are placed by hand (no constrained layout): rendering stays well under the generation's own time.
    """
    from matplotlib.colors import ListedColormap

    n_tokens, n_experts = weights.shape[0], len(names)
    top, strip, heat, bottom = 0.5, 0.22, 0.3 * max(n_experts, 2), 0.55  # inches
    height = top + strip + 0.05 + heat + bottom
    figure = Figure(figsize=(10, height), dpi=100)
    left, right = 0.09, 0.9
    heat_ax = figure.add_axes((left, bottom / height, right - left, heat / height))
    strip_ax = figure.add_axes(((left, (bottom + heat + 0.05) / height, right - left, strip / height)), sharex=heat_ax)
    bar_ax = figure.add_axes((right + 0.015, bottom / height, 0.012, heat / height))
    image = heat_ax.imshow(
        weights.T.numpy().reshape(n_experts, n_tokens),
        aspect="auto",
        cmap="viridis",
        vmin=0.0,
        vmax=1.0,
        interpolation="nearest",
    )
    figure.colorbar(image, cax=bar_ax, label="weight")
    if n_tokens:
        strip_ax.imshow(
            [dominant_experts(weights)],
            aspect="auto",
            cmap=ListedColormap(list(expert_colors(names).values())),
            vmin=-0.5,
            vmax=n_experts - 0.5,
            interpolation="nearest",
        )
        if 0 < n_prompt < n_tokens:
            for ax in (strip_ax, heat_ax):
                ax.axvline(n_prompt - 0.5, color="white", linewidth=2, linestyle="--")
    strip_ax.set_yticks([0], ["dominant"])
    strip_ax.tick_params(axis="x", labelbottom=False)
    strip_ax.set_title(title + "  (dashed line: end of the prompt)", fontsize=10)
    heat_ax.set_yticks(range(n_experts), names)
    step = max(1, math.ceil(n_tokens / 60))
    labels = [repr(t)[1:-1] for t in tokens[:n_tokens:step]]
    heat_ax.set_xticks(range(0, n_tokens, step), labels, rotation=90, fontsize=7)
    return figure


def experts_markdown(model: Any) -> str:
    rows = ["| expert | repo | rank | alpha | target modules |", "|---|---|---|---|---|"]
    for info in expert_infos(model):
        source = f"[{info.source}]({info.url})" if info.url else f"`{info.source}`"
        targets = ", ".join(f"`{t}`" for t in info.target_modules) or "?"
        rank = "?" if info.rank is None else info.rank
        alpha = "?" if info.alpha is None else info.alpha
        rows.append(f"| **{info.name}** | {source} | {rank} | {alpha} | {targets} |")
    return "\n".join(rows)


# ------------------------------------------------------------------------------------------ handlers
def generation_kwargs(tokenizer: Any, new_tokens: int, greedy: bool, temperature: Any, top_p: Any) -> dict[str, Any]:
    """``generate`` options for one request: greedy, or sampling with temperature and top-p."""
    if not greedy and not temperature > 0:
        raise gr.Error("Temperature must be above 0 for sampling (or tick Greedy).", print_exception=False)
    gen_kwargs: dict[str, Any] = {"max_new_tokens": new_tokens}
    if greedy:
        gen_kwargs["do_sample"] = False
    else:
        gen_kwargs.update(do_sample=True, temperature=float(temperature), top_p=float(top_p), top_k=0)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is not None:
        gen_kwargs["pad_token_id"] = pad
    return gen_kwargs


def make_generate_handler(runner: MixtureRunner, names: list[str]):
    """The ``/generate`` event: checks the request, then streams one generation at a time under the lock.

    Every error reaches the page as one line; the project's own errors (a bad routing value) as they are
    worded, anything else as "Generation failed" with its traceback in the log.
    """

    def generate(
        prompt: str,
        max_new_tokens: float,
        greedy: bool,
        temperature: float,
        top_p: float,
        seed: float,
        top_k: float,
        global_weight: float,
        softmax_temperature: float,
        compare_base: bool,
        layer_choice: str,
    ):
        runner.stats.enter()
        completed = False
        try:
            inputs, new_tokens, k = runner.encode(prompt, max_new_tokens, top_k)
            gen_kwargs = generation_kwargs(runner.tokenizer, new_tokens, greedy, temperature, top_p)
            if softmax_temperature is None or not softmax_temperature > 0:
                raise gr.Error("The softmax temperature must be above 0.", print_exception=False)
            options = dict(top_k_lora=k, global_scaling_weight=global_weight, softmax_temperature=softmax_temperature)
            with runner.lock:
                yield from run_generation(
                    runner, names, inputs, gen_kwargs, int(seed or 0), options, compare_base, layer_choice
                )
            completed = True
        except gr.Error:
            raise
        except XLoraHubError as err:
            raise gr.Error(" ".join(str(err).split()), print_exception=False) from None
        except Exception as err:
            logger.exception("generation failed")
            raise gr.Error(f"Generation failed: {type(err).__name__}: {err}", print_exception=False) from None
        finally:
            runner.stats.leave(completed=completed)

    return generate


def _routed_generation(runner: MixtureRunner, inputs, gen_kwargs, seed: int, options: dict[str, Any]):
    """Stream the mixture's text with the request's routing settings and the scalings log on; the settings and
    the log are the model's, so both are put back however the generation ends (the next user sees neither).
    Yields ``(text, None)`` while streaming, then ``(text, new_ids, log)``."""
    model = runner.model
    with model.routing_options(**options):
        model.clear_scalings_log()
        model.enable_scalings_logging()
        try:
            text, new_ids = "", None
            for text, new_ids in runner.stream(inputs, gen_kwargs, seed=seed, adapters=True):
                if new_ids is None:
                    yield text, None, None
            log = model.get_scalings_log()
        finally:
            model.disable_scalings_logging()
            model.clear_scalings_log()
    yield text, new_ids, log


def routing_state(runner: MixtureRunner, inputs, new_ids: torch.Tensor, log) -> tuple[dict[str, Any], int]:
    """What the page keeps of one generation (``gr.State``: tokens, prompt length, per-token routing), and
    the number of routed tokens."""
    ids = inputs["input_ids"][0].tolist() + new_ids.tolist()
    routing = routing_from_log(log, len(ids))
    state = {
        "tokens": runner.token_texts(ids),
        "n_prompt": inputs["input_ids"].shape[1],
        "n_layers": routing.shape[1],
        "routing": routing.flatten().tolist(),
    }
    return state, routing.shape[0]


def run_generation(runner: MixtureRunner, names, inputs, gen_kwargs, seed, options, compare_base, layer_choice):
    """Stream the mixture's output, then its routing picture, then (optionally) the base model's output.

    Yields the seven outputs of ``/generate``; ``gr.skip()`` leaves an output as it is. Call under the lock.
    """
    skip = gr.skip()
    started = time.time()
    yield "", "", None, None, None, None, None
    for step in _routed_generation(runner, inputs, gen_kwargs, seed, options):
        if step[1] is None:
            yield step[0], skip, skip, skip, skip, skip, skip
    text, new_ids, log = step
    xlora_seconds = time.time() - started
    state, routed = routing_state(runner, inputs, new_ids, log)
    highlighted, figure, means = render_routing(state, layer_choice, names)
    info = {
        "prompt_tokens": state["n_prompt"],
        "new_tokens": len(new_ids),
        "routed_tokens": routed,
        "xlora_seconds": round(xlora_seconds, 3),
        "tokens_per_second": round(len(new_ids) / max(xlora_seconds, 1e-9), 1),
        "started_at": started,
    }
    base_text = ""
    if compare_base:
        yield text, "", highlighted, figure, means, skip, state
        base_started = time.time()
        for base_text, base_ids in runner.stream(inputs, gen_kwargs, seed=seed, adapters=False):
            if base_ids is None:
                yield skip, base_text, skip, skip, skip, skip, skip
        info["base_seconds"] = round(time.time() - base_started, 3)
    info["finished_at"] = time.time()
    yield text, base_text, highlighted, figure, means, info, state


# ------------------------------------------------------------------------------------------ layout
class Limits(NamedTuple):
    """Per-request bounds of one app, fitted to the model's context. (Not a dataclass: gradio's reload mode
    re-runs this file with ``__main__`` missing from ``sys.modules``, which ``dataclasses`` needs.)"""

    max_new_tokens_cap: int
    default_max_new_tokens: int
    max_prompt_tokens: int

    @classmethod
    def for_model(cls, model: Any, *, max_new_tokens_cap: int, default_max_new_tokens: int, max_prompt_tokens: int):
        context = getattr(model.config, "max_position_embeddings", None)
        if context:  # a small model's context bounds both limits (the sum is checked per request)
            max_new_tokens_cap = max(1, min(max_new_tokens_cap, context - 1))
            max_prompt_tokens = max(1, min(max_prompt_tokens, context - 1))
            default_max_new_tokens = min(default_max_new_tokens, max(1, context // 4))
        return cls(max_new_tokens_cap, min(default_max_new_tokens, max_new_tokens_cap), max_prompt_tokens)


def header_markdown(model: Any, title: str, mixture_name: str | None) -> str:
    """The page's title line: the mixture, its experts, its layers and how it routes."""
    names = list(model.expert_names)
    return (
        f"# {title}\n"
        + (f"Mixture: **{mixture_name}** · " if mixture_name else "")
        + f"{len(names)} experts ({', '.join(names)}) over {model.n_layers} X-LoRA layers · "
        + ("layer-wise routing" if model.xlora_config.layerwise_scalings else "one routing for all layers")
    )


def generation_controls(limits: Limits) -> list[Any]:
    """Max new tokens, greedy, temperature, top-p, seed (in the ``/generate`` order)."""
    with gr.Accordion("Generation", open=True):
        return [
            gr.Number(
                value=limits.default_max_new_tokens,
                precision=0,
                label=f"Max new tokens (1-{limits.max_new_tokens_cap})",
                elem_id="max_new_tokens",
            ),
            gr.Checkbox(value=True, label="Greedy (ignore temperature and top-p)", elem_id="greedy"),
            gr.Slider(0.05, 2.0, value=0.8, step=0.05, label="Temperature", elem_id="temperature"),
            gr.Slider(0.05, 1.0, value=0.95, step=0.05, label="Top-p", elem_id="top_p"),
            gr.Number(value=0, precision=0, label="Seed", elem_id="seed"),
        ]


def xlora_controls(model: Any) -> list[Any]:
    """Top-k, global scaling weight, softmax temperature, base comparison (in the ``/generate`` order)."""
    config = model.xlora_config
    with gr.Accordion("X-LoRA", open=True):
        return [
            gr.Number(
                value=config.top_k_lora or 0,
                precision=0,
                label=f"Top-k experts per token (0 = all {model.n_experts})",
                elem_id="top_k",
            ),
            gr.Slider(
                0.0,
                3.0,
                value=config.global_scaling_weight,
                step=0.05,
                label="Global scaling weight",
                elem_id="global_weight",
            ),
            gr.Slider(
                0.05,
                5.0,
                value=config.softmax_temperature,
                step=0.05,
                label="Softmax temperature (routing)",
                elem_id="softmax_temperature",
            ),
            gr.Checkbox(value=True, label="Compare with the base model", elem_id="compare_base"),
        ]


def output_panel(model: Any, names: list[str]) -> dict[str, Any]:
    """Both outputs, the tokens by expert, the layer selector, the heatmap, the means and the run info."""
    with gr.Row():
        output = gr.Textbox(label="X-LoRA mixture", lines=5, interactive=False, elem_id="output")
        base_output = gr.Textbox(label="Base model (adapters off)", lines=5, interactive=False, elem_id="base_output")
    tokens = gr.HighlightedText(
        label="Tokens by dominant expert (prompt, then generated; the last token is not routed yet)",
        color_map=expert_colors(names),
        show_legend=True,
        combine_adjacent=False,
        show_inline_category=False,
        elem_id="tokens",
    )
    layer = gr.Dropdown(
        [ALL_LAYERS] + [f"{i}: {name}" for i, name in enumerate(model.layer_names)],
        value=ALL_LAYERS,
        label="X-LoRA layer",
        visible=bool(model.xlora_config.layerwise_scalings),
        interactive=True,
        elem_id="layer",
    )
    heatmap = gr.Plot(label="Routing heatmap (tokens x experts)", format="png", elem_id="heatmap")
    with gr.Row():
        means = gr.Label(label="Mean weight per expert", num_top_classes=len(names), elem_id="expert_means")
        run_info = gr.JSON(label="Run", elem_id="run_info")
    return {
        "output": output,
        "base_output": base_output,
        "tokens": tokens,
        "layer": layer,
        "heatmap": heatmap,
        "means": means,
        "run_info": run_info,
    }


def experts_panel(model: Any, model_card: str | None) -> None:
    """The experts table and the introduction of the mixture's model card."""
    with gr.Accordion("Experts", open=True, elem_id="experts_panel"):
        gr.Markdown(experts_markdown(model), elem_id="experts")
        summary = model_card_summary(model_card)
        if summary:
            gr.Markdown("### About this mixture\n\n" + summary, elem_id="model_card")


def build_app(
    model: Any,
    tokenizer: Any,
    *,
    title: str | None = None,
    mixture_name: str | None = None,
    model_card: str | None = None,
    examples: list[str] | None = None,
    max_new_tokens_cap: int = 256,
    default_max_new_tokens: int = 48,
    max_prompt_tokens: int = 1024,
    queue_size: int = 64,
) -> gr.Blocks:
    """The Space's UI over a loaded ``XLoraModel`` and its tokenizer, with the queue on.

    The returned Blocks carries ``generation_stats`` (a :class:`GenerationStats`) for monitoring and tests,
    and ``runner`` (the :class:`MixtureRunner` that owns the model).
    """
    limits = Limits.for_model(
        model,
        max_new_tokens_cap=max_new_tokens_cap,
        default_max_new_tokens=default_max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
    )
    runner = MixtureRunner(
        model, tokenizer, max_new_tokens_cap=limits.max_new_tokens_cap, max_prompt_tokens=limits.max_prompt_tokens
    )
    names = list(model.expert_names)
    title = title or "X-LoRA mixture of LoRA experts"
    with gr.Blocks(title=title, analytics_enabled=False) as demo:
        gr.Markdown(header_markdown(model, title, mixture_name))
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                prompt = gr.Textbox(label="Prompt", lines=4, placeholder="Type a prompt…", elem_id="prompt")
                button = gr.Button("Generate", variant="primary", elem_id="generate")
                if examples:
                    gr.Examples([[example] for example in examples], inputs=[prompt], label="Example prompts")
                controls = [prompt, *generation_controls(limits), *xlora_controls(model)]
            with gr.Column(scale=2):
                out = output_panel(model, names)
        experts_panel(model, model_card)
        state = gr.State(None)
        button.click(
            make_generate_handler(runner, names),
            inputs=[*controls, out["layer"]],
            outputs=[out[key] for key in ("output", "base_output", "tokens", "heatmap", "means", "run_info")] + [state],
            api_name="generate",
            concurrency_limit=1,
            concurrency_id="model",
        )
        out["layer"].change(
            lambda s, choice: render_routing(s, choice, names),
            inputs=[state, out["layer"]],
            outputs=[out["tokens"], out["heatmap"], out["means"]],
            api_name="show_layer",
        )
    demo.queue(max_size=queue_size, default_concurrency_limit=1)
    demo.generation_stats = runner.stats
    demo.runner = runner
    return demo


def page_for(loaded: DemoMixture) -> gr.Blocks:
    """The app for a loaded mixture; the page names a local mixture, base model or expert by its folder
    name, never its path."""
    base = getattr(loaded.model.xlora_config, "base_model", None)
    local = [loaded.name, getattr(base, "repo_id", None), *(str(e.local_dir) for e in loaded.model.experts)]
    return build_app(
        loaded.model,
        loaded.tokenizer,
        mixture_name=display_name(loaded.name) + (f"@{loaded.revision}" if loaded.revision else ""),
        model_card=hide_local_paths(loaded.card, local) if loaded.card else loaded.card,
        examples=loaded.examples,
    )


def launch(
    blocks: gr.Blocks,
    *,
    port: int | None = None,
    share: bool = False,
    server_name: str | None = None,
    prevent_thread_lock: bool = False,
) -> gr.Blocks:
    """Launch the app with uploads capped at :data:`~xlora_hub.space.MAX_UPLOAD_BYTES` (it has no file input)."""
    blocks.launch(
        server_name=server_name,
        server_port=port,
        share=share,
        inbrowser=False,
        ssr_mode=False,
        prevent_thread_lock=prevent_thread_lock,
        max_file_size=MAX_UPLOAD_BYTES,
    )
    return blocks


def serve(
    mixture: str | None = None,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    port: int | None = None,
    share: bool = False,
    server_name: str | None = None,
    prevent_thread_lock: bool = False,
) -> gr.Blocks:
    """Load a mixture (``None``: the embedded default one), build the app and launch it."""
    blocks = page_for(load_demo(mixture, revision=revision, token=token))
    return launch(blocks, port=port, share=share, server_name=server_name, prevent_thread_lock=prevent_thread_lock)


if gr.NO_RELOAD:  # run once: gradio's reload mode re-runs this file on each edit, skipping this block
    _LOADED: dict[tuple[str | None, str | None], DemoMixture] = {}


def loaded_once(mixture: str | None, revision: str | None) -> DemoMixture:
    """The mixture, loaded on the first call only (a reload of this file keeps the model)."""
    key = (mixture, revision)
    if key not in _LOADED:
        logger.info("loading the mixture %s", "(embedded default)" if mixture is None else display_name(mixture))
        _LOADED[key] = load_demo(mixture, revision=revision)
    return _LOADED[key]


demo: gr.Blocks | None = None
"""The app :func:`main` serves (``None`` until it runs): ``gradio spaces_app/app.py`` (reload mode) finds it
here and swaps in the one each re-run of this file builds. Importing this file loads no model."""


def main() -> None:
    """Entry point of the Space: serve the mixture named by ``XLORA_MIXTURE`` or ``xlora_space.json``."""
    global demo
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    mixture, revision = space_target(Path(__file__).resolve().parent)
    try:
        demo = page_for(loaded_once(mixture, revision))
    except XLoraHubError as err:
        from xlora_hub.redact import redact

        sys.exit(f"xlora-hub demo: {redact(' '.join(str(err).split()))}")  # the Space's HF_TOKEN secret included
    launch(demo)  # returns at once when gradio's reload mode re-runs this file


if __name__ == "__main__":
    main()
