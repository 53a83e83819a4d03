"""fp16 against int8 KV cache: decode speed after long contexts, same process, same weights, caches alternating.

    python benchmarks/bench_kv_cache.py [--model DIR] [--precision int4] [--depths 4096,16384,32768] [--rounds 3]

Default model: the random full-size Phi-4-mini of bench_vs_llamacpp.py --family phi3 (benchmarks/_work, made
once). The weights are loaded once; every round measures each depth with both caches, the order swapped each
round, and ``tensor.sum``'s bandwidth right before (these VMs drift by tens of percent within minutes). Each
measurement is ``phikit.bench.decode_at_depth``, what ``phikit bench --depth`` runs: a cache of random keys and
values (an int8 one quantized as a prefill writes it), then --new-tokens decoding steps. The bandwidth limit
counts the weights' bytes and the cache's bytes at the steps' mean context (fp16: 2 bytes a value; int8: 1 and
an fp32 scale a row of head_dim values).

Prints a Markdown table and writes benchmarks/results_kv_cache.json (--out).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from common import BYTES_PER_WEIGHT, isa_flags, linear_weights, markdown_table, random_phi3, save_json, sum_bandwidth  # noqa: E402

CACHES = ("fp16", "int8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint folder (default: the random full-size Phi-4-mini)")
    ap.add_argument("--precision", default="int4", choices=["bf16", "int8", "int4"])
    ap.add_argument("--depths", default="4096,16384,32768", help="tokens of context (comma-separated)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16, help="decoding steps per measurement (default 16)")
    ap.add_argument("--out", type=Path, default=HERE / "results_kv_cache.json")
    args = ap.parse_args()

    import torch

    import phikit
    from phikit.bench import decode_at_depth

    model_dir = args.model or random_phi3("phi4-mini")
    depths = [int(d) for d in args.depths.split(",")]
    quantize = args.precision if args.precision != "bf16" else None
    phi = phikit.load(model_dir, dtype="bf16", device="cpu", quantize=quantize)
    model = phi.model
    weight_bytes = BYTES_PER_WEIGHT[args.precision] * linear_weights(model_dir)
    dtypes = {"fp16": torch.float16, "int8": torch.int8}
    token = phi.tokenizer.encode("The")[0]
    decode_at_depth(model, 256, 4, token, dtypes["int8"])  # warm-up: the kernels' first load, the plan
    samples: dict[tuple[str, int], list[dict]] = {}
    for r in range(args.rounds):
        for d in depths:
            order = CACHES if r % 2 == 0 else CACHES[::-1]
            gbs = sum_bandwidth()
            for kind in order:
                tok_s = decode_at_depth(model, d, args.new_tokens, token, dtypes[kind])
                kv = model.kv_cache_bytes(d + args.new_tokens // 2, dtype=dtypes[kind])
                share = tok_s / (gbs * 1e9 / (weight_bytes + kv))
                samples.setdefault((kind, d), []).append({"tok_s": tok_s, "sum_gb_s": gbs, "of_limit": share})
                print(
                    f"round {r + 1} depth {d} {kind}: {tok_s:.2f} tok/s ({share:.0%} of the limit at {gbs:.1f} GB/s)",
                    file=sys.stderr,
                    flush=True,
                )
    rows = []
    for d in depths:
        fp16 = [s["tok_s"] for s in samples[("fp16", d)]]
        for kind in CACHES:
            runs = samples[(kind, d)]
            tok_s = [s["tok_s"] for s in runs]
            rows.append(
                {
                    "depth": d,
                    "kv_cache": kind,
                    "kv_cache_gb": model.kv_cache_bytes(d, dtype=dtypes[kind]) / 1e9,
                    "decode_tok_s": statistics.median(tok_s),
                    "range": f"{min(tok_s):.2f}-{max(tok_s):.2f}",
                    "vs_fp16": f"{statistics.median(a / b for a, b in zip(tok_s, fp16)):.2f}x",
                    "of_limit": f"{statistics.median(s['of_limit'] for s in runs):.0%}",
                }
            )
    columns = [
        ("depth", "context"),
        ("kv_cache", "KV cache"),
        ("kv_cache_gb", "cache GB"),
        ("decode_tok_s", "decode tok/s (median)"),
        ("range", "range"),
        ("vs_fp16", "vs fp16 (median of rounds)"),
        ("of_limit", "of the bandwidth limit with the cache"),
    ]
    print(f"\n{model_dir.name} {args.precision}, {args.rounds} rounds, CPU flags: {isa_flags()}\n")
    print(markdown_table(rows, columns))
    payload = {"model": str(model_dir), "precision": args.precision, "cpu_flags": isa_flags(), "rows": rows}
    payload["samples"] = {f"{k} {d}": v for (k, d), v in samples.items()}
    save_json(args.out, payload)


if __name__ == "__main__":
    main()
