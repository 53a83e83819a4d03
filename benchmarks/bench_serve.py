"""Aggregate serving throughput with 1, 4 and 16 concurrent clients: continuous batching vs one at a time.

    python benchmarks/bench_serve.py [--layers 8 --hidden 1280] [--clients 1,4,16] [--max-tokens 64]
    python benchmarks/bench_serve.py --step 16     # the batched decoding step alone, against two limits

A small Phi-shaped model (random weights, made by transformers) is served by phikit's real server on a
loopback port; each client thread sends --requests-per-client completions back to back (greedy, fixed
max_tokens) through the openai client. Aggregate tokens/s = completion tokens of all clients / wall time.
"One at a time" is the same server with --max-batch 1 (requests queue and run one after another).
Prints a Markdown table and writes benchmarks/results_serve.json.

``--step ROWS`` times the engine's work per step without the server: the model's one-call decoding step for
ROWS rows (each after 24 tokens of context; median of 30 steps) and the output head alone, against what the
machine allows: the step's weight reads at ``tensor.sum``'s bandwidth and its FLOPs at PyTorch's bf16 matmul
rate over 256 rows (this machine's measured compute; the head and each layer read every weight once).
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import WORK, machine, markdown_table, save_json, small_phi  # noqa: E402


def measure(phi, max_batch: int, clients: int, requests: int, max_tokens: int) -> dict:
    from serving import Server

    from phikit.serve import create_app

    app = create_app(
        phi.model, phi.tokenizer, "bench", max_batch=max_batch, max_queue=256, default_max_tokens=max_tokens
    )
    with Server(app) as server:
        client = server.client()
        client.completions.create(model="bench", prompt="warm up", max_tokens=4, temperature=0)

        def run_client(i: int) -> int:
            tokens = 0
            for j in range(requests):
                reply = client.completions.create(
                    model="bench",
                    prompt=f"Request {i}.{j}: the story of a lighthouse",
                    max_tokens=max_tokens,
                    temperature=0,
                )
                tokens += reply.usage.completion_tokens
            return tokens

        start = time.perf_counter()
        with ThreadPoolExecutor(clients) as pool:
            total = sum(pool.map(run_client, range(clients)))
        wall = time.perf_counter() - start
    return {"clients": clients, "max_batch": max_batch, "tokens": total, "seconds": wall, "tok_s": total / wall}


def step(phi, folder: Path, rows: int, steps: int = 30) -> dict:
    """The batched step and its head, timed, and the two limits (see the module docstring)."""
    import statistics

    import torch
    import torch.nn.functional as F
    from common import linear_weights, sum_bandwidth

    model = phi.model
    cache = model.new_cache(rows, 24 + steps + 1)
    with torch.inference_mode():
        ids = torch.randint(0, 50000, (rows, 24), generator=torch.Generator().manual_seed(0))
        for r in range(rows):
            model.prefill(ids[r : r + 1], torch.arange(24), cache.rows(r))
        token, times = ids[:, -1:], []
        for t in range(24, 24 + steps):
            started = time.perf_counter()
            logits = model.decode_step(token, torch.full((rows, 1), t), cache)
            times.append(time.perf_counter() - started)
            token = logits[:, -1].argmax(-1, keepdim=True)
        x = torch.randn(rows, 1, model.config.hidden_size)
        head = []
        for _ in range(steps):
            started = time.perf_counter()
            model.lm_head(x)
            head.append(time.perf_counter() - started)
        a, b = torch.randn(256, 1280).bfloat16(), torch.randn(3840, 1280).bfloat16()
        F.linear(a, b)
        started = time.perf_counter()
        for _ in range(10):
            F.linear(a, b)
        peak = 10 * 2 * 256 * 3840 * 1280 / (time.perf_counter() - started) / 1e9
    weights = linear_weights(folder)
    bandwidth = sum_bandwidth()
    gflop = 2 * rows * weights / 1e9
    ms = statistics.median(times) * 1e3
    return {
        "rows": rows,
        "step_ms": ms,
        "head_ms": statistics.median(head) * 1e3,
        "weights": weights,
        "gflop": gflop,
        "gflop_s": gflop / ms * 1e3,
        "bf16_matmul_gflop_s": peak,
        "compute_limit_ms": gflop / peak * 1e3,
        "sum_gb_s": bandwidth,
        "weights_gb_s": 2 * weights / ms / 1e6,
        "bandwidth_limit_ms": 2 * weights / bandwidth / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1280)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--step", type=int, metavar="ROWS", help="time the batched decoding step of ROWS rows only")
    ap.add_argument("--out", type=Path, default=HERE / "results_serve.json")
    args = ap.parse_args()
    import phikit

    model = small_phi(WORK / f"phi-l{args.layers}-h{args.hidden}", args.layers, args.hidden)
    phi = phikit.load(model, dtype="bf16", device="cpu")
    if args.step:
        result = step(phi, model, args.step)
        print(f"Machine: {machine()}\nPhi {args.layers} layers x {args.hidden} (bf16), {args.step} rows")
        for key, value in result.items():
            print(f"  {key}: {value:.4g}" if isinstance(value, float) else f"  {key}: {value}")
        save_json(args.out, {"command": " ".join(sys.argv), "step": result})
        return
    rows = []
    for clients in [int(c) for c in args.clients.split(",")]:
        for max_batch in (1, 16):
            print(f"{clients} clients, max batch {max_batch} ...", file=sys.stderr, flush=True)
            rows.append(measure(phi, max_batch, clients, args.requests_per_client, args.max_tokens))
    base = {r["clients"]: r["tok_s"] for r in rows if r["max_batch"] == 1}
    for r in rows:
        r["mode"] = "one at a time" if r["max_batch"] == 1 else "continuous batching"
        r["speedup"] = f"{r['tok_s'] / base[r['clients']]:.2f}x"
    print(
        f"\nMachine: {machine()}\nPhi {args.layers} layers x {args.hidden} (bf16 weights), CPU, greedy, "
        f"{args.max_tokens} tokens per request, {args.requests_per_client} requests per client\n"
    )
    print(
        markdown_table(
            rows,
            [
                ("clients", "clients"),
                ("mode", "serving"),
                ("tokens", "tokens"),
                ("seconds", "seconds"),
                ("tok_s", "aggregate tok/s"),
                ("speedup", "vs one at a time"),
            ],
        )
    )
    save_json(args.out, {"command": " ".join(sys.argv), "rows": rows})


if __name__ == "__main__":
    main()
