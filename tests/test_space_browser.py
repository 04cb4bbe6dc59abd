"""The Space in a real browser: Debian's chromium driven by playwright against the app on 127.0.0.1.

Types a prompt, clicks Generate, waits for the streamed text and the routing picture, and checks the tokens
shown and their expert colours against what the model returns for the same prompt. A screenshot is kept in
``test-artifacts/space.png``. In CI (``CI`` set) a missing browser is a failure, not a skip: ``.ci/run``
installs chromium with apt (never ``playwright install``, which downloads browsers).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
from test_space_app import EXPERTS, reference, save_tiny_mixture, start_app

from xlora_hub.evidence import compute_evidence
from xlora_hub.hub.card_evidence import write_evidence
from xlora_hub.routing import layer_view
from xlora_hub.space import load_app_module, load_demo

pytestmark = pytest.mark.browser

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
CHROME_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
]
PROMPT = "Hello Space"
NEW_TOKENS = 16


def _chromium() -> str | None:
    return os.environ.get("CHROMIUM_PATH") or shutil.which("chromium") or shutil.which("chromium-browser")


def _rgba(hex_color: str, alpha: float = 0.5) -> str:
    """How the HighlightedText paints a colour of its ``color_map`` (hex at half opacity)."""
    r, g, b = (int(hex_color[i : i + 2], 16) for i in (1, 3, 5))
    return f"rgba({r}, {g}, {b}, {alpha})"


@pytest.fixture(scope="module")
def browser():
    chromium = _chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if chromium is None or sync_playwright is None:
        missing = "chromium (apt-get install chromium)" if chromium is None else "playwright (pip install playwright)"
        if os.environ.get("CI"):
            pytest.fail(f"The browser test must run in CI but {missing} is missing.")
        pytest.skip(f"{missing} is not installed")
    with sync_playwright() as pw:
        instance = pw.chromium.launch(executable_path=chromium, headless=True, args=CHROME_ARGS)
        yield instance
        instance.close()


EVAL_ROWS = [{"prompt": "2+2=", "completion": "4"}, {"text": "Hello Space, route this"}]


@pytest.fixture(scope="module")
def space(tmp_path_factory):
    """The app on a tiny mixture whose card carries routing evidence (as `push --eval` writes it)."""
    mixture = save_tiny_mixture(tmp_path_factory.mktemp("browser-mixture"))
    loaded = load_demo(str(mixture))
    evidence = compute_evidence(loaded.model, EVAL_ROWS, tokenizer=loaded.tokenizer, plots=False)
    write_evidence(mixture, evidence, repo_id=None, card_name="README.md")
    demo, url = start_app(mixture)
    loaded.evidence = evidence
    yield url, loaded
    demo.close()


@pytest.fixture
def page(browser, space):
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    page = context.new_page()
    outside: list[str] = []
    page.on(
        "request",
        lambda r: outside.append(r.url) if not r.url.startswith(("http://127.0.0.1", "data:", "blob:")) else None,
    )
    page.outside_requests = outside
    yield page
    context.close()


def _token_texts(page) -> list[str]:
    return page.eval_on_selector_all("#tokens .textfield .text", "els => els.map(e => e.textContent)")


def _token_colors(page) -> list[str | None]:
    return page.eval_on_selector_all(
        "#tokens .textfield .text",
        "els => els.map(e => { const t = e.closest('.token'); return t && t.classList.contains('highlighted') "
        "? t.style.backgroundColor : null; })",
    )


def test_generate_in_the_browser(page, space):
    from playwright.sync_api import expect

    url, loaded = space
    started = time.perf_counter()
    expected = reference(loaded.model, loaded.tokenizer, PROMPT, NEW_TOKENS)
    colors = {name: _rgba(hex_color) for name, hex_color in load_app_module().expert_colors(list(EXPERTS)).items()}

    page.goto(url)
    page.locator("#prompt textarea").fill(PROMPT)
    page.locator("#max_new_tokens input").fill(str(NEW_TOKENS))
    page.get_by_role("button", name="Generate").click()
    expect(page.locator("#output textarea")).to_have_value(expected["text"], timeout=30_000)
    expect(page.locator("#base_output textarea")).to_have_value(expected["base_text"], timeout=30_000)
    expect(page.locator("#tokens .textfield .text")).to_have_count(len(expected["tokens"]), timeout=30_000)
    expect(page.locator("#heatmap img").first).to_be_visible(timeout=30_000)

    # The tokens shown are the model's, prompt then generated, each in its dominant expert's colour.
    assert _token_texts(page) == expected["tokens"]
    legend = page.eval_on_selector_all(
        "#tokens .legend-item", "els => els.map(e => [e.textContent.trim(), e.style.backgroundColor])"
    )
    assert dict(legend) == colors
    assert _token_colors(page) == [colors[label] for label in expected["labels"]] + [None]
    assert len(set(expected["labels"])) > 1
    shown_means = page.locator("#expert_means dd.confidence").all_inner_texts()
    assert len(shown_means) == len(EXPERTS)

    # The card's routing evidence: each expert's mean weight and top-1 share, the entropy, the scores.
    evidence = page.locator("#routing_evidence")
    expect(evidence).to_contain_text("Routing evidence")
    rows = evidence.locator("table").first.locator("tbody tr").all_inner_texts()
    shown = [row.split("\t") for row in rows]
    assert [[cell.strip() for cell in row] for row in shown] == [
        [name, f"{weight:.3f}", f"{100 * share:.1f}%"]
        for name, weight, share in zip(
            loaded.evidence.expert_names, loaded.evidence.mean_weights, loaded.evidence.top1_shares
        )
    ]
    expect(evidence).to_contain_text(f"Routing entropy: {loaded.evidence.entropy:.3f} nats")
    expect(evidence).to_contain_text(f"{loaded.evidence.score('X-LoRA mixture').loss:.4f}")

    # The layer selector recolours the tokens with that layer's routing, without generating again.
    layer = 3
    page.locator("#layer input").click()
    page.get_by_role("option", name=f"{layer}: {loaded.model.layer_names[layer]}").click()
    by_layer = [EXPERTS[j] for j in layer_view(expected["routing"], layer).argmax(-1).tolist()]
    expected_colors = [colors[label] for label in by_layer] + [None]
    deadline = time.monotonic() + 20
    while _token_colors(page) != expected_colors and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _token_colors(page) == expected_colors

    ARTIFACTS.mkdir(exist_ok=True)
    page.locator("#layer input").click()
    page.get_by_role("option", name="mean over layers").click()
    time.sleep(0.5)
    page.screenshot(path=str(ARTIFACTS / "space.png"), full_page=True)
    assert page.outside_requests == []
    print(f"\nbrowser test: {time.perf_counter() - started:.1f} s from page load to checked routing")


def test_bad_input_shows_a_message_in_the_page(page, space):
    from playwright.sync_api import expect

    url, _ = space
    page.goto(url)
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("The prompt is empty: type some text to continue.")).to_be_visible(timeout=20_000)
    page.locator("#prompt textarea").fill("fine")
    page.locator("#top_k input").fill("9")
    page.get_by_role("button", name="Generate").click()
    expect(page.get_by_text("Top-k experts must be a whole number from 0")).to_be_visible(timeout=20_000)
    assert page.locator("#output textarea").input_value() == ""
