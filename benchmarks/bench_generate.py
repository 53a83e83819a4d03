"""Load time, peak RSS, prefill and decode speed: phikit vs transformers ``generate``, same checkpoint, same run.

    python benchmarks/bench_generate.py [--model DIR] [--dtypes bf16,fp32] [--new-tokens 128]

Without --model it makes (once) a full-size random Phi-2 checkpoint with transformers. Each engine x dtype
runs in its own process so its peak RSS is its own. Decode speed is measured the same way for both:
(new_tokens - 1) / (time for new_tokens - time for 1 token), each the median of --repeats runs after a warm-up.
Prints a Markdown table and writes benchmarks/results_generate.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, PROMPT, machine, markdown_table, random_phi2, run_worker, save_json  # noqa: E402


def worker(engine: str, model_dir: str, dtype_name: str, new_tokens: int, repeats: int) -> dict:
    import torch

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
    start = time.perf_counter()
    if engine == "phikit":
        from phikit.api import load
        from phikit.generate import GenerationConfig, generate_tokens

        phi = load(model_dir, dtype=dtype, device="cpu")
        ids = phi.tokenizer.encode(PROMPT)

        def run(n: int) -> None:
            for _ in generate_tokens(phi.model, [ids], GenerationConfig(max_new_tokens=n), phi.tokenizer.pad_id):
                pass
    else:
        from transformers import AutoTokenizer, PhiForCausalLM

        model = PhiForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
        tok = AutoTokenizer.from_pretrained(model_dir)
        ids = tok(PROMPT)["input_ids"]
        input_ids = torch.tensor([ids])

        def run(n: int) -> None:
            with torch.inference_mode():
                model.generate(
                    input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=n,
                    min_new_tokens=n,
                    do_sample=False,
                    pad_token_id=50256,
                )

    load_s = time.perf_counter() - start

    def timed(n: int) -> float:
        t = time.perf_counter()
        run(n)
        return time.perf_counter() - t

    run(4)  # warm-up
    first = statistics.median(timed(1) for _ in range(repeats))
    full = statistics.median(timed(new_tokens) for _ in range(repeats))
    return {
        "engine": engine,
        "dtype": dtype_name,
        "load_s": load_s,
        "prompt_tokens": len(ids),
        "prefill_tok_s": len(ids) / first,
        "decode_tok_s": (new_tokens - 1) / (full - first),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="checkpoint folder (default: a random full-size Phi-2 made once)")
    ap.add_argument("--dtypes", default="bf16,fp32")
    ap.add_argument("--engines", default="phikit,transformers")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results_generate.json")
    ap.add_argument("--worker", nargs=2, metavar=("ENGINE", "DTYPE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    model = args.model or str(random_phi2())
    if args.worker:
        print(json.dumps(worker(args.worker[0], model, args.worker[1], args.new_tokens, args.repeats)))
        return
    rows = []
    for dtype in args.dtypes.split(","):
        for engine in args.engines.split(","):
            print(f"running {engine} {dtype} ...", file=sys.stderr, flush=True)
            rows.append(
                run_worker(
                    Path(__file__),
                    [
                        "--model",
                        model,
                        "--new-tokens",
                        str(args.new_tokens),
                        "--repeats",
                        str(args.repeats),
                        "--worker",
                        engine,
                        dtype,
                    ],
                )
            )
    base = {r["dtype"]: r["decode_tok_s"] for r in rows if r["engine"] == "transformers"}
    for r in rows:
        r["vs_transformers"] = f"{r['decode_tok_s'] / base[r['dtype']]:.2f}x" if r["dtype"] in base else ""
    print(f"\nMachine: {machine()}\nModel: {model}, batch 1, {args.new_tokens} new tokens\n")
    print(
        markdown_table(
            rows,
            [
                ("engine", "engine"),
                ("dtype", "dtype"),
                ("load_s", "load s"),
                ("peak_rss_gb", "peak RSS GB"),
                ("prefill_tok_s", "prefill tok/s"),
                ("decode_tok_s", "decode tok/s"),
                ("vs_transformers", "decode vs transformers"),
            ],
        )
    )
    save_json(args.out, {"command": " ".join(sys.argv), "model": model, "rows": rows})


if __name__ == "__main__":
    main()
