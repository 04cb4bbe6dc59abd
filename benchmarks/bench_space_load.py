"""Load test of the Space app: N clients at once against the batched app and the one-at-a-time queue.

Both apps serve the same mixture, each in a process of its own (``launch_demo``), on 127.0.0.1; every client is a
``gradio_client.Client`` that sends one ``/generate`` request at the same moment as the others (a barrier).
For each app it reports the total time from the moment the requests are sent to the last answer, the
latency of each request and the sizes of the batches the app ran, and it checks that both apps gave every
client the same text (the batched app's output equals the queued one's).

    python benchmarks/bench_space_load.py                      # the embedded demo mixture, 20 clients
    python benchmarks/bench_space_load.py --clients 20 --max-batch-size 8 --new-tokens 16 --compare-base
    python benchmarks/bench_space_load.py --mixture owner/repo # any mixture (Hub id or folder)
    python benchmarks/bench_space_load.py --quick              # a small demo recipe, 6 clients (seconds)

No timing is asserted anywhere: on a shared machine the numbers are noisy (say so when quoting them).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("MPLBACKEND", "Agg")
for _name in ("NO_PROXY", "no_proxy"):
    os.environ[_name] = ",".join(filter(None, [os.environ.get(_name), "127.0.0.1", "localhost"]))

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a source checkout


@dataclass
class LoadResult:
    """One app under one load: what each client got back, and how long it all took."""

    label: str
    clients: int
    total_seconds: float
    latencies: list[float]
    texts: dict[str, str]
    batch_sizes: list[int] = field(default_factory=list)

    def row(self) -> str:
        lat = sorted(self.latencies)
        sizes = self.batch_sizes
        return (
            f"| {self.label} | {self.clients} | {self.total_seconds:.2f} | {statistics.median(lat):.2f} | "
            f"{lat[-1]:.2f} | {len(sizes)} | {max(sizes, default=0)} |"
        )


def generate_args(prompt: str, *, max_new_tokens: int, compare_base: bool) -> list:
    """The app's ``/generate`` inputs, in order (greedy, the mixture's own routing settings)."""
    return [prompt, max_new_tokens, True, 0.8, 0.95, 0, 0, 1.0, 1.0, compare_base, "mean over layers"]


def run_clients(url: str, prompts: list[str], *, max_new_tokens: int, compare_base: bool = False) -> dict:
    """Connect one client per prompt, send every request at once, and wait for all the answers.

    Returns ``{"total_seconds", "latencies", "texts", "infos"}``; ``total_seconds`` runs from the moment the
    requests are sent (after every client connected) to the last answer.
    """
    from gradio_client import Client

    ready = threading.Barrier(len(prompts))
    sent: list[float] = []

    def one(prompt: str):
        client = Client(url, verbose=False)
        ready.wait(timeout=300)
        started = time.perf_counter()
        sent.append(started)
        out = client.predict(
            *generate_args(prompt, max_new_tokens=max_new_tokens, compare_base=compare_base), api_name="/generate"
        )
        return prompt, out, started, time.perf_counter()

    with ThreadPoolExecutor(max_workers=len(prompts)) as pool:
        results = list(pool.map(one, prompts))
    first = min(sent)
    return {
        "total_seconds": max(r[3] for r in results) - first,
        "latencies": [r[3] - r[2] for r in results],
        "texts": {r[0]: r[1][0] for r in results},
        "base_texts": {r[0]: r[1][1] for r in results},
        "infos": {r[0]: r[1][5] for r in results},
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, timeout: float = 120.0) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            if httpx.get(url + "gradio_api/info", timeout=1.0).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the app at {url} did not answer in {timeout} s")


def _serve(mixture: str | None, port: int, max_batch_size: int):
    """The app in a process of its own (the clients' threads here would share its interpreter lock otherwise)."""
    import subprocess

    code = (
        "import sys; from xlora_hub.space import launch_demo; "
        "launch_demo(None if sys.argv[1] == '-' else sys.argv[1], port=int(sys.argv[2]), server_name='127.0.0.1', "
        "max_batch_size=int(sys.argv[3]))"
    )
    args = [sys.executable, "-c", code, mixture or "-", str(port), str(max_batch_size)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def load_test(
    mixture: str | None,
    *,
    clients: int,
    max_new_tokens: int,
    max_batch_size: int,
    compare_base: bool,
    prompts: list[str],
) -> tuple[LoadResult, LoadResult]:
    """The queued app (``max_batch_size=1``) and the batched one under the same load: ``(queued, batched)``.

    Each app runs in its own process; the batch sizes are read from each answer's run info (``batch_size``).
    """
    results = []
    for label, size in (("one at a time (queue)", 1), (f"batched (max {max_batch_size})", max_batch_size)):
        port = _free_port()
        server = _serve(mixture, port, size)
        try:
            url = f"http://127.0.0.1:{port}/"
            _wait_ready(url, timeout=600)
            run_clients(url, prompts[:2], max_new_tokens=2)  # warm-up: first calls compile and allocate
            out = run_clients(url, prompts[:clients], max_new_tokens=max_new_tokens, compare_base=compare_base)
        finally:
            server.terminate()
            server.wait(60)
        sizes = _batch_sizes(out["infos"].values())
        results.append(LoadResult(label, clients, out["total_seconds"], out["latencies"], out["texts"], sizes))
    return results[0], results[1]


def _batch_sizes(infos) -> list[int]:
    """The sizes of the batches that answered, from each answer's ``batch_size`` and ``started_at``."""
    batches: dict[float, int] = {}
    for info in infos:
        batches[info["started_at"]] = info["batch_size"]
    return [batches[start] for start in sorted(batches)]


def demo_prompts(n: int) -> list[str]:
    """``n`` distinct task prompts of the demo mixture, the tasks in turn."""
    from xlora_hub.demo import TASKS, make_task_examples

    per_task = -(-n // len(TASKS)) + 2
    pools = [list(dict.fromkeys(e["prompt"] for e in make_task_examples(t, per_task * 3, seed=7))) for t in TASKS]
    return [pools[i % len(TASKS)][i // len(TASKS)] for i in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mixture", default=None, help="Hub repo id or folder (default: the embedded demo mixture)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=None, help="default: the app's (8)")
    parser.add_argument("--compare-base", action="store_true", help="each request also runs the base model")
    parser.add_argument("--quick", action="store_true", help="a small demo recipe built here, 6 clients")
    parser.add_argument("--json", type=Path, default=None, help="also write the results to this file")
    args = parser.parse_args(argv)

    from xlora_hub.space import DEFAULT_MAX_BATCH_SIZE

    max_batch_size = args.max_batch_size or DEFAULT_MAX_BATCH_SIZE
    mixture = args.mixture
    clients = 6 if args.quick else args.clients
    if args.quick and mixture is None:
        from xlora_hub.demo import SMALL_RECIPE, build_demo_mixture

        mixture = str(build_demo_mixture(cache_dir=tempfile.mkdtemp(), recipe=SMALL_RECIPE, progress=False))
    prompts = demo_prompts(max(clients, 2))
    queued, batched = load_test(
        mixture,
        clients=clients,
        max_new_tokens=args.new_tokens,
        max_batch_size=max_batch_size,
        compare_base=args.compare_base,
        prompts=prompts,
    )
    same = queued.texts == batched.texts
    print(f"### Space load test: {clients} clients at once, {args.new_tokens} new tokens each (greedy)\n")
    print("| app | clients | total s | median latency s | max latency s | batches | largest batch |")
    print("|---|---|---|---|---|---|---|")
    print(queued.row())
    print(batched.row())
    print(f"\nspeed-up of the batched app (total time): {queued.total_seconds / batched.total_seconds:.2f}x")
    print(f"outputs {'identical' if same else 'DIFFERENT'} between the two apps ({len(queued.texts)} requests)")
    if args.json:
        args.json.write_text(json.dumps({"queued": asdict(queued), "batched": asdict(batched), "same": same}, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
