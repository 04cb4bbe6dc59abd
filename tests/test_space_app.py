"""The Gradio Space app on a tiny saved mixture: the API with gradio_client, 20 concurrent clients, bad input.

The app runs in this process (``launch_demo(..., prevent_thread_lock=True)``) on 127.0.0.1; a second copy
of the mixture, loaded from the same folder, gives the expected tokens, routing and base-model output.
Helpers here are shared with ``test_space_browser.py``.
"""

from __future__ import annotations

import os

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MPLBACKEND", "Agg")
for _name in ("NO_PROXY", "no_proxy"):
    os.environ[_name] = ",".join(filter(None, [os.environ.get(_name), "127.0.0.1", "localhost"]))

import signal  # noqa: E402
import socket  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
import uuid  # noqa: E402
from concurrent.futures import ThreadPoolExecutor  # noqa: E402
from pathlib import Path  # noqa: E402

import httpx  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from factories import VOCAB, save_expert, tiny_llama  # noqa: E402

from xlora_hub import XLoraConfig, XLoraModel  # noqa: E402
from xlora_hub.routing import dominant_experts, layer_view, routing_from_log  # noqa: E402
from xlora_hub.space import launch_demo, load_app_module, load_demo  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
EXPERTS = ("math", "code", "poem")
MAX_NEW_CAP = 127  # the app caps new tokens below the tiny model's 128-position context


# ------------------------------------------------------------------------------------------ shared helpers
def char_tokenizer():
    """A character-level fast tokenizer over the tiny models' 128 ids (every id decodes to one character)."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = [chr(c) for c in range(32, 127)] + [chr(c) for c in range(0xC0, 0xC0 + VOCAB - 4 - 95)]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{c: i + 4 for i, c in enumerate(chars)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )


def save_tiny_parts(root: Path) -> tuple[Path, dict[str, str]]:
    """A tiny Llama with a tokenizer in ``root/base`` and three LoRA experts for it: ``(base_dir, {name: dir})``."""
    base_dir = root / "base"
    tiny_llama(seed=0).save_pretrained(base_dir)
    char_tokenizer().save_pretrained(base_dir)
    targets = [["q_proj", "v_proj"], ["up_proj", "down_proj"], ["q_proj", "o_proj"]]
    experts = {
        name: str(save_expert(tiny_llama, root / name, target_modules=targets[i], r=2 + i, seed=i + 1, scale=0.5))
        for i, name in enumerate(EXPERTS)
    }
    return base_dir, experts


def tiny_mixture(base_dir: Path, experts: dict[str, str]) -> XLoraModel:
    """A layer-wise mixture over the saved base model, with a random classifier that routes sharply and varies."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    model = XLoraModel.from_experts(base, XLoraConfig(experts=experts, layerwise_scalings=True))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in model.classifier.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 3.0)
    return model


def save_tiny_mixture(root: Path) -> Path:
    """A saved mixture (experts bundled) with its tokenizer, in ``root/mixture``."""
    base_dir, experts = save_tiny_parts(root)
    folder = root / "mixture"
    tiny_mixture(base_dir, experts).save_pretrained(folder, bundle_experts=True)
    char_tokenizer().save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_ready(url: str, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url + "gradio_api/info", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the app at {url} did not answer in {timeout} s")


def start_app(mixture: Path, *, max_batch_size: int | None = None):
    """Launch the Space app on ``mixture`` in this process; returns ``(blocks, url)``. ``max_batch_size=1`` is the
    one-at-a-time queue; ``None`` the app's default (batched)."""
    port = free_port()
    demo = launch_demo(
        str(mixture), port=port, server_name="127.0.0.1", prevent_thread_lock=True, max_batch_size=max_batch_size
    )
    url = f"http://127.0.0.1:{port}/"
    wait_ready(url)
    return demo, url


def reference(model, tokenizer, prompt: str, max_new_tokens: int) -> dict:
    """What the app must show, computed independently: greedy tokens, routing of a full forward, base output."""
    inputs = tokenizer(prompt, return_tensors="pt")
    n_prompt = inputs["input_ids"].shape[1]
    ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)[0]
    with torch.no_grad():
        model(input_ids=ids[None, :-1])  # the last token is never fed back, so it has no routing
    routing = model.get_latest_scalings()[0].float()
    with model.disable_adapter():
        base_ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=0)[0]
    return {
        "text": tokenizer.decode(ids[n_prompt:], skip_special_tokens=True),
        "base_text": tokenizer.decode(base_ids[n_prompt:], skip_special_tokens=True),
        "tokens": [tokenizer.decode([i]) for i in ids.tolist()],
        "n_prompt": n_prompt,
        "routing": routing,
        "labels": [EXPERTS[j] for j in dominant_experts(layer_view(routing))],
    }


def client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def predict(c, prompt: str, **options):
    return c.predict(*generate_args(prompt, **options), api_name="/generate")


def generate_args(prompt: str, *, max_new_tokens=12, top_k=0, compare_base=True, greedy=True, **overrides) -> list:
    """The /generate endpoint's inputs, in order."""
    args = dict(
        prompt=prompt,
        max_new_tokens=max_new_tokens,
        greedy=greedy,
        temperature=0.8,
        top_p=0.95,
        seed=0,
        top_k=top_k,
        global_weight=1.0,
        softmax_temperature=1.0,
        compare_base=compare_base,
        layer_choice="mean over layers",
    )
    args.update(overrides)
    return list(args.values())


# ------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def mixture_dir(tmp_path_factory) -> Path:
    return save_tiny_mixture(tmp_path_factory.mktemp("space-mixture"))


@pytest.fixture(scope="module")
def loaded(mixture_dir):
    """An independent copy of the mixture (same folder, same weights) for expected values."""
    return load_demo(str(mixture_dir))


@pytest.fixture(scope="module")
def app(mixture_dir):
    """The app as a Space runs it: concurrent requests batched."""
    demo, url = start_app(mixture_dir)
    yield demo, url
    demo.close()


@pytest.fixture(scope="module")
def queued_app(mixture_dir):
    """The app with ``max_batch_size=1``: one request at a time, the others waiting in the queue."""
    demo, url = start_app(mixture_dir, max_batch_size=1)
    yield demo, url
    demo.close()


# ------------------------------------------------------------------------------------------ routing helpers
def test_routing_from_log_matches_a_full_forward(loaded):
    model, tokenizer = loaded.model, loaded.tokenizer
    inputs = tokenizer("routing check", return_tensors="pt")
    for use_cache in (True, False):
        model.clear_scalings_log()
        model.enable_scalings_logging()
        try:
            ids = model.generate(**inputs, max_new_tokens=6, do_sample=False, use_cache=use_cache, pad_token_id=0)[0]
            log = model.get_scalings_log()
        finally:
            model.disable_scalings_logging()
            model.clear_scalings_log()
        routing = routing_from_log(log, ids.shape[0])
        assert routing.shape == (ids.shape[0] - 1, model.n_layers, model.n_experts)
        model(input_ids=ids[None, :-1])
        torch.testing.assert_close(routing, model.get_latest_scalings()[0].float(), atol=1e-5, rtol=1e-5)
    assert routing_from_log([], 5).numel() == 0
    mean = layer_view(routing)
    torch.testing.assert_close(mean, routing.mean(dim=1))
    assert dominant_experts(layer_view(routing, 2)) == routing[:, 2].argmax(-1).tolist()


# ------------------------------------------------------------------------------------------ API
def test_api_generate_matches_the_model(app, loaded):
    _, url = app
    prompt = "Hello Space"
    expected = reference(loaded.model, loaded.tokenizer, prompt, 12)
    text, base_text, highlighted, plot, means, info = predict(client(url), prompt, max_new_tokens=12)

    assert text == expected["text"]
    assert base_text == expected["base_text"]
    assert text != base_text  # the experts change the output
    assert [entry["token"] for entry in highlighted] == expected["tokens"]
    labels = [entry["class_or_confidence"] for entry in highlighted]
    assert labels[:-1] == expected["labels"] and labels[-1] is None
    assert len(set(labels[:-1])) > 1  # the picture shows more than one expert
    assert plot["type"] == "matplotlib" and plot["plot"].startswith("data:image/png;base64,")
    weights = layer_view(expected["routing"])
    got = {c["label"]: c["confidence"] for c in means["confidences"]}
    assert got == pytest.approx({name: float(weights[:, j].mean()) for j, name in enumerate(EXPERTS)}, abs=1e-5)
    assert info["prompt_tokens"] == expected["n_prompt"] and info["new_tokens"] == 12
    assert info["routed_tokens"] == expected["n_prompt"] + 12 - 1


def test_output_streams_token_by_token(app):
    _, url = app
    job = client(url).submit(*generate_args("stream me", max_new_tokens=10, compare_base=False), api_name="/generate")
    final = job.result()[0]
    texts = [out[0] for out in job.outputs() if isinstance(out[0], str) and out[0]]
    partial = [text for text in texts if text != final]
    assert texts[-1] == final
    assert len(set(partial)) >= 3 and all(final.startswith(text) for text in partial)


def test_layer_selector_view(app, loaded):
    app_module = load_app_module()
    routing = torch.rand(5, loaded.model.n_layers, 3)
    state = {
        "tokens": list("abcde"),
        "n_prompt": 3,
        "n_layers": routing.shape[1],
        "routing": routing.flatten().tolist(),
    }
    highlighted, figure, means = app_module.render_routing(state, "2: " + loaded.model.layer_names[2], list(EXPERTS))
    assert [label for _, label in highlighted] == [EXPERTS[j] for j in routing[:, 2].argmax(-1).tolist()]
    assert means == pytest.approx({name: float(routing[:, 2, j].mean()) for j, name in enumerate(EXPERTS)})
    assert figure.axes  # a real matplotlib figure


@pytest.mark.parametrize(
    ("prompt", "overrides", "message"),
    [
        ("", {}, "The prompt is empty"),
        ("   \n ", {}, "The prompt is empty"),
        ("fine", {"max_new_tokens": 10_000}, f"Max new tokens must be a whole number from 1 to {MAX_NEW_CAP}"),
        ("fine", {"max_new_tokens": 0}, "Max new tokens must be a whole number"),
        ("fine", {"top_k": 4}, "Top-k experts must be a whole number from 0 (use all experts) to 3"),
        ("x" * 200, {}, "The prompt is too long"),
    ],
)
def test_bad_input_gives_a_message(app, prompt, overrides, message):
    from gradio_client.exceptions import AppError

    _, url = app
    with pytest.raises(AppError) as info:
        predict(client(url), prompt, **overrides)
    assert message in str(info.value)
    assert "Traceback" not in str(info.value)


def test_sampling_and_xlora_controls(app, loaded):
    _, url = app
    c = client(url)
    first = predict(c, "seeded", greedy=False, seed=7, compare_base=False, top_k=1, global_weight=0.5)
    again = predict(c, "seeded", greedy=False, seed=7, compare_base=False, top_k=1, global_weight=0.5)
    assert first[0] == again[0]  # same seed, same sample
    assert loaded.model.xlora_config.top_k_lora is None  # the app restores the model's settings
    assert first[1] == ""  # no base comparison asked for


def test_a_bad_routing_value_leaves_no_setting_behind(app):
    """A request whose top-k is fine but whose global weight is NaN is refused with one line, and the model
    keeps its own settings: no half-applied top-k stays set for the next user."""
    import gradio as gr

    demo, _ = app
    model = demo.runner.model
    # the app's own /generate function (gradio_client cannot send a NaN: JSON has none)
    generate = next(f.fn for f in demo.fns.values() if f.api_name == "generate")
    before = (model.xlora_config.top_k_lora, model.get_global_scaling_weight(), model.xlora_config.softmax_temperature)
    args = generate_args("fine", top_k=1, global_weight=float("nan"), softmax_temperature=0.5)
    with pytest.raises(gr.Error, match="`global_scaling_weight` must be a finite number"):
        list(generate(*args))
    after = (model.xlora_config.top_k_lora, model.get_global_scaling_weight(), model.xlora_config.softmax_temperature)
    assert after == before == (None, 1.0, 1.0)


# ------------------------------------------------------------------------------------------ load
def test_twenty_concurrent_clients(queued_app, loaded):
    demo, url = queued_app
    stats = demo.generation_stats
    before = stats.completed
    prompts = [f"client {i}" for i in range(20)]
    expected = {p: reference(loaded.model, loaded.tokenizer, p, 8)["text"] for p in prompts[:3]}
    ready = threading.Barrier(len(prompts))

    def one(prompt: str):
        connected = time.perf_counter()
        c = client(url)
        connected = time.perf_counter() - connected
        ready.wait(timeout=120)  # every client sends its request at the same moment
        started = time.perf_counter()
        result = predict(c, prompt, max_new_tokens=8, compare_base=False)
        return prompt, result, connected, started, time.perf_counter()

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        results = list(pool.map(one, prompts))

    assert len(results) == 20
    for prompt, (text, _, highlighted, _, _, info), *_ in results:
        assert isinstance(text, str) and 1 <= info["new_tokens"] <= 8
        assert len(highlighted) == info["prompt_tokens"] + info["new_tokens"]
        if prompt in expected:
            assert text == expected[prompt]
    assert stats.completed - before == 20
    assert stats.max_in_flight == 1, "the generate event ran more than one request at a time"
    spans = sorted((r[1][5]["started_at"], r[1][5]["finished_at"]) for r in results)
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:]))
    connect = max(r[2] for r in results)
    first_sent = min(r[3] for r in results)
    latencies = sorted(r[4] - r[3] for r in results)
    wall = max(r[4] for r in results) - first_sent
    server = [r[1][5]["xlora_seconds"] for r in results]
    print(
        f"\nload test: 20 clients connected in {connect:.2f} s; 20 requests at once answered in {wall:.2f} s wall; "
        f"latency min {latencies[0]:.2f} s, median {statistics.median(latencies):.2f} s, max {latencies[-1]:.2f} s; "
        f"generation (server side) mean {statistics.mean(server) * 1000:.0f} ms; generations in flight at most "
        f"{stats.max_in_flight}"
    )


def _wait_for(condition, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the requests did not reach the batcher in time")
        time.sleep(0.02)


def test_waiting_requests_run_as_one_batch_each_as_if_alone(app, loaded):
    """Requests that wait while the model is busy run as one left-padded batch, and each client gets exactly
    what the mixture gives its prompt alone: text, base model text, tokens and their experts, routing means.
    Requests that cannot share it wait for their own batch (other routing settings; sampling, whose seed must
    give its lone sample); a bad request gets its own message and costs the others nothing."""
    from gradio_client.exceptions import AppError

    demo, url = app
    model, tokenizer = loaded.model, loaded.tokenizer
    greedy = [("Hello Space", 12, True), ("a", 5, False), ("a longer prompt that pads the others", 9, True)]
    greedy += [("xyz", 12, False), ("mid length", 3, True)]
    expected = {p: reference(model, tokenizer, p, n) for p, n, _ in greedy}
    with model.routing_options(top_k_lora=1):
        expected_top1 = reference(model, tokenizer, "only one expert", 6)
    before = len(demo.batch_stats.sizes)
    with ThreadPoolExecutor(max_workers=len(greedy) + 3) as pool:
        clients = list(pool.map(lambda _: client(url), range(len(greedy) + 3)))
        with demo.runner.lock:  # the model is busy: every request waits for the next batch
            futures = {
                p: pool.submit(predict, c, p, max_new_tokens=n, compare_base=b) for (p, n, b), c in zip(greedy, clients)
            }
            top1 = pool.submit(predict, clients[-3], "only one expert", max_new_tokens=6, top_k=1, compare_base=False)
            sampled = pool.submit(predict, clients[-2], "seeded", greedy=False, seed=3, compare_base=False)
            bad = pool.submit(predict, clients[-1], "   ")
            _wait_for(lambda: demo.runner.batcher.waiting == len(greedy) + 2)
        results = {p: f.result(timeout=120) for p, f in futures.items()}
        top1, sampled = top1.result(timeout=120), sampled.result(timeout=120)
        with pytest.raises(AppError, match="The prompt is empty"):
            bad.result(timeout=120)

    for prompt, max_new, compare_base in greedy:
        text, base_text, highlighted, _, means, info = results[prompt]
        want = expected[prompt]
        assert text == want["text"] and info["new_tokens"] == len(want["tokens"]) - want["n_prompt"] <= max_new
        assert base_text == (want["base_text"] if compare_base else "")
        assert [entry["token"] for entry in highlighted] == want["tokens"]
        assert [entry["class_or_confidence"] for entry in highlighted][:-1] == want["labels"]
        weights = layer_view(want["routing"])
        got = {c["label"]: c["confidence"] for c in means["confidences"]}
        assert got == pytest.approx({name: float(weights[:, j].mean()) for j, name in enumerate(EXPERTS)}, abs=1e-4)
        assert info["batch_size"] == len(greedy)
    assert top1[0] == expected_top1["text"] and top1[5]["batch_size"] == 1
    assert sampled[5]["batch_size"] == 1
    assert predict(client(url), "seeded", greedy=False, seed=3, compare_base=False)[0] == sampled[0]  # as alone
    assert sorted(demo.batch_stats.sizes[before : before + 3]) == [1, 1, len(greedy)]
    assert model.xlora_config.top_k_lora is None  # the top-1 batch restored the settings


def test_load_test_script_batched_against_queued(app, queued_app):
    """benchmarks/bench_space_load.py's client run on both apps (a few clients: the script runs 20): every client
    gets the same text from the batched app as from the queue, which ran them one by one; the batched app, its
    model held busy until all six wait, ran them as one batch. The times are printed, never asserted."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_space_load", ROOT / "benchmarks" / "bench_space_load.py")
    bench = importlib.util.module_from_spec(spec)
    sys.modules.setdefault(spec.name, bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    prompts = [f"load {i} " + "x" * i for i in range(6)]
    queued_demo, queued_url = queued_app
    before = len(queued_demo.batch_stats.sizes)
    queued = bench.run_clients(queued_url, prompts, max_new_tokens=6)
    queued["sizes"] = queued_demo.batch_stats.sizes[before:]
    demo, url = app
    before = len(demo.batch_stats.sizes)
    with ThreadPoolExecutor(max_workers=1) as pool, demo.runner.lock:  # all six arrive before the model is free
        future = pool.submit(bench.run_clients, url, prompts, max_new_tokens=6)
        _wait_for(lambda: demo.runner.batcher.waiting == len(prompts))
    batched = future.result(timeout=120)
    batched["sizes"] = demo.batch_stats.sizes[before:]
    runs = {"queued": queued, "batched": batched}
    assert batched["texts"] == queued["texts"] and len(queued["texts"]) == len(prompts)
    assert queued["sizes"] == [1] * len(prompts) and batched["sizes"] == [len(prompts)]
    print(
        "\nload test, 6 clients x 6 tokens: "
        + "; ".join(f"{k} {v['total_seconds']:.2f} s total, batches {v['sizes']}" for k, v in runs.items())
    )


def test_generation_runs_under_spaces_gpu(loaded, monkeypatch):
    """The batch's generation goes through `gpu_function` (`spaces.GPU` on ZeroGPU). Off ZeroGPU (`SPACES_ZERO_GPU`
    unset) `spaces.GPU` returns the function itself, and without the `spaces` package it runs as it is."""
    import xlora_hub.space.runner as runner_module
    from xlora_hub.space import MixtureRunner, gpu_function, on_zero_gpu

    def task(x):
        return x + 1

    monkeypatch.delenv("SPACES_ZERO_GPU", raising=False)
    assert not on_zero_gpu()
    spaces = pytest.importorskip("spaces")  # the demo extra installs it (as a Space's requirements.txt does)
    assert spaces.GPU(task) is task and gpu_function(task) is task
    monkeypatch.setitem(sys.modules, "spaces", None)  # not installed: import fails
    assert gpu_function(task) is task
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert on_zero_gpu()

    calls = []

    def recording(fn):
        def wrapped(*args, **kwargs):
            calls.append(fn.__name__)
            yield from fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(runner_module, "gpu_function", recording)
    runner = MixtureRunner(loaded.model, loaded.tokenizer, max_new_tokens_cap=20, max_prompt_tokens=20)
    inputs = loaded.tokenizer("gpu", return_tensors="pt")
    events = list(
        runner.generation(
            inputs, {"max_new_tokens": 5, "do_sample": False, "pad_token_id": 0}, seed=0, options={}, compare_base=True
        )
    )
    kinds = [kind for kind, _, _ in events]
    assert calls == ["_generate_rows_impl", "_generate_rows_impl"]  # the mixture's pass, then the base model's
    assert kinds[0] == "start" and kinds[-1] == "end" and {"done", "base_done"} <= set(kinds)
    done = next(text for kind, text, _ in events if kind == "done")
    assert done == reference(loaded.model, loaded.tokenizer, "gpu", 5)["text"]


# ------------------------------------------------------------------------------------------ start-up errors
@pytest.mark.parametrize("mixture", ["alice/no-such-mixture-{uid}", "./no/such/folder", "not a repo id!"])
def test_unknown_mixture_fails_at_start_with_one_line(hub, monkeypatch, mixture):
    mixture = mixture.format(uid=uuid.uuid4().hex[:8])
    monkeypatch.setenv("XLORA_MIXTURE", mixture)
    with pytest.raises(SystemExit) as info:
        load_app_module().main()
    message = str(info.value.code)
    assert message.startswith(f"xlora-hub demo: Cannot load the mixture {mixture!r}") and "\n" not in message
    if mixture.startswith("alice/"):
        assert f"no such repo on {hub.url}" in message


@pytest.mark.slow
def test_unknown_mixture_stops_the_space_process(hub, tmp_path):
    mixture = f"alice/no-such-mixture-{uuid.uuid4().hex[:8]}"
    env = {**hub.env(tmp_path), "XLORA_MIXTURE": mixture, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "spaces_app" / "app.py")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"xlora-hub demo: Cannot load the mixture {mixture!r}")
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_gradio_reload_mode_swaps_the_app_and_keeps_the_model(mixture_dir, tmp_path):
    """``gradio app.py`` (reload mode) serves the module-level ``demo``; an edit of the file swaps in the app
    it builds again, while the model loaded once stays (its load is skipped on a re-run)."""
    gradio_cli = Path(sys.executable).with_name("gradio")
    if not gradio_cli.is_file():
        pytest.skip("the gradio command is not installed next to this Python")
    app_file = tmp_path / "app.py"
    app_file.write_text((ROOT / "spaces_app" / "app.py").read_text(encoding="utf-8"), encoding="utf-8")
    port = free_port()
    env = {**os.environ, "XLORA_MIXTURE": str(mixture_dir), "PYTHONPATH": str(ROOT), "GRADIO_SERVER_PORT": str(port)}
    log = open(tmp_path / "gradio.log", "w")
    # Its own process group: the gradio command runs the app in a child process, which `terminate()` of the
    # command alone would leave running after the test.
    proc = subprocess.Popen(
        [str(gradio_cli), str(app_file)], cwd=tmp_path, env=env, stdout=log, stderr=log, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}/"

    def title() -> str:
        return httpx.get(url + "config", timeout=5).json()["title"]

    try:
        wait_ready(url, timeout=240)
        assert title() == "X-LoRA mixture of LoRA experts"
        edited = app_file.read_text(encoding="utf-8").replace('title or "X-LoRA', 'title or "Edited X-LoRA')
        end = time.monotonic() + 60
        while title() != "Edited X-LoRA mixture of LoRA experts" and time.monotonic() < end:
            app_file.write_text(edited, encoding="utf-8")  # again: an edit before the watcher's first scan is missed
            time.sleep(1.0)
        assert title() == "Edited X-LoRA mixture of LoRA experts", (tmp_path / "gradio.log").read_text()[-3000:]
        text = predict(client(url), "reloaded", max_new_tokens=4, compare_base=False)[0]
        assert isinstance(text, str) and text
        logged = (tmp_path / "gradio.log").read_text()
        assert "Watching demo: demo" in logged and "Reloading" not in logged
        assert logged.count("loading the mixture") == 1
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        log.close()
