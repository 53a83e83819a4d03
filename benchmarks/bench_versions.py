"""Did a change make phikit slower? Two checkouts of phikit on the same checkpoint, interleaved, same run.

    python benchmarks/bench_versions.py --before REF [--after DIR] [--model DIR] [--precisions bf16,int8,int4]
                                        [--prompt-tokens 512] [--new-tokens 128] [--rounds 3]

REF is a git revision of this repository (checked out once into benchmarks/_work/versions/REF with
``git worktree``); --after defaults to this working tree. Each (version, precision) loads the model in its
own process, with that checkout first on ``sys.path``, and measures load time, the prefill of
--prompt-tokens tokens and the decode of --new-tokens tokens (time per token after the first, medians of
two runs after a warm-up); a --model written by ``phikit quantize`` loads as stored (name its format in
--precisions); versions alternate within each round and rounds repeat, because this VM's memory
bandwidth drifts by tens of percent within minutes; ``tensor.sum`` (common.sum_bandwidth) is measured right
before each run, and each decode is reported as a share of it, and of the mean of two readings taken in the worker
right before and right after that decode, and of a ``tensor.sum`` over the step's bytes run after each step
of a third decode (``paired``: the closest reading of the limit). Without --model: the full-size random Phi-2 of
common.random_phi2. Prints a Markdown table of medians (and each round) and writes
benchmarks/results_versions.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    BYTES_PER_WEIGHT,
    HERE,
    WORK,
    decode_kv_bytes,
    linear_weights,
    machine,
    markdown_table,
    random_phi2,
    run_worker,
    save_json,
    sum_bandwidth,
)

REPO = HERE.parent


def worker(checkout: str, model_dir: str, precision: str, prompt_tokens: int, new_tokens: int) -> dict:
    # this checkout's phikit, not the one `pip install -e .` maps through its import hook
    sys.meta_path = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith("__editable__")]
    sys.path.insert(0, checkout)
    import torch

    import phikit
    from phikit.api import load
    from phikit.generate import GenerationConfig, generate_tokens

    assert Path(phikit.__file__).resolve().is_relative_to(Path(checkout).resolve()), phikit.__file__
    stored = json.loads((Path(model_dir) / "config.json").read_text()).get("quantization_config")
    quantize = None if precision == "bf16" or stored else precision  # a `phikit quantize` folder: as stored
    start = time.perf_counter()
    phi = load(model_dir, dtype="bf16", device="cpu", quantize=quantize)
    load_s = time.perf_counter() - start
    prompt = [100 + (i * 7) % 5000 for i in range(prompt_tokens)]
    model = phi.model

    def prefill() -> float:
        cache = model.new_cache(1, prompt_tokens + 1)
        t0 = time.perf_counter()
        with torch.inference_mode():
            model(torch.tensor([prompt]), torch.arange(prompt_tokens), cache, last_only=True)
        return prompt_tokens / (time.perf_counter() - t0)

    def decode() -> float:
        stamps = []
        config = GenerationConfig(max_new_tokens=new_tokens)
        for _ in generate_tokens(model, [prompt[:16]], config, phi.tokenizer.pad_id):
            stamps.append(time.perf_counter())
        return (len(stamps) - 1) / (stamps[-1] - stamps[0])

    prefill(), decode()  # warm-up (the autotune measures on first use)
    prefills = [prefill(), prefill()]
    # the bandwidth limit read right before and right after each decode, in this process: the VM's drifts
    # within the seconds between the parent's reading and the decode
    sums, decodes = [sum_bandwidth()], []
    for _ in range(2):
        decodes.append(decode())
        sums.append(sum_bandwidth())
    step_bytes = BYTES_PER_WEIGHT[stored["format"] if stored else precision] * linear_weights(Path(model_dir))
    return {
        **paired(model, prompt[:16], new_tokens, step_bytes, phi.tokenizer.pad_id),
        "load_s": load_s,
        "anon_huge_gb": huge_pages_gb(),
        "prefill_tok_s": statistics.median(prefills),
        "decode_tok_s": statistics.median(decodes),
        "decode_runs": decodes,
        "sums_around_gb_s": sums,
    }


def paired(model, prompt: list[int], new_tokens: int, step_bytes: float, pad_id: int) -> dict:
    """The decode against the limit read step by step: each decoding step of one generation is followed by
    a ``tensor.sum`` over as many bytes as the step's weights, so every step is timed within a tenth of a
    second of a reading of the limit, and the VM's drifts (15-29 GB/s within seconds, RESULTS.md) fall on
    both alike. A step's share is the time of the sums either side of it over its own (same bytes); the
    median over the steps is ``decode_of_limit_paired``."""
    import torch

    from phikit import kernels
    from phikit.generate import GenerationConfig, generate_tokens

    t = kernels.empty_weight((int(step_bytes) // 4,), torch.float32).fill_(1.0)
    t.sum()
    steps, sums, resumed = [], [], None
    for _ in generate_tokens(model, [prompt], GenerationConfig(max_new_tokens=new_tokens), pad_id):
        if resumed is not None:
            steps.append(time.perf_counter() - resumed)
        started = time.perf_counter()
        t.sum()
        sums.append(time.perf_counter() - started)
        resumed = time.perf_counter()
    shares = [(sums[i] + sums[i + 1]) / 2 / step for i, step in enumerate(steps)]
    return {
        "decode_of_limit_paired": statistics.median(shares),
        "paired_decode_tok_s": 1 / statistics.median(steps),
        "paired_sum_gb_s": step_bytes / statistics.median(sums) / 1e9,
    }


def huge_pages_gb() -> float | None:
    """This process's memory on transparent 2 MB pages (the weights are advised to them; a fragmented host
    may not have them to give, and then the decode streams from 4 KB pages)."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return None
    kb = next((int(line.split()[1]) for line in text.splitlines() if line.startswith("AnonHugePages:")), 0)
    return kb / 1e6


def checkout(ref: str) -> Path:
    """A worktree of ``ref`` under benchmarks/_work/versions (made once)."""
    target = WORK / "versions" / ref
    if not (target / "phikit" / "__init__.py").is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(target), ref], check=True)
    return target


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--before", required=True, help="git revision to compare against (e.g. HEAD~1, a commit)")
    ap.add_argument("--after", type=Path, default=REPO, help="the checkout measured as 'after' (default: this one)")
    ap.add_argument("--model", type=Path, help="checkpoint folder (default: the full-size random Phi-2)")
    ap.add_argument("--precisions", default="bf16,int8,int4")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        path, model, precision, prompt, new = args.worker
        print(json.dumps(worker(path, model, precision, int(prompt), int(new))))
        return
    model = args.model or random_phi2()
    versions = {"before": checkout(args.before), "after": args.after.resolve()}
    precisions = args.precisions.split(",")
    runs: dict[tuple[str, str], list[dict]] = {(v, p): [] for v in versions for p in precisions}
    for r in range(args.rounds):
        for precision in precisions:
            order = list(versions) if r % 2 == 0 else list(reversed(versions))
            for version in order:
                work = [str(versions[version]), str(model), precision, str(args.prompt_tokens), str(args.new_tokens)]
                limit = sum_bandwidth()  # this run's bandwidth limit (the VM's drifts within minutes)
                result = run_worker(Path(__file__), ["--before", args.before, "--worker", *work])
                result["sum_gb_s"] = limit
                runs[(version, precision)].append(result)
                print(f"round {r + 1} {precision} {version}: {result}", file=sys.stderr, flush=True)
    weights, rows = linear_weights(model), []
    kv = decode_kv_bytes(model, args.prompt_tokens, args.new_tokens)  # the KV cache a step reads too
    for (version, precision), results in runs.items():
        row = {"precision": precision, "version": version}
        step = BYTES_PER_WEIGHT[precision] * weights
        for x in results:  # the share of the bandwidth limit measured right before the run
            x["decode_of_limit"] = x["decode_tok_s"] * step / (x["sum_gb_s"] * 1e9)
            x["decode_of_limit_kv"] = x["decode_tok_s"] * (step + kv) / (x["sum_gb_s"] * 1e9)
            # and of the mean of the two readings around each decode (the median of the two decodes' shares)
            around = [
                tok_s * step / ((x["sums_around_gb_s"][i] + x["sums_around_gb_s"][i + 1]) / 2 * 1e9)
                for i, tok_s in enumerate(x["decode_runs"])
            ]
            x["decode_of_limit_around"] = statistics.median(around)
        keys = ("prefill_tok_s", "decode_tok_s", "load_s", "decode_of_limit", "decode_of_limit_kv")
        for key in keys + ("decode_of_limit_around", "decode_of_limit_paired"):
            values = [x[key] for x in results]
            row[key] = f"{statistics.median(values):.2f} ({', '.join(f'{v:.2f}' for v in values)})"
        rows.append(row)
    rows.sort(key=lambda row: (precisions.index(row["precision"]), row["version"] != "before"))
    columns = [("precision", "precision"), ("version", "version")]
    columns += [("prefill_tok_s", "prefill tok/s (rounds)"), ("decode_tok_s", "decode tok/s"), ("load_s", "load s")]
    columns += [("decode_of_limit", "decode / tensor.sum limit"), ("decode_of_limit_kv", "with the KV cache")]
    columns += [("decode_of_limit_around", "of the sums read around each decode")]
    columns += [("decode_of_limit_paired", "of a sum after each step")]
    print(markdown_table(rows, columns))
    every = {f"{v} {p}": results for (v, p), results in runs.items()}
    save_json(
        HERE / "results_versions.json",
        {"command": " ".join(sys.argv), "machine": machine(), "before": args.before, "rows": rows, "runs": every},
    )


if __name__ == "__main__":
    main()
