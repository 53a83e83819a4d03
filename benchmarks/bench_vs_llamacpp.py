"""phikit vs llama.cpp vs transformers on one checkpoint, this machine, same run: prefill and decode tok/s.

    python benchmarks/bench_vs_llamacpp.py [--model DIR] [--rounds 3] [--prompt-tokens 512] [--new-tokens 128]
    python benchmarks/bench_vs_llamacpp.py --family phi3 [--depths 4096,16384,32768]

--family phi2 (the default) measures a random full-size Phi-2; --family phi3 random full-size Phi-3-mini
(Phi-3.5-mini's shape: 32 x 3072, 32 heads of 96, LongRoPE to 128k) and Phi-4-mini (24 query / 8 key-value
heads of 128, partial rotary 0.75, tied embeddings, vocabulary 200064), each made once in benchmarks/_work
with the real tokenizer from ../shared/data. --depths adds decode after that many tokens of context for
phikit (--depth-precision) and llama.cpp (llama-bench -d, flash attention off and on, or one of them with
--depth-flash-attn: each setting prefills the context again, over half an hour at 32k on two cores); phikit's
cache is filled with random keys and values (a step's cost does not depend on them), llama-bench prefills.

Pairs compared (same bits per weight): phikit bf16 / llama.cpp F16, phikit int8 (per-channel) / Q8_0,
phikit int4 (group 64, fp16 scale + minimum: 4.5 bits) / Q4_0 (group 32, fp16 scale: 4.5 bits).
Memory bandwidth on a shared VM drifts by tens of percent within minutes, so the engines alternate:
every round measures each phikit precision and then its llama.cpp pair, and the table reports medians
over rounds, the ratio to llama.cpp as the median of each round's pair, and the share of the bandwidth limit
against ``tensor.sum`` (2 GB on 2 MB pages, as phikit's weights are) measured right before each run: the
weights a step reads, and (the next column) those plus the fp16 KV cache at the decode's mean context.
transformers bf16 (the baseline of the other ratios) runs once a round. llama.cpp is built and the GGUF files
are made by bench_llamacpp.py (nothing of it is committed); each GGUF is put in the page cache on 2 MB pages
before llama-bench maps it, as phikit's loader does with its weight files, so both engines stream weights
the same way.

Prints a Markdown table and writes benchmarks/results_vs_llamacpp.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import (  # noqa: E402
    BYTES_PER_WEIGHT,
    decode_kv_bytes,
    isa_flags,
    linear_weights,
    machine,
    markdown_table,
    random_phi2,
    random_phi3,
    save_json,
    sum_bandwidth,
)

from phikit.bench import BenchSettings, run_one  # noqa: E402

PAIRS = [("bf16", "f16"), ("int8", "q8_0"), ("int4", "q4_0")]
FAMILIES = {"phi2": ["phi2"], "phi3": ["phi3-mini", "phi4-mini"]}


def llama(model: Path, gguf_type: str, prompt: int, new: int) -> dict:
    """One llama-bench measurement (one repetition) through bench_llamacpp.py."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [
            sys.executable,
            str(HERE / "bench_llamacpp.py"),
            "--model",
            str(model),
            "--types",
            gguf_type,
            "-p",
            str(prompt),
            "-n",
            str(new),
            "-r",
            "1",
            "--out",
            str(out),
        ]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"llama.cpp run failed:\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())["rows"][0]


def llama_depths(model: Path, gguf_type: str, depths: list[int], new: int, flash_attn: str = "0,1") -> list[dict]:
    """Decode after each depth with llama-bench (flash attention off and on by default), one repetition."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        cmd = [sys.executable, str(HERE / "bench_llamacpp.py"), "--model", str(model), "--types", gguf_type]
        cmd += ["-p", "0", "-n", str(new), "-r", "1", "-d", ",".join(map(str, depths)), "-fa", flash_attn]
        cmd += ["--out", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"llama.cpp depth run failed:\n{proc.stderr[-2000:]}")
        return json.loads(out.read_text())["rows"]


def bench_model(model: Path, args, pairs) -> dict:
    """Interleaved rounds on one checkpoint; returns the rows and samples."""
    settings = BenchSettings(str(model), [], prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=1)
    samples: dict[tuple[str, str], list[dict]] = {}
    bandwidth: list[float] = []
    for r in range(args.rounds):
        bandwidth.append(sum_bandwidth())
        print(
            f"{model.name} round {r + 1}/{args.rounds}: tensor.sum {bandwidth[-1]:.1f} GB/s",
            file=sys.stderr,
            flush=True,
        )
        for precision, gguf_type in pairs:
            print(f"{model.name} round {r + 1}/{args.rounds}: phikit {precision}", file=sys.stderr, flush=True)
            before = sum_bandwidth()  # the limit of this very run: the VM's bandwidth drifts within minutes
            row = run_one(settings, "phikit", precision)
            if "error" in row:
                raise SystemExit(f"phikit {precision} failed: {row['error']}")
            samples.setdefault(("phikit", precision), []).append({**row, "sum_gb_s": before})
            print(f"{model.name} round {r + 1}/{args.rounds}: llama.cpp {gguf_type}", file=sys.stderr, flush=True)
            before = sum_bandwidth()
            theirs = llama(model, gguf_type, args.prompt_tokens, args.new_tokens)
            samples.setdefault(("llama.cpp", gguf_type), []).append({**theirs, "sum_gb_s": before})
        if not args.no_transformers:
            print(f"{model.name} round {r + 1}/{args.rounds}: transformers bf16", file=sys.stderr, flush=True)
            row = run_one(settings, "transformers", "bf16")
            if "error" in row:
                raise SystemExit(f"transformers bf16 failed: {row['error']}")
            samples.setdefault(("transformers", "bf16"), []).append(row)
    base = statistics.median(x["decode_tok_s"] for x in samples.get(("transformers", "bf16"), [{"decode_tok_s": 0}]))
    gbs = statistics.median(bandwidth)
    weights, kv = linear_weights(model), decode_kv_bytes(model, args.prompt_tokens, args.new_tokens)
    rows = []
    for (engine, precision), runs in samples.items():
        row = {
            "model": model.name,
            "engine": engine,
            "precision": precision,
            "runs": len(runs),
            "prefill_tok_s": statistics.median(x["prefill_tok_s"] for x in runs),
            "decode_tok_s": statistics.median(x["decode_tok_s"] for x in runs),
        }
        if engine != "llama.cpp":
            row["peak_memory_gb"] = max(x["peak_memory_gb"] for x in runs)
            row["load_s"] = statistics.median(x["load_s"] for x in runs)
        if engine != "transformers":  # each run against tensor.sum measured just before it
            per_token = BYTES_PER_WEIGHT[precision] * weights
            share = statistics.median(x["decode_tok_s"] * per_token / (x["sum_gb_s"] * 1e9) for x in runs)
            row["decode_of_bandwidth_limit"] = f"{share:.0%}"
            per_token += kv  # + the fp16 KV cache read
            share = statistics.median(x["decode_tok_s"] * per_token / (x["sum_gb_s"] * 1e9) for x in runs)
            row["decode_of_limit_with_kv"] = f"{share:.0%}"
        if engine == "phikit":
            row["prefill_paths"] = runs[-1].get("prefill_paths", {})
            pair = dict(PAIRS)[precision]
            theirs = samples.get(("llama.cpp", pair), [])
            if len(theirs) == len(runs):  # each round's phikit run against the llama.cpp run right after it
                ratios = [a["decode_tok_s"] / b["decode_tok_s"] for a, b in zip(runs, theirs, strict=True)]
                row["decode_vs_llama_cpp"] = f"{statistics.median(ratios):.2f}x"
                ratios = [a["prefill_tok_s"] / b["prefill_tok_s"] for a, b in zip(runs, theirs, strict=True)]
                row["prefill_vs_llama_cpp"] = f"{statistics.median(ratios):.2f}x"
        if base:
            row["decode_vs_transformers_bf16"] = f"{row['decode_tok_s'] / base:.2f}x"
        rows.append(row)
    order = {"phikit": 0, "llama.cpp": 1, "transformers": 2}
    rank = {p: i for i, pair in enumerate(PAIRS) for p in pair}
    rows.sort(key=lambda r: (rank.get(r["precision"], 9), order[r["engine"]]))
    result = {"model": str(model), "rows": rows, "sum_bandwidth_gb_s": bandwidth, "linear_weights": weights}
    result["samples"] = {f"{e} {p}": v for (e, p), v in samples.items()}
    if args.depths:
        result["depth_rows"] = depth_rows(model, args, gbs, weights)
    return result


def depth_rows(model: Path, args, gbs: float, weights: int) -> list[dict]:
    """Decode after each depth: phikit (--depth-precision) then llama.cpp (its pair, flash attention off/on)."""
    precision = args.depth_precision
    gguf_type = dict(PAIRS)[precision]
    depths = [int(d) for d in args.depths.split(",")]
    print(f"{model.name}: phikit {precision} decode after {depths} tokens", file=sys.stderr, flush=True)
    settings = BenchSettings(
        str(model), [], prompt_tokens=16, new_tokens=args.depth_new_tokens, repeats=1, depths=depths
    )
    mine = run_one(settings, "phikit", precision)
    if "error" in mine:
        raise SystemExit(f"phikit {precision} at depth failed: {mine['error']}")
    kv_bytes = {int(d): mb * 1e6 for d, mb in mine["kv_cache_mb_at_depth"].items()}  # the model's own count
    rows = []
    for d in depths:
        limit = gbs * 1e9 / (BYTES_PER_WEIGHT[precision] * weights + kv_bytes[d])
        tok_s = mine["decode_at_depth_tok_s"][str(d)]
        rows.append(
            {
                "model": model.name,
                "engine": "phikit",
                "precision": precision,
                "depth": d,
                "decode_tok_s": tok_s,
                "kv_cache_gb": kv_bytes[d] / 1e9,
                "decode_of_bandwidth_limit": f"{tok_s / limit:.0%}",
            }
        )
    print(
        f"{model.name}: llama.cpp {gguf_type} decode after {depths} tokens (prefills them)", file=sys.stderr, flush=True
    )
    for r in llama_depths(model, gguf_type, depths, args.depth_new_tokens, args.depth_flash_attn):
        rows.append(
            {
                "model": model.name,
                "engine": f"llama.cpp (flash attention {'on' if r.get('flash_attn') else 'off'})",
                "precision": gguf_type,
                "depth": r["depth"],
                "decode_tok_s": r["decode_tok_s"],
                "kv_cache_gb": kv_bytes[r["depth"]] / 1e9,  # fp16, as phikit's
            }
        )
    for r in rows:
        theirs = [x["decode_tok_s"] for x in rows if x["engine"] != "phikit" and x["depth"] == r["depth"]]
        if r["engine"] == "phikit" and theirs:
            r["vs_best_llama_cpp"] = f"{r['decode_tok_s'] / max(theirs):.2f}x"
    rows.sort(key=lambda r: (r["depth"], r["engine"]))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint folder (default: the family's random full-size ones)")
    ap.add_argument(
        "--family", choices=sorted(FAMILIES), default="phi2", help="which random checkpoints (default phi2)"
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--pairs", default=",".join(p for p, _ in PAIRS), help="phikit precisions to include")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--depths", default="", help="also decode after these many tokens of context, e.g. 4096,16384")
    ap.add_argument("--depth-precision", choices=[p for p, _ in PAIRS], default="int4")
    ap.add_argument("--depth-new-tokens", type=int, default=32, help="tokens decoded after each depth (default 32)")
    ap.add_argument(
        "--depth-flash-attn",
        choices=["0", "1", "0,1"],
        default="0,1",
        help="llama.cpp's flash attention at depth: off (0), on (1) or both (default; each prefills the context again)",
    )
    ap.add_argument("--out", type=Path, help="results file (default: benchmarks/results_vs_llamacpp[_FAMILY].json)")
    args = ap.parse_args()
    if args.model:
        models = [args.model.resolve()]
    else:
        models = [random_phi2() if v == "phi2" else random_phi3(v) for v in FAMILIES[args.family]]
    out = args.out or HERE / (
        "results_vs_llamacpp.json" if args.family == "phi2" else f"results_vs_llamacpp_{args.family}.json"
    )
    pairs = [p for p in PAIRS if p[0] in args.pairs.split(",")]
    isa = isa_flags()
    results = []
    for model in models:
        results.append(bench_model(model, args, pairs))
        report(results[-1], args, isa)
        save_json(out, {"command": " ".join(sys.argv), "machine": machine(), "cpu_flags": isa, "models": results})


def report(result: dict, args, isa: str) -> None:
    bandwidth = result["sum_bandwidth_gb_s"]
    print(
        f"\nMachine: {machine()}\nCPU flags: {isa}\nModel: {result['model']} ({result['linear_weights'] / 1e9:.3f}e9 "
        f"weights read per decoded token); prefill {args.prompt_tokens} tokens, decode {args.new_tokens} tokens, "
        f"batch 1; medians of {args.rounds} interleaved rounds; tensor.sum bandwidth "
        f"{statistics.median(bandwidth):.1f} GB/s (rounds: {', '.join(f'{b:.1f}' for b in bandwidth)})\n"
    )
    columns = [
        ("engine", "engine"),
        ("precision", "precision"),
        ("prefill_tok_s", "prefill tok/s"),
        ("decode_tok_s", "decode tok/s"),
        ("decode_vs_llama_cpp", "decode vs llama.cpp (per round)"),
        ("prefill_vs_llama_cpp", "prefill vs llama.cpp"),
        ("decode_vs_transformers_bf16", "decode vs transformers bf16"),
        ("decode_of_bandwidth_limit", "decode / bandwidth limit (per run)"),
        ("decode_of_limit_with_kv", "with the KV cache"),
        ("peak_memory_gb", "peak mem GB"),
        ("load_s", "load s"),
    ]
    print(markdown_table(result["rows"], columns))
    for row in result["rows"]:
        if row.get("prefill_paths"):
            chosen = ", ".join(f"{k.split(':')[1]} {v}" for k, v in row["prefill_paths"].items())
            print(f"\nphikit {row['precision']} prefill paths: {chosen}")
    if result.get("depth_rows"):
        print("\nDecode after a long context (bandwidth limit counts the weights and the fp16 KV cache's bytes):\n")
        depth_columns = [
            ("depth", "context tokens"),
            ("engine", "engine"),
            ("precision", "precision"),
            ("decode_tok_s", "decode tok/s"),
            ("kv_cache_gb", "KV cache GB"),
            ("decode_of_bandwidth_limit", "decode / bandwidth limit"),
            ("vs_best_llama_cpp", "vs best llama.cpp"),
        ]
        print(markdown_table(result["depth_rows"], depth_columns))


if __name__ == "__main__":
    main()
