"""Serving features under load: the prefix cache's time to first token, and several adapters in one batch.

    python benchmarks/bench_serve_features.py [--layers 8 --hidden 1280 | --full] [--rounds 3]

Both parts run phikit's real server on a loopback port and talk to it through the openai client.

Prefix cache: each round makes a fresh 1,000-token prefix (random ids, seeded; a stand-in for a long
system prompt or few-shot examples), sends prefix + 16 tokens (cold: nothing cached), then prefix + 16
other tokens (warm: the prefix's keys/values come from the cache), streaming, and times the first
streamed token. The same warm request on a server with the cache off gives the cold figure twice over.
Outputs of the warm request with and without the cache must be equal (the tests check this too).

Adapters: 8 concurrent clients, greedy, fixed max_tokens. "single" is a server with one adapter applied to
every request (``--adapter DIR``); "multi" serves the base and two adapters (``--adapter a=DIR
--adapter b=DIR``) with the clients split 3/3/2 over a, b and the base, so each batch mixes them.
Aggregate tokens/s = completion tokens of all clients / wall time; the two servers alternate per round.

Prints Markdown tables and writes benchmarks/results_serve_features.json.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))
from common import WORK, machine, markdown_table, random_phi2, save_json, small_phi  # noqa: E402


def make_adapter(model_folder: Path, out: Path, seed: int) -> Path:
    """A rank-16 adapter on the attention projections with random non-zero B (so it changes the output)."""
    import torch

    import phikit
    from phikit.lora import LoRAConfig, inject_lora, save_adapter

    phi = phikit.load(model_folder, dtype="fp32", device="cpu")
    targets = ["q_proj", "k_proj", "v_proj", "dense"]
    inject_lora(phi.model, LoRAConfig(r=16, alpha=16, dropout=0.0, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    for name, p in phi.model.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=gen) * 0.02
    return save_adapter(phi.model, out)


def first_token_seconds(client, prompt: list[int]) -> tuple[float, str]:
    start = time.perf_counter()
    first, text = None, []
    stream = client.completions.create(model="bench", prompt=prompt, max_tokens=8, temperature=0, stream=True)
    for chunk in stream:
        if first is None and chunk.choices and chunk.choices[0].text:
            first = time.perf_counter() - start
        if chunk.choices:
            text.append(chunk.choices[0].text)
    return first, "".join(text)


def prefix_cache(phi, rounds: int, prefix_len: int) -> list[dict]:
    from test_serve import Server

    from phikit.serve import create_app

    rng = random.Random(0)
    rows = []
    on = create_app(phi.model, phi.tokenizer, "bench", max_batch=4, prefix_cache_mb=512)
    off = create_app(phi.model, phi.tokenizer, "bench", max_batch=4, prefix_cache_mb=0)
    with Server(on) as cached, Server(off) as plain:
        for server in (cached, plain):  # warm up threads, allocator and kernels
            first_token_seconds(server.client(), [rng.randrange(1000, 50000) for _ in range(64)])
        for r in range(rounds):
            prefix = [rng.randrange(1000, 50000) for _ in range(prefix_len)]
            first = prefix + [rng.randrange(1000, 50000) for _ in range(16)]
            second = prefix + [rng.randrange(1000, 50000) for _ in range(16)]
            print(f"prefix cache round {r + 1}/{rounds} ...", file=sys.stderr, flush=True)
            cold, _ = first_token_seconds(cached.client(), first)
            warm, warm_text = first_token_seconds(cached.client(), second)
            no_cache, plain_text = first_token_seconds(plain.client(), second)
            rows.append(
                {
                    "round": r + 1,
                    "cold_s": cold,
                    "warm_s": warm,
                    "no_cache_s": no_cache,
                    "speedup": cold / warm,
                    "same_output": warm_text == plain_text,
                }
            )
    return rows


def adapters(model_folder: Path, phi_loader, rounds: int, clients: int, max_tokens: int, work: Path) -> list[dict]:
    from test_serve import Server

    from phikit.serve import create_app

    a = make_adapter(model_folder, work / "adapter-a", 1)
    b = make_adapter(model_folder, work / "adapter-b", 2)
    single = phi_loader(adapter=a)
    multi = phi_loader()
    servers = {
        "single": create_app(single.model, single.tokenizer, "bench", max_batch=clients, max_queue=64),
        "multi": create_app(
            multi.model, multi.tokenizer, "bench", max_batch=clients, max_queue=64, adapters={"a": a, "b": b}
        ),
    }
    names = {"single": ["bench"] * clients, "multi": [["a", "b", "bench"][i % 3] for i in range(clients)]}
    rows = []
    for r in range(rounds):
        for kind in ("single", "multi") if r % 2 == 0 else ("multi", "single"):
            with Server(servers[kind]) as server:
                client = server.client()
                client.completions.create(model="bench", prompt="warm up", max_tokens=4, temperature=0)

                def run(i: int, client=client, kind=kind) -> int:
                    reply = client.completions.create(
                        model=names[kind][i],
                        prompt=f"Request {i}: the story of a lighthouse keeper and",
                        max_tokens=max_tokens,
                        temperature=0,
                    )
                    return reply.usage.completion_tokens

                print(f"adapters round {r + 1}/{rounds}: {kind} ...", file=sys.stderr, flush=True)
                start = time.perf_counter()
                with ThreadPoolExecutor(clients) as pool:
                    tokens = sum(pool.map(run, range(clients)))
                wall = time.perf_counter() - start
            rows.append({"round": r + 1, "server": kind, "tokens": tokens, "seconds": wall, "tok_s": tokens / wall})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=1280)
    ap.add_argument("--full", action="store_true", help="full-size random Phi-2 (bf16) instead")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prefix", type=int, default=1000, help="shared prefix length in tokens")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--skip", choices=["prefix", "adapters"], help="leave one part out")
    ap.add_argument("--out", type=Path, default=HERE / "results_serve_features.json")
    args = ap.parse_args()
    import phikit

    if args.full:
        folder, shape = random_phi2(), "full-size Phi-2 (random weights)"
    else:
        folder = small_phi(WORK / f"phi-l{args.layers}-h{args.hidden}", args.layers, args.hidden)
        shape = f"Phi {args.layers} layers x {args.hidden} (random weights)"

    def load(adapter=None):
        return phikit.load(folder, dtype="bf16", device="cpu", adapter=adapter)

    result = {"command": " ".join(sys.argv), "machine": machine(), "model": shape}
    print(f"\nMachine: {machine()}\n{shape}, bf16, CPU\n")
    if args.skip != "prefix":
        rows = prefix_cache(load(), args.rounds, args.prefix)
        result["prefix_cache"] = rows
        print(f"Time to first token, {args.prefix}-token shared prefix + 16 new tokens:\n")
        print(
            markdown_table(
                rows,
                [
                    ("round", "round"),
                    ("cold_s", "cold s"),
                    ("warm_s", "cached prefix s"),
                    ("no_cache_s", "cache off s"),
                    ("speedup", "speedup"),
                    ("same_output", "same output"),
                ],
            )
        )
        print(f"median speedup {statistics.median(r['speedup'] for r in rows):.1f}x\n")
    if args.skip != "adapters":
        with tempfile.TemporaryDirectory() as tmp:
            rows = adapters(folder, load, args.rounds, args.clients, args.max_tokens, Path(tmp))
        result["adapters"] = rows
        medians = {k: statistics.median(r["tok_s"] for r in rows if r["server"] == k) for k in ("single", "multi")}
        result["adapter_ratio"] = medians["multi"] / medians["single"]
        print(f"{args.clients} clients, {args.max_tokens} tokens each, greedy:\n")
        print(
            markdown_table(
                rows,
                [("round", "round"), ("server", "server"), ("tokens", "tokens"), ("seconds", "s"), ("tok_s", "tok/s")],
            )
        )
        print(
            f"median tok/s: single adapter {medians['single']:.1f}, base + 2 adapters {medians['multi']:.1f} "
            f"({result['adapter_ratio']:.0%})"
        )
    save_json(args.out, result)


if __name__ == "__main__":
    main()
