"""phikit vs llama.cpp vs transformers on one checkpoint, this machine, same run: prefill and decode tok/s.

    python benchmarks/bench_vs_llamacpp.py [--model DIR] [--rounds 3] [--prompt-tokens 512] [--new-tokens 128]

Pairs compared (same bits per weight): phikit bf16 / llama.cpp F16, phikit int8 (per-channel) / Q8_0,
phikit int4 (group 64, fp16 scale + minimum: 4.5 bits) / Q4_0 (group 32, fp16 scale: 4.5 bits).
Memory bandwidth on a shared VM drifts by tens of percent within minutes, so the engines alternate:
every round measures each phikit precision and then its llama.cpp pair, and the table reports medians
over rounds. transformers bf16 (the baseline the ratios use) runs once. llama.cpp is built and the
GGUF files are made by bench_llamacpp.py (nothing of it is committed).

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
from common import isa_flags, machine, markdown_table, random_phi2, save_json  # noqa: E402

from phikit.bench import BenchSettings, run_one  # noqa: E402

PAIRS = [("bf16", "f16"), ("int8", "q8_0"), ("int4", "q4_0")]
# bytes of weights a decoding step reads (Phi-2's linear layers and lm_head: 2.648e9 weights; int8 adds a
# per-row scale, int4 (group 64) an fp16 scale and minimum per group: 4.5 bits)
LINEAR_WEIGHTS = 32 * (4 * 2560 * 2560 + 2 * 2560 * 10240) + 51200 * 2560
WEIGHT_BYTES = {"bf16": 2.0 * LINEAR_WEIGHTS, "int8": 1.0 * LINEAR_WEIGHTS, "int4": 4.5 / 8 * LINEAR_WEIGHTS}


def sum_bandwidth() -> float:
    """GB/s of ``tensor.sum()`` over 2 GB of fp32 (median of 5), the bandwidth decoding can reach."""
    import time

    import torch

    t = torch.ones(2**29)
    t.sum()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - started)
    return t.numel() * 4 / statistics.median(times) / 1e9


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, help="checkpoint folder (default: random full-size Phi-2, made once)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--pairs", default=",".join(p for p, _ in PAIRS), help="phikit precisions to include")
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--out", type=Path, default=HERE / "results_vs_llamacpp.json")
    args = ap.parse_args()
    model = (args.model or random_phi2()).resolve()
    pairs = [p for p in PAIRS if p[0] in args.pairs.split(",")]
    settings = BenchSettings(str(model), [], prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=1)
    samples: dict[tuple[str, str], list[dict]] = {}
    bandwidth: list[float] = []
    for r in range(args.rounds):
        bandwidth.append(sum_bandwidth())
        print(f"round {r + 1}/{args.rounds}: tensor.sum {bandwidth[-1]:.1f} GB/s", file=sys.stderr, flush=True)
        for precision, gguf_type in pairs:
            print(f"round {r + 1}/{args.rounds}: phikit {precision}", file=sys.stderr, flush=True)
            row = run_one(settings, "phikit", precision)
            if "error" in row:
                raise SystemExit(f"phikit {precision} failed: {row['error']}")
            samples.setdefault(("phikit", precision), []).append(row)
            print(f"round {r + 1}/{args.rounds}: llama.cpp {gguf_type}", file=sys.stderr, flush=True)
            samples.setdefault(("llama.cpp", gguf_type), []).append(
                llama(model, gguf_type, args.prompt_tokens, args.new_tokens)
            )
        if not args.no_transformers:
            print(f"round {r + 1}/{args.rounds}: transformers bf16", file=sys.stderr, flush=True)
            row = run_one(settings, "transformers", "bf16")
            if "error" in row:
                raise SystemExit(f"transformers bf16 failed: {row['error']}")
            samples.setdefault(("transformers", "bf16"), []).append(row)
    base = statistics.median(x["decode_tok_s"] for x in samples.get(("transformers", "bf16"), [{"decode_tok_s": 0}]))
    gbs = statistics.median(bandwidth)
    rows = []
    for (engine, precision), runs in samples.items():
        row = {
            "engine": engine,
            "precision": precision,
            "runs": len(runs),
            "prefill_tok_s": statistics.median(x["prefill_tok_s"] for x in runs),
            "decode_tok_s": statistics.median(x["decode_tok_s"] for x in runs),
        }
        if engine != "llama.cpp":
            row["peak_memory_gb"] = max(x["peak_memory_gb"] for x in runs)
            row["load_s"] = statistics.median(x["load_s"] for x in runs)
        if engine == "phikit":
            limit = gbs * 1e9 / WEIGHT_BYTES[precision]
            row["decode_of_bandwidth_limit"] = f"{row['decode_tok_s'] / limit:.0%}"
            row["prefill_paths"] = runs[-1].get("prefill_paths", {})
        if base:
            row["decode_vs_transformers_bf16"] = f"{row['decode_tok_s'] / base:.2f}x"
        rows.append(row)
    order = {"phikit": 0, "llama.cpp": 1, "transformers": 2}
    rank = {p: i for i, pair in enumerate(PAIRS) for p in pair}
    rows.sort(key=lambda r: (rank.get(r["precision"], 9), order[r["engine"]]))
    isa = isa_flags()
    print(
        f"\nMachine: {machine()}\nCPU flags: {isa}\nModel: {model}; prefill {args.prompt_tokens} tokens, decode "
        f"{args.new_tokens} tokens, batch 1; medians of {args.rounds} interleaved rounds; tensor.sum bandwidth "
        f"{gbs:.1f} GB/s (rounds: {', '.join(f'{b:.1f}' for b in bandwidth)})\n"
    )
    columns = [
        ("engine", "engine"),
        ("precision", "precision"),
        ("prefill_tok_s", "prefill tok/s"),
        ("decode_tok_s", "decode tok/s"),
        ("decode_vs_transformers_bf16", "decode vs transformers bf16"),
        ("decode_of_bandwidth_limit", "decode / bandwidth limit"),
        ("peak_memory_gb", "peak mem GB"),
        ("load_s", "load s"),
    ]
    print(markdown_table(rows, columns))
    for row in rows:
        if row.get("prefill_paths"):
            chosen = ", ".join(f"{k.split(':')[1]} {v}" for k, v in row["prefill_paths"].items())
            print(f"\nphikit {row['precision']} prefill paths (autotune): {chosen}")
    save_json(
        args.out,
        {
            "command": " ".join(sys.argv),
            "model": str(model),
            "rows": rows,
            "cpu_flags": isa,
            "sum_bandwidth_gb_s": bandwidth,
            "samples": {f"{e} {p}": v for (e, p), v in samples.items()},
        },
    )


if __name__ == "__main__":
    main()
