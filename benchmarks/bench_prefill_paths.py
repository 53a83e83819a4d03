"""Every prefill path of the autotune on Phi-2's (or Phi-3-mini's) linear shapes, against PyTorch's bf16
matmul on bf16 weights.

    python benchmarks/bench_prefill_paths.py [--rows 32,128,512] [--repeats 3] [--formats int8,int4]
                                             [--shapes phi2|phi3]

For weights of each format (int8, int4 with groups of 64, bf16, f16) in each of Phi-2's shapes (q/k/v/dense
2560x2560, fc1 10240x2560, fc2 2560x10240) or Phi-3-mini's (qkv 9216x3072, o 3072x3072, gate_up 16384x3072,
down 3072x8192) and each row count, y = x @ W.T through every candidate ``phikit.backends.autotune.paths``
offers on this machine (phikit_gemm, dequant_bf16 or dequant_f32, and phikit_vnni where the CPU has AVX-512
VNNI), and through ``torch_bf16`` on the same weight in bf16 (what transformers runs in bf16). Best of
``--repeats``, ms; prints a Markdown table with the CPU flags and writes benchmarks/results_prefill_paths.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from functools import partial
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import isa_flags, machine, markdown_table, save_json  # noqa: E402

from phikit import kernels  # noqa: E402
from phikit.backends import autotune  # noqa: E402

SHAPES = {
    "phi2": [(2560, 2560), (10240, 2560), (2560, 10240)],
    "phi3": [(9216, 3072), (3072, 3072), (16384, 3072), (3072, 8192)],
}


def best_ms(run, repeats: int) -> float:
    run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="32,128,512", help="activation rows (prompt tokens), comma-separated")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--formats", default="int8,int4", help="weight formats: int8, int4, bf16, f16 (comma-separated)")
    ap.add_argument("--shapes", choices=sorted(SHAPES), default="phi2", help="whose linear shapes")
    ap.add_argument("--out", type=Path, default=HERE / "results_prefill_paths.json")
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit(f"error: phikit's CPU kernels are unavailable: {kernels.unavailable_reason()}")
    torch.manual_seed(0)
    rows_out, columns = [], ["format", "N x K", "rows"]
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    for kind in formats:
        if kind not in ("int8", "int4", "bf16", "f16"):
            raise SystemExit(f"error: --formats: unknown format {kind!r} (int8, int4, bf16, f16)")
    for kind in formats:
        for n, k in SHAPES[args.shapes]:
            w = torch.randn(n, k) * 0.02
            if kind in ("int8", "int4"):
                t = kernels.quantize(w, kind, 64)
            else:
                t = {"weight": w.to(torch.bfloat16 if kind == "bf16" else torch.float16)}
            bf16 = w.bfloat16()
            for m in (int(r) for r in args.rows.split(",")):
                x = torch.randn(m, k)
                row = {"format": kind, "N x K": f"{n}x{k}", "rows": m}
                quantized = (
                    t["weight"],
                    t.get("weight_scale"),
                    t.get("weight_min"),
                    None,
                    64 if "weight_scale" in t else 0,
                )
                for path in autotune.paths(kind, n):
                    row[path] = best_ms(partial(autotune.run, path, x, kind, *quantized), args.repeats)
                if kind != "bf16":  # (for bf16 weights it is one of the paths)
                    dense = partial(autotune.run, "torch_bf16", x, "bf16", bf16, None, None, None, 0)
                    row["torch_bf16 on bf16 weights"] = best_ms(dense, args.repeats)
                rows_out.append(row)
                print(row, flush=True)
                columns += [c for c in row if c not in columns]
    info = machine()
    isa = isa_flags()
    print(f"\nMachine: {info}\nCPU flags: {isa}\n")
    print(markdown_table(rows_out, [(c, c if c in ("format", "N x K", "rows") else f"{c} ms") for c in columns]))
    save_json(args.out, {"cpu_flags": isa, "rows": rows_out})


if __name__ == "__main__":
    main()
