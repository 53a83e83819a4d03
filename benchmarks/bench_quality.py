"""What each quantization costs in quality: held-out perplexity and greedy agreement with bf16.

    python benchmarks/bench_quality.py [--model DIR] [--data FILE] [--variants fp32,bf16,int8,int4-g64,...]
    python benchmarks/bench_quality.py --variants bf16,bf16+kv8,int4-g64,int4-g64+kv8   # the int8 KV cache

Default model: the small *trained* Phi checkpoint of make_tiny_trained.py (benchmarks/_work/tiny-trained;
Phi-2's architecture, trained on Python's documentation) and its held-out text (heldout.txt, never trained
on). Random weights would say little here: they have no structure for quantization to damage.

For each variant (a dtype, or a quantization format with its group size, on CPU): perplexity of the data
(phikit.evaluate.perplexity: sliding windows of --context tokens, stride half of it), its change relative to
bf16, and greedy decoding of --tokens tokens from each prompt compared token by token with bf16's (the
share of tokens before the first divergence, and how many completions are identical). A variant ending in
``+kv8`` keeps its KV cache in int8 (``phikit.load(kv_cache="int8")``); since evaluate.perplexity runs each
window in one forward without a cache, every variant's perplexity is also measured through its KV cache
(``cached_perplexity``: each window fed 16 tokens a forward, every query attending over the rows read back from
the cache), which is where a cache's rounding shows.
Prints a Markdown table and writes benchmarks/results_quality.json (--out).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import DOC_PROMPTS, HERE, WORK, markdown_table, save_json  # noqa: E402

DEFAULT_VARIANTS = "fp32,bf16,int8,int4-g32,int4-g64,int4-g128,nf4-g64"


def parse_variant(name: str) -> dict:
    """'bf16' -> dtype only; 'int4-g64' -> bf16 activations with int4 weights in groups of 64; a '+kv8' suffix
    -> an int8 KV cache."""
    name, kv8, _ = name.partition("+kv8")
    cache = {"kv_cache": "int8"} if kv8 else {}
    fmt, _, group = name.partition("-g")
    if fmt in ("fp32", "bf16", "fp16"):
        return {"dtype": fmt, **cache}
    return {"dtype": "bf16", "quantize": fmt, "group_size": int(group or 64), **cache}


def cached_perplexity(model, ids: list[int], context: int, chunk: int = 16) -> float:
    """Perplexity over windows of ``context`` tokens (no overlap), each fed ``chunk`` tokens a forward into a new
    KV cache of the model's kind, so that every query attends over keys and values read back from the cache."""
    import math

    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    for start in range(0, len(ids) - 2, context):
        window = torch.tensor([ids[start : start + context + 1]])
        n = window.shape[1] - 1
        cache = model.new_cache(1, n)
        with torch.inference_mode():
            for s in range(0, n, chunk):
                e = min(s + chunk, n)
                logits = model(window[:, s:e], torch.arange(s, e), cache).float()
                nll += F.cross_entropy(logits[0], window[0, s + 1 : e + 1], reduction="sum").item()
                count += e - s
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=WORK / "tiny-trained", help="checkpoint folder")
    ap.add_argument("--data", type=Path, help="text or JSONL file (default: MODEL/heldout.txt)")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated (default {DEFAULT_VARIANTS})")
    ap.add_argument("--context", type=int, default=256, help="perplexity window (default 256, the training length)")
    ap.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt (default 48)")
    ap.add_argument("--out", type=Path, default=HERE / "results_quality.json")
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: no checkpoint at {args.model}; run benchmarks/make_tiny_trained.py or pass --model")
    data = args.data or args.model / "heldout.txt"

    import phikit
    from phikit.evaluate import perplexity, read_text

    results = {}
    for name in args.variants.split(","):
        t0 = time.perf_counter()
        phi = phikit.load(args.model, device="cpu", **parse_variant(name))
        ids = read_text(data, phi.tokenizer)
        ppl = perplexity(phi.model, ids, context=args.context)
        greedy = [
            phi.generate(p, template="raw", max_new_tokens=args.tokens, temperature=0).token_ids for p in DOC_PROMPTS
        ]
        cached = cached_perplexity(phi.model, ids, args.context)
        kind = str(phi.model.cache_dtype()).removeprefix("torch.")
        results[name] = {
            "perplexity": ppl.perplexity,
            "tokens": ppl.tokens,
            "kv_cache": kind,
            "cached_perplexity": cached,
            "greedy": greedy,
        }
        print(
            f"{name}: perplexity {ppl.perplexity:.3f}, through its {kind} KV cache {cached:.3f} "
            f"({time.perf_counter() - t0:.0f} s)",
            file=sys.stderr,
        )

    base = results.get("bf16") or next(iter(results.values()))
    rows = []
    for name, r in results.items():
        prefix = same = total = 0
        for ours, ref in zip(r["greedy"], base["greedy"]):
            n = 0
            while n < min(len(ours), len(ref)) and ours[n] == ref[n]:
                n += 1
            prefix += n
            total += len(ref)
            same += ours == ref
        r["perplexity_change_vs_bf16"] = r["perplexity"] / base["perplexity"] - 1
        r["cached_perplexity_change_vs_bf16"] = r["cached_perplexity"] / base["cached_perplexity"] - 1
        r["greedy_prefix_agreement"] = prefix / total
        r["greedy_identical"] = f"{same}/{len(DOC_PROMPTS)}"
        rows.append(
            {
                "variant": name,
                "ppl": f"{r['perplexity']:.3f}",
                "change": f"{100 * r['perplexity_change_vs_bf16']:+.2f}%",
                "kv": r["kv_cache"],
                "cached": f"{r['cached_perplexity']:.3f}",
                "cached_change": f"{100 * r['cached_perplexity_change_vs_bf16']:+.2f}%",
                "prefix": f"{100 * r['greedy_prefix_agreement']:.0f}%",
                "same": r["greedy_identical"],
            }
        )
    columns = [
        ("variant", "variant"),
        ("ppl", "held-out perplexity"),
        ("change", "vs bf16"),
        ("kv", "KV cache"),
        ("cached", "perplexity through the KV cache"),
        ("cached_change", "vs bf16"),
        ("prefix", "greedy tokens before first divergence from bf16"),
        ("same", "completions identical to bf16"),
    ]
    print(markdown_table(rows, columns))
    for r in results.values():
        r.pop("greedy")
    save_json(
        args.out,
        {"model": str(args.model), "data": str(data), "context": args.context, "results": results},
    )


if __name__ == "__main__":
    main()
