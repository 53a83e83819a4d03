"""GPU decoding, taken apart: one loaded model decoding eagerly, through CUDA graphs, and through CUDA graphs
of the compiled decoder layer; and each linear kernel alone at Phi-2's shapes for one token, in GB/s of
weights read against a device-to-device copy's bandwidth measured in the same run.

    python benchmarks/bench_gpu_decode.py --model PATH [--precisions bf16,int8,int4,nf4] [--json out.json]
    python benchmarks/bench_gpu_decode.py --model TINY --dry       # on the CPU: rehearse, measure nothing

Needs a CUDA/ROCm GPU. Decode tok/s: 64 greedy tokens from a 16-token prompt, median of 2, after a warm-up
that captures the graphs. Kernels: median of 50 timed calls (CUDA events) after 5 warm-ups, M = 1.
``--dry`` (gpu_check.sh's PHIKIT_CHECK_DRY=1) runs the same steps on the CPU at shapes / 8, with 8 decoded
tokens, 3 timed calls and eager decoding only (graphs and the compiled layer are CUDA's), so the JSON and the
script around it can be rehearsed where there is no GPU; its numbers mean nothing.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from phikit import backends  # noqa: E402
from phikit.api import load  # noqa: E402
from phikit.backends import cuda  # noqa: E402
from phikit.generate import GenerationConfig, generate_tokens  # noqa: E402
from phikit.quantize import QuantizedLinear  # noqa: E402

SHAPES = {"qkv/dense 2560x2560": (2560, 2560), "fc1 10240x2560": (10240, 2560), "fc2 2560x10240": (2560, 10240)}


DEVICE = "cuda"  # "cpu" with --dry
ITERS = 50


def timed(fn, iters: int | None = None) -> float:
    """Median seconds of one call of ``fn``, by CUDA events (on the CPU, --dry: by the clock)."""
    iters = iters or ITERS
    for _ in range(min(5, iters)):
        fn()
    if DEVICE == "cpu":
        times = []
        for _ in range(iters):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return statistics.median(times)
    times = []
    for _ in range(iters):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def copy_bandwidth(size: int = 2**30) -> float:
    """GB/s of a ``size``-byte (1 GB) device-to-device copy, bytes read plus written."""
    src = torch.empty(size, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / timed(lambda: dst.copy_(src), 20) / 1e9


def kernel_rows(shrink: int = 1) -> list[dict]:
    """bf16 cuBLAS and each quantized kernel at Phi-2's one-token shapes (divided by ``shrink``)."""
    rows = []
    for label, (n, k) in SHAPES.items():
        n, k = n // shrink, k // shrink
        weight = torch.randn(n, k, device=DEVICE) * 0.02
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        dense = weight.to(torch.bfloat16)
        seconds = timed(lambda dense=dense, x=x: torch.nn.functional.linear(x, dense))
        label = label if shrink == 1 else f"{label} / {shrink}"
        name = "bf16 cuBLAS" if DEVICE == "cuda" else "bf16 (cpu, dry run)"
        rows.append({"shape": label, "kernel": name, "us": seconds * 1e6, "GB/s": n * k * 2 / seconds / 1e9})
        for fmt, bits in (("int8", 8), ("int4", 4.5), ("nf4", 4.5)):
            layer = backends.bind_kernel(QuantizedLinear.from_weight(weight, None, fmt, 64, DEVICE))
            if DEVICE == "cuda":
                layer.packed = cuda.PREPARE[fmt](layer)
                name = layer.packed.name
            else:
                name = f"{fmt} {getattr(layer.kernel, '__name__', 'reference')} (cpu, dry run)"
            with torch.inference_mode():
                seconds = timed(lambda layer=layer, x=x: layer(x))
            gbs = n * k * bits / 8 / seconds / 1e9
            rows.append({"shape": label, "kernel": name, "us": seconds * 1e6, "GB/s": gbs})
    return rows


def decode_tok_s(model, tokenizer_pad: int, new_tokens: int = 64) -> float:
    config = GenerationConfig(max_new_tokens=new_tokens)
    prompt = [list(range(100, 116))]
    list(generate_tokens(model, prompt, GenerationConfig(max_new_tokens=8), tokenizer_pad))  # capture
    rates = []
    for _ in range(2):
        stamps = []
        for _ in generate_tokens(model, prompt, config, tokenizer_pad):
            if DEVICE == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
        rates.append((len(stamps) - 2) / (stamps[-1] - stamps[1]))
    return statistics.median(rates)


def decode_rows(model_path: str, precisions: list[str], on_row=None, new_tokens: int = 64) -> list[dict]:
    """Decode tok/s per precision and mode; ``on_row(rows)`` after each, so a cut run keeps what it measured."""
    rows = []
    modes = ("graphs + compiled layer", "graphs", "eager") if DEVICE == "cuda" else ("eager",)
    for precision in precisions:
        quantize = precision if precision in ("int8", "int4", "nf4") else None
        phi = load(model_path, dtype=precision if quantize is None else "bf16", device=DEVICE, quantize=quantize)
        model = phi.model
        for mode in modes:
            if DEVICE == "cuda":
                model.decode_step.enabled = mode != "eager"
                cuda.set_compiled_layers(model, mode.endswith("layer"))
            torch._dynamo.utils.counters.clear()
            started = time.perf_counter()
            rate = decode_tok_s(model, phi.tokenizer.pad_id, new_tokens)
            breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
            row = {"precision": precision, "mode": mode, "decode_tok_s": rate, "graph_breaks": breaks}
            row["seconds_with_capture_and_compile"] = time.perf_counter() - started
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
            if on_row is not None:
                on_row(rows)
        del phi, model
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--precisions", default="bf16,int4,nf4")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--dry", action="store_true", help="on the CPU, tiny shapes and budgets: a rehearsal")
    args = ap.parse_args()
    global DEVICE, ITERS
    if args.dry:
        DEVICE, ITERS = "cpu", 3
    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "none (--dry, on the CPU)"
    report = {"gpu": gpu, "torch": torch.__version__, "copy_GB_s": copy_bandwidth(2**24 if args.dry else 2**30)}
    report["kernels"] = kernel_rows(8 if args.dry else 1)
    for row in report["kernels"]:
        print(json.dumps(row), file=sys.stderr, flush=True)

    def save(rows=None) -> None:  # kernels first, then row by row: a stage cut short keeps what it measured
        if rows is not None:
            report["decode"] = rows
        if args.json:
            tmp = args.json.with_suffix(".tmp")
            tmp.write_text(json.dumps(report, indent=2))
            tmp.replace(args.json)

    save()
    save(decode_rows(args.model, args.precisions.split(","), on_row=save, new_tokens=8 if args.dry else 64))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
