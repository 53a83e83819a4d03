"""The prefill GEMM alone: GFLOPS of phikit's CPU kernel on Phi-2's linear shapes against PyTorch's fp32 matmul.

    python benchmarks/bench_gemm.py [--rows 512] [--repeats 5]

For each weight format (fp32, bf16, int8, int4 group 64) and each of Phi-2's layer shapes (q/k/v/dense
2560x2560, fc1 10240x2560, fc2 2560x10240), y = x @ W.T + b for ``--rows`` rows of fp32 activations; the
reference is ``torch.nn.functional.linear`` on the fp32 weight (oneDNN/MKL sgemm), alternated with ours
call by call so both see the same machine. Best of ``--repeats`` runs; prints a Markdown table and writes
benchmarks/results_gemm.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, markdown_table, save_json  # noqa: E402

from phikit import kernels  # noqa: E402
from phikit.quantize import QuantizedLinear  # noqa: E402

SHAPES = {"q/k/v/dense": (2560, 2560), "fc1": (10240, 2560), "fc2": (2560, 10240)}


def alternating_best(a: tuple, b: tuple, repeats: int) -> tuple[float, float]:
    """Best seconds of calls ``a`` and ``b`` (each (fn, *args)), run alternately after one warm-up each."""
    best = [float("inf"), float("inf")]
    for i in range(repeats + 1):
        for j, (fn, *fn_args) in enumerate((a, b)):
            start = time.perf_counter()
            fn(*fn_args)
            if i:
                best[j] = min(best[j], time.perf_counter() - start)
    return best[0], best[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=512, help="activation rows (prompt tokens)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=HERE / "results_gemm.json")
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit("phikit's CPU kernels are not available on this machine (x86-64 AVX2/FMA/F16C + a C compiler)")
    torch.manual_seed(0)
    rows = []
    for name, (n, k) in SHAPES.items():
        weight, bias = torch.randn(n, k) * 0.02, torch.randn(n)
        x = torch.randn(args.rows, k)
        flops = 2 * args.rows * n * k
        for kind in ("f32", "bf16", "int8", "int4"):
            if kind in ("f32", "bf16"):
                ours = (kernels.gemm, x, kind, weight if kind == "f32" else weight.bfloat16(), None, None, bias)
            else:
                t = QuantizedLinear.from_weight(weight, bias, kind, 64).tensors()
                ours = (kernels.gemm, x, kind, t["weight"], t["weight_scale"], t.get("weight_min"), bias, 64)
            mine, reference = alternating_best(ours, (F.linear, x, weight, bias), args.repeats)
            rows.append(
                {
                    "shape": f"{name} {n}x{k}",
                    "weight": kind,
                    "phikit_gflops": flops / mine / 1e9,
                    "torch_fp32_gflops": flops / reference / 1e9,
                    "ratio": f"{reference / mine:.2f}x",
                }
            )
            print(f"{name} {kind}: {rows[-1]['phikit_gflops']:.1f} GFLOPS", file=sys.stderr, flush=True)
    print(f"\nMachine: {machine()}; {args.rows} rows of activations, best of {args.repeats}\n")
    columns = [
        ("shape", "shape (N x K)"),
        ("weight", "weight"),
        ("phikit_gflops", "phikit GFLOPS"),
        ("torch_fp32_gflops", "torch fp32 matmul GFLOPS"),
        ("ratio", "phikit / torch"),
    ]
    print(markdown_table(rows, columns))
    save_json(args.out, {"command": " ".join(sys.argv), "rows_of_x": args.rows, "rows": rows})


if __name__ == "__main__":
    main()
