"""Decoding on the CPU, piece by piece: how fast the gemv kernels stream weights, and what the one-call
decoding step (``phikit_decode_layers``) gains over running the layers as modules.

    python benchmarks/bench_decode.py [--precisions bf16,int8,int4] [--rounds 5] [--define NAME=VALUE ...]
                                      [--pages] [--skip-step] [--contexts 16,1024]

1. gemv: one decoding step's worth of weights in Phi-2's shapes (32 layers of q/k/v/dense 2560x2560, fc1
   10240x2560, fc2 2560x10240; distinct tensors, so nothing is served from cache) through the gemv kernel of
   each format (``bf16_dp``: bf16 weights through the AVX-512 BF16 gemv, where the library has it), reported
   in GB/s of weights read, next to a large ``tensor.sum()`` measured in the same
   round (the machine's memory bandwidth at that moment). ``--define`` builds a second copy of the kernels
   with a C macro changed (e.g. ``PREFETCH_I4=0``) and alternates it with the default, call by call.
   ``--pages`` adds a second copy of the weights on 4 KB pages (``PHIKIT_HUGE_PAGES=0`` while it is made),
   alternated with phikit's default placement on transparent huge pages.
2. step: the full-size random Phi-2 loaded at each precision; decode tok/s (48 tokens after a 16-token
   prompt) with every layer in one C call, alternated with the module-by-module path (the plan disabled).
   ``--contexts 16,1024`` also measures the one-call step after prompts of those lengths, where each token
   also reads the KV cache (20 KB per position and layer in fp32), with phikit's fp16 cache and an fp32 one
   alternated.

Medians over ``--rounds``; prints Markdown tables and writes benchmarks/results_decode.json.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import machine, markdown_table, random_phi2, save_json  # noqa: E402

from phikit import kernels  # noqa: E402

SHAPES = [(2560, 2560)] * 4 + [(10240, 2560), (2560, 10240)]
LAYERS = 32


def build_variant(defines: list[str]) -> ctypes.CDLL:
    """The kernel library compiled with extra ``-D`` macros, typed like phikit's own."""
    out = Path(tempfile.mkdtemp()) / "variant.so"
    flags = [f"-D{d}" for d in defines]
    subprocess.run(["cc", *kernels.compile_flags(), *flags, "-o", str(out), str(kernels.SOURCE), "-lm"], check=True)
    return kernels.open_library(out)


def step_weights(kind: str, huge_pages: bool = True) -> tuple[list, int]:
    """(n, k, tensors, output) for every linear of a 32-layer step, and their bytes; the weights placed as
    phikit places them when loading (``kernels.empty_weight``), or on 4 KB pages."""
    torch.manual_seed(0)
    mats, total = [], 0
    before = os.environ.pop("PHIKIT_HUGE_PAGES", None)
    if not huge_pages:
        os.environ["PHIKIT_HUGE_PAGES"] = "0"
    try:
        for _ in range(LAYERS):
            for n, k in SHAPES:
                w = torch.randn(n, k) * 0.02
                if kind in ("bf16", "bf16_dp"):
                    t = {"weight": kernels.empty_weight((n, k), torch.bfloat16).copy_(w)}
                else:
                    t = kernels.quantize(w, kind, 64)
                total += sum(v.numel() * v.element_size() for v in t.values())
                mats.append((n, k, t, torch.empty(1, n)))
    finally:
        os.environ.pop("PHIKIT_HUGE_PAGES", None)
        if before is not None:
            os.environ["PHIKIT_HUGE_PAGES"] = before
    return mats, total


def run_step(lib: ctypes.CDLL, kind: str, mats: list, xs: dict) -> float:
    """Seconds for every gemv of one step through ``lib``."""
    start = time.perf_counter()
    for n, k, t, y in mats:
        x = xs[k].data_ptr()
        if kind == "int4":
            s, m = t["weight_scale"].data_ptr(), t["weight_min"].data_ptr()
            lib.phikit_gemv_i4(x, 1, k, t["weight"].data_ptr(), n, 64, s, m, None, y.data_ptr())
        elif kind == "int8":
            lib.phikit_gemv_i8(x, 1, k, t["weight"].data_ptr(), n, t["weight_scale"].data_ptr(), None, y.data_ptr())
        elif kind == "bf16_dp":
            lib.phikit_gemv_bf16_dp(x, 1, k, t["weight"].data_ptr(), n, None, y.data_ptr())
        else:
            lib.phikit_gemv_bf16(x, 1, k, t["weight"].data_ptr(), n, None, None, y.data_ptr())
    return time.perf_counter() - start


def bench_gemv(precisions: list[str], rounds: int, defines: list[str], pages: bool = False) -> list[dict]:
    default = kernels.library()
    variant = build_variant(defines) if defines else None
    xs = {k: torch.randn(1, k) for k in (2560, 10240)}
    big = kernels.empty_weight((2**28,), torch.float32).fill_(1.0)  # 1 GiB, on 2 MB pages as the weights
    rows = []
    for kind in precisions:
        mats, total = step_weights(kind)
        runs = {"default": (default, mats)}  # name -> (kernel library, weights)
        if variant is not None:
            runs[" ".join(defines)] = (variant, mats)
        if pages:
            runs["default, weights on 4 KB pages"] = (default, step_weights(kind, huge_pages=False)[0])
        speeds = {name: [] for name in runs}
        sums = []
        for _ in range(rounds + 1):
            for name, (lib, weights) in runs.items():
                speeds[name].append(total / run_step(lib, kind, weights, xs) / 1e9)
            start = time.perf_counter()
            big.sum()
            sums.append(big.numel() * 4 / (time.perf_counter() - start) / 1e9)
        for name, values in speeds.items():
            rows.append(
                {
                    "weights": kind,
                    "kernels": name,
                    "gb": total / 1e9,
                    "gemv_gb_s": statistics.median(values[1:]),
                    "sum_gb_s": statistics.median(sums[1:]),
                    "rounds_gb_s": values[1:],  # each round, next to that round's sum: the VM's phase
                    "rounds_sum_gb_s": sums[1:],
                }
            )
            rows[-1]["ratio"] = f"{rows[-1]['gemv_gb_s'] / rows[-1]['sum_gb_s']:.2f}"
            print(f"gemv {kind} {name}: {rows[-1]['gemv_gb_s']:.1f} GB/s", file=sys.stderr, flush=True)
        del mats, runs
    return rows


def decode_tok_s(model, new_tokens: int = 49, context: int = 16) -> float:
    """Tokens/s of greedy decoding after a ``context``-token prompt (the first token, from the prefill,
    excluded)."""
    from phikit.generate import GenerationConfig, generate_tokens

    stamps = []
    prompt = [100 + i % 5000 for i in range(context)]
    for _ in generate_tokens(model, [prompt], GenerationConfig(max_new_tokens=new_tokens), 50256):
        stamps.append(time.perf_counter())
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def bench_step(precisions: list[str], rounds: int, contexts: list[int]) -> list[dict]:
    from phikit.api import load

    folder = random_phi2()
    rows = []
    for precision in precisions:
        quantize = None if precision == "bf16" else precision
        model = load(folder, dtype="bf16" if quantize is None else "auto", device="cpu", quantize=quantize).model
        one_call = model.decode_step

        speeds = {"one call": [], "module by module": []}
        for _ in range(rounds):
            for mode in speeds:
                model.decode_step = one_call if mode == "one call" else model.forward
                decode_tok_s(model, 4)  # warm-up
                speeds[mode].append(decode_tok_s(model))
        model.decode_step = one_call
        base = statistics.median(speeds["module by module"])
        for mode, values in speeds.items():
            median = statistics.median(values)
            row = {"precision": precision, "path": mode, "context": 16, "decode_tok_s": median}
            rows.append({**row, "ratio": f"{median / base:.2f}x"})
            print(f"step {precision} {mode}: {median:.2f} tok/s", file=sys.stderr, flush=True)
        cache_dtypes = {"fp16 cache": torch.float16, "fp32 cache": None} if model.kv_cache_dtype else {"": None}
        by_context = {(c, name): [] for c in contexts for name in cache_dtypes}
        for _ in range(rounds):
            for c, name in by_context:
                model.kv_cache_dtype = cache_dtypes[name]
                by_context[c, name].append(decode_tok_s(model, context=c))
        model.kv_cache_dtype = next(iter(cache_dtypes.values()))
        for (c, name), values in by_context.items():
            median = statistics.median(values)
            path = f"one call, {name}" if name else "one call"
            rows.append({"precision": precision, "path": path, "context": c, "decode_tok_s": median})
            print(f"step {precision} after {c} tokens, {path}: {median:.2f} tok/s", file=sys.stderr, flush=True)
        model = None  # free it before the next precision loads
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--precisions", default="bf16,int8,int4")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--define", action="append", default=[], help="C macro for a variant of the gemv kernels")
    ap.add_argument("--pages", action="store_true", help="also the gemv on weights in 4 KB pages")
    ap.add_argument("--contexts", default="", help="comma-separated prompt lengths for the one-call step")
    ap.add_argument("--skip-step", action="store_true", help="only the gemv part (no checkpoint needed)")
    ap.add_argument("--out", type=Path, default=HERE / "results_decode.json")
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit("phikit's CPU kernels are not available on this machine (x86-64 AVX2/FMA/F16C + a C compiler)")
    precisions = args.precisions.split(",")
    gemv = bench_gemv(precisions, args.rounds, args.define, args.pages)
    contexts = [int(c) for c in args.contexts.split(",") if c]
    step = [] if args.skip_step else bench_step(precisions, args.rounds, contexts)
    print(f"\nMachine: {machine()}; medians of {args.rounds} rounds\n")
    print(
        markdown_table(
            gemv,
            [
                ("weights", "weights"),
                ("kernels", "kernels"),
                ("gb", "GB per step"),
                ("gemv_gb_s", "gemv GB/s"),
                ("sum_gb_s", "tensor.sum() GB/s"),
                ("ratio", "gemv / sum"),
            ],
        )
    )
    if step:
        print()
        columns = [("precision", "precision"), ("path", "decoder layers"), ("context", "prompt tokens")]
        columns.append(("decode_tok_s", "decode tok/s"))
        print(markdown_table(step, [*columns, ("ratio", "vs module by module")]))
    save_json(args.out, {"command": " ".join(sys.argv), "gemv": gemv, "step": step})


if __name__ == "__main__":
    main()
