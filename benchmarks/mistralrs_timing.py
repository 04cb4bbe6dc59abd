"""Times greedy generation with mistral.rs, in whatever interpreter can import ``mistralrs`` (stdlib otherwise).

``bench_generation.py`` runs this file as a subprocess with ``--mistralrs-python`` (mistral.rs 0.6.0 lives in a
venv of its own: newer releases fail on X-LoRA prompts longer than one token, and it needs no torch). One JSON
argument says what to load and run::

    {"kind": "xlora" | "plain", "arch": "Mistral", "model_id": ..., "xlora_model_id": ..., "order": ...,
     "prompt": ..., "max_tokens": 64, "repeats": 3}

It prints ``LOADED <seconds>`` once the model is loaded, then one ``MISTRALRS <json>`` line: the median wall
time of ``repeats`` greedy completion requests after one warm-up request (``repeats: 0``: one request, untimed),
the number of generated tokens and the text. The prefix cache is off, so every request runs its prompt's
prefill. mistral.rs 0.6.0 ignores ``logit_bias``, so to make exactly ``max_tokens`` tokens the caller gives it a
base folder whose EOS does not stop generation.
"""

from __future__ import annotations

import importlib.metadata
import json
import statistics
import sys
import time


def load(spec: dict):
    """The mistral.rs ``Runner`` for ``spec`` (X-LoRA over the base model, or the base model alone)."""
    import mistralrs as mr

    arch = getattr(mr.Architecture, spec["arch"])
    if spec["kind"] == "xlora":
        which = mr.Which.XLora(
            xlora_model_id=spec["xlora_model_id"], order=spec["order"], arch=arch, model_id=spec["model_id"]
        )
    else:
        which = mr.Which.Plain(model_id=spec["model_id"], arch=arch)
    return mr.Runner(which=which, prefix_cache_n=0, max_seqs=1)


def complete(runner, spec: dict):
    """One greedy completion request of exactly ``max_tokens`` tokens."""
    import mistralrs as mr

    request = mr.CompletionRequest(
        model="bench",
        prompt=spec["prompt"],
        max_tokens=spec["max_tokens"],
        temperature=0.0,
        top_k=1,
    )
    return runner.send_completion_request(request)


def main(argv: list[str]) -> int:
    spec = json.loads(argv[0])
    start = time.perf_counter()
    runner = load(spec)
    print(f"LOADED {time.perf_counter() - start:.3f}", flush=True)
    response = complete(runner, spec)  # warm-up (or the one request of repeats=0)
    times = []
    for _ in range(spec.get("repeats", 3)):
        start = time.perf_counter()
        response = complete(runner, spec)
        times.append(time.perf_counter() - start)
    usage = response.usage
    record = {
        "version": importlib.metadata.version("mistralrs"),
        "seconds": statistics.median(times) if times else None,
        "times": times,
        "completion_tokens": usage.completion_tokens,
        "prompt_tokens": usage.prompt_tokens,
        "text": response.choices[0].text,
    }
    print("MISTRALRS " + json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
