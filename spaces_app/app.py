"""Gradio Space for an X-LoRA mixture: generate text, see which expert routes each token, compare with the base model.

Runs as a Hugging Face Space (this file at the Space root, next to a copy of ``xlora_hub``) or locally with
``xlora-hub demo``. The mixture comes from ``XLORA_MIXTURE`` (a Hub repo id or a local folder; revision in
``XLORA_REVISION``), else from the Space's ``xlora_space.json``, else the embedded default mixture.

Concurrent requests are batched: the ones waiting when the model becomes free (up to ``max_batch_size``; the
generate event lets twice that many in) run as one left-padded ``generate``, each streamed
and each with the output it would have alone (:class:`~xlora_hub.space.Batcher`); ``max_batch_size=1`` is the
old one-at-a-time queue. On ZeroGPU hardware the batch's generation runs under ``spaces.GPU``. This file holds
the page (layout, handlers, start-up); running requests (:class:`~xlora_hub.space.MixtureRunner`) and drawing
their routing (:func:`~xlora_hub.space.render_routing`) live in the package, which a published Space carries
next to it.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

import gradio as gr

from xlora_hub.errors import XLoraHubError
from xlora_hub.space import (
    ALL_LAYERS,
    DEFAULT_MAX_BATCH_SIZE,
    MAX_UPLOAD_BYTES,
    DemoMixture,
    MixtureRunner,
    display_name,
    expert_colors,
    experts_markdown,
    hide_local_paths,
    load_demo,
    model_card_evidence,
    model_card_summary,
    render_routing,
    space_device,
    space_target,
)

logger = logging.getLogger(__name__)

__all__ = ["build_app", "demo", "expert_colors", "main", "render_routing", "serve"]


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
    """The ``/generate`` event: checks the request, then streams its generation, batched with the others waiting.

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
            yield from run_generation(
                runner, names, inputs, gen_kwargs, int(seed or 0), options, bool(compare_base), layer_choice
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


def run_generation(runner: MixtureRunner, names, inputs, gen_kwargs, seed, options, compare_base, layer_choice):
    """Stream the mixture's output, then its routing picture, then (optionally) the base model's output.

    Yields the seven outputs of ``/generate``; ``gr.skip()`` leaves an output as it is. The request runs in the
    next batch: ``started_at`` and ``finished_at`` are its batch's, ``batch_size`` how many requests it held.
    """
    skip = gr.skip()
    started = base_started = time.time()
    events = runner.generation(inputs, gen_kwargs, seed=seed, options=options, compare_base=compare_base)  # queued
    yield "", "", None, None, None, None, None
    text, base_text, info, shown = "", "", {}, None
    for kind, value, result in events:
        if kind == "start":
            started = value
        elif kind == "end":
            info["finished_at"] = value
        elif kind == "text":
            yield value, skip, skip, skip, skip, skip, skip
        elif kind == "done":
            text, xlora_seconds = value, time.time() - started
            state, routed = runner.routing_state(inputs, result.new_ids, result.routing)
            highlighted, figure, means = render_routing(state, layer_choice, names)
            shown = (highlighted, figure, means, state)
            info |= {
                "prompt_tokens": state["n_prompt"],
                "new_tokens": len(result.new_ids),
                "routed_tokens": routed,
                "xlora_seconds": round(xlora_seconds, 3),
                "tokens_per_second": round(len(result.new_ids) / max(xlora_seconds, 1e-9), 1),
                "started_at": started,
                "batch_size": result.batch_size,
            }
            if compare_base:
                yield text, "", highlighted, figure, means, skip, state
            base_started = time.time()
        elif kind == "base_text":
            yield skip, value, skip, skip, skip, skip, skip
        elif kind == "base_done":
            base_text = value
            info["base_seconds"] = round(time.time() - base_started, 3)
    highlighted, figure, means, state = shown
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
        evidence = model_card_evidence(model_card)
        if evidence:
            gr.Markdown(evidence, elem_id="routing_evidence")


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
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> gr.Blocks:
    """The Space's UI over a loaded ``XLoraModel`` and its tokenizer, with the queue on.

    Up to ``max_batch_size`` requests run as one batch (the generate event lets twice that many in, so the next
    batch gathers while one runs); ``max_batch_size=1`` runs one request at a time, as a queue.

    The returned Blocks carries ``generation_stats`` (a :class:`GenerationStats`) for monitoring and tests,
    ``batch_stats`` (the size of every batch run) and ``runner`` (the :class:`MixtureRunner` that owns the model).
    """
    limits = Limits.for_model(
        model,
        max_new_tokens_cap=max_new_tokens_cap,
        default_max_new_tokens=default_max_new_tokens,
        max_prompt_tokens=max_prompt_tokens,
    )
    runner = MixtureRunner(
        model,
        tokenizer,
        max_new_tokens_cap=limits.max_new_tokens_cap,
        max_prompt_tokens=limits.max_prompt_tokens,
        max_batch_size=max_batch_size,
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
            # Batched, two batches' worth of requests are in flight: one batch runs while the next one gathers (and
            # the requests of the last one draw their routing); one at a time, one.
            concurrency_limit=1 if max_batch_size == 1 else 2 * max_batch_size,
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
    demo.batch_stats = runner.batcher.stats
    demo.runner = runner
    return demo


def page_for(loaded: DemoMixture, *, max_batch_size: int = DEFAULT_MAX_BATCH_SIZE) -> gr.Blocks:
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
        max_batch_size=max_batch_size,
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
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
) -> gr.Blocks:
    """Load a mixture (``None``: the embedded default one), build the app and launch it."""
    blocks = page_for(load_demo(mixture, revision=revision, token=token), max_batch_size=max_batch_size)
    return launch(blocks, port=port, share=share, server_name=server_name, prevent_thread_lock=prevent_thread_lock)


if gr.NO_RELOAD:  # run once: gradio's reload mode re-runs this file on each edit, skipping this block
    _LOADED: dict[tuple[str | None, str | None], DemoMixture] = {}


def loaded_once(mixture: str | None, revision: str | None) -> DemoMixture:
    """The mixture, loaded on the first call only (a reload of this file keeps the model)."""
    key = (mixture, revision)
    if key not in _LOADED:
        logger.info("loading the mixture %s", "(embedded default)" if mixture is None else display_name(mixture))
        loaded = load_demo(mixture, revision=revision)
        device = space_device()  # "cuda" on ZeroGPU: `spaces` attaches the GPU inside the batch's generation
        if device is not None:
            loaded.model.to(device)
        _LOADED[key] = loaded
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
