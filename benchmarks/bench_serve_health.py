"""Does the server stay responsive while huge prompts arrive? /health latency under concurrent multi-MB prompts.

    python benchmarks/bench_serve_health.py [--prompts 6] [--mb 4] [--seconds 10]

A small Phi (random weights) is served by phikit's real server on a loopback port. --prompts clients each
post a completion whose prompt is --mb MB of text (over the model's context, so each ends in a 400 after
the server has looked at it: at --context 2048 without tokenizing it, at 131072 after tokenizing it), again
and again for --seconds, while another client asks /health every 20 ms.
Reports /health's latency (median, p99, max) with and without the prompts, and how long the huge requests
took. Prints a Markdown table and writes benchmarks/results_serve_health.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import WORK, machine, markdown_table, save_json, small_phi  # noqa: E402


def health_latencies(url: str, stop: threading.Event) -> list[float]:
    import httpx

    out = []
    with httpx.Client() as client:
        while not stop.is_set():
            start = time.perf_counter()
            client.get(f"{url}/health", timeout=60)
            out.append(time.perf_counter() - start)
            time.sleep(0.02)
    return out


def summary(values: list[float]) -> dict:
    ordered = sorted(values)
    return {
        "count": len(values),
        "median_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))],
        "max_ms": 1000 * ordered[-1],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=6)
    ap.add_argument("--mb", type=float, default=4)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument(
        "--context",
        type=int,
        default=2048,
        help="the model's context (default 2048); 131072 makes the server tokenize the prompts (a 128k model's)",
    )
    args = ap.parse_args()
    import httpx
    from serving import Server

    import phikit
    from phikit.serve import create_app

    phi = phikit.load(small_phi(WORK / "phi-l2-h320", 2, 320), dtype="bf16", device="cpu")
    phi.model.config.max_position_embeddings = args.context  # rotary positions: any context runs
    text = ("The quick brown fox jumps over the lazy dog. " * int(args.mb * 2**20 / 45 + 1))[: int(args.mb * 2**20)]
    rows, huge = [], []
    app = create_app(phi.model, phi.tokenizer, "bench", max_batch=1, max_body_bytes=int((args.mb + 1) * 2**20))
    with Server(app) as server:
        for label, load in (("idle", 0), (f"{args.prompts} x {args.mb:g} MB prompts", args.prompts)):
            stop = threading.Event()
            latencies: list[float] = []
            poller = threading.Thread(
                target=lambda out=latencies, stop=stop: out.extend(health_latencies(server.url, stop))
            )

            def client(stop: threading.Event = stop) -> None:
                with httpx.Client() as http:
                    while not stop.is_set():
                        start = time.perf_counter()
                        r = http.post(
                            f"{server.url}/v1/completions", json={"prompt": text, "max_tokens": 1}, timeout=300
                        )
                        huge.append((time.perf_counter() - start, r.status_code))

            clients = [threading.Thread(target=client) for _ in range(load)]
            poller.start()
            for c in clients:
                c.start()
            time.sleep(args.seconds)
            stop.set()
            for c in [poller, *clients]:
                c.join()
            rows.append({"load": label, **summary(latencies)})
            print(rows[-1], file=sys.stderr, flush=True)
    statuses = sorted({status for _, status in huge})
    seconds = [s for s, _ in huge]
    note = f"huge requests: {len(huge)}, status {statuses}, median {statistics.median(seconds):.2f} s" if huge else ""
    print(f"\nMachine: {machine()}\n{note}\n")
    columns = [("load", "while"), ("count", "/health calls"), ("median_ms", "median ms"), ("p99_ms", "p99 ms")]
    print(markdown_table(rows, [*columns, ("max_ms", "max ms")]))
    save_json(HERE / "results_serve_health.json", {"command": " ".join(sys.argv), "rows": rows, "huge": note})


if __name__ == "__main__":
    main()
