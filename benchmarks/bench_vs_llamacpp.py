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
from common import machine, markdown_table, random_phi2, save_json  # noqa: E402

from phikit.bench import BenchSettings, run_one  # noqa: E402

PAIRS = [("bf16", "f16"), ("int8", "q8_0"), ("int4", "q4_0")]


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
    for r in range(args.rounds):
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
    base = None
    if not args.no_transformers:
        print("transformers bf16", file=sys.stderr, flush=True)
        row = run_one(settings, "transformers", "bf16")
        samples[("transformers", "bf16")] = [row]
        base = row.get("decode_tok_s")
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
        if base:
            row["decode_vs_transformers_bf16"] = f"{row['decode_tok_s'] / base:.2f}x"
        rows.append(row)
    order = {"phikit": 0, "llama.cpp": 1, "transformers": 2}
    rank = {p: i for i, pair in enumerate(PAIRS) for p in pair}
    rows.sort(key=lambda r: (rank.get(r["precision"], 9), order[r["engine"]]))
    print(
        f"\nMachine: {machine()}\nModel: {model}; prefill {args.prompt_tokens} tokens, decode {args.new_tokens} "
        f"tokens, batch 1; medians of {args.rounds} interleaved rounds\n"
    )
    columns = [
        ("engine", "engine"),
        ("precision", "precision"),
        ("prefill_tok_s", "prefill tok/s"),
        ("decode_tok_s", "decode tok/s"),
        ("decode_vs_transformers_bf16", "decode vs transformers bf16"),
        ("peak_memory_gb", "peak mem GB"),
        ("load_s", "load s"),
    ]
    print(markdown_table(rows, columns))
    save_json(
        args.out,
        {
            "command": " ".join(sys.argv),
            "model": str(model),
            "rows": rows,
            "samples": {f"{e} {p}": v for (e, p), v in samples.items()},
        },
    )


if __name__ == "__main__":
    main()
