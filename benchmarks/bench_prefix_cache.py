"""The serving prefix cache's memory and lookup time when it is full of small entries.

    python benchmarks/bench_prefix_cache.py [--mb 64] [--prompts 20000] [--tokens 48]

Fills a ``PrefixCache`` of --mb MB (keys/values shaped as a 2-layer model's: 4 heads of 16, fp32, so 16 KB
blocks of 16 tokens) with --prompts distinct random prompts of --tokens tokens, as the server stores each
prefilled prompt, then times the lookup of a prompt that extends a stored one. Reports the process's RSS
growth against the cache's size, the blocks held, and the time of a store and of a lookup.
Writes benchmarks/results_prefix_cache.json.
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, save_json  # noqa: E402


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=int, default=64, help="the cache's size (the server's --prefix-cache-mb)")
    ap.add_argument("--prompts", type=int, default=20000)
    ap.add_argument("--tokens", type=int, default=48, help="tokens per prompt")
    args = ap.parse_args()
    import torch

    from phikit.serve.engine import PrefixCache

    cache = PrefixCache(args.mb << 20)
    k, v = torch.randn(2, 4, args.tokens, 16), torch.randn(2, 4, args.tokens, 16)
    rng = random.Random(0)
    before = rss_mb()
    start = time.perf_counter()
    for _ in range(args.prompts):
        cache.store(0, [rng.randrange(50000) for _ in range(args.tokens)], k, v)
    store_us = (time.perf_counter() - start) / args.prompts * 1e6
    grown = rss_mb() - before
    prompt = [rng.randrange(50000) for _ in range(args.tokens)]
    cache.store(0, prompt, k, v)
    start = time.perf_counter()
    for _ in range(1000):
        reused, _ = cache.lookup(0, prompt + [1, 2, 3])
    lookup_us = (time.perf_counter() - start) / 1000 * 1e6
    row = {
        "cache_mb": args.mb,
        "arena_mb": round(cache.bytes / 2**20, 1),
        "rss_growth_mb": round(grown, 1),
        "blocks_held": len(cache.index),
        "store_us": round(store_us, 1),
        "lookup_us": round(lookup_us, 2),
        "tokens_reused": reused,
    }
    print(f"Machine: {machine()}\n")
    for key, value in row.items():
        print(f"{key}: {value}")
    save_json(HERE / "results_prefix_cache.json", {"machine": machine(), "settings": vars(args), "row": row})


if __name__ == "__main__":
    main()
