"""``phikit bench``: prefill and decode speed, time to first token, load time and peak memory per precision.

Each precision runs in its own process so its peak memory is its own. Timings are medians of
``repeats`` runs after a warm-up. Prefill is one forward over ``prompt_tokens`` tokens; time to first
token is prefill plus the first sampled token; decode speed is over ``new_tokens`` forced tokens (EOS
ignored) after a short 16-token context, as llama-bench's tg test starts from an empty one.
``--compare-transformers`` runs transformers ``generate`` on the same checkpoint in the same way.
On a GPU each row also gives the memory allocated once loaded (``torch.cuda.memory_allocated``), the peak
while loading, the peak while generating (``peak_memory_gb``, ``torch.cuda.max_memory_allocated`` after a
reset), the GPU's name and, for phikit, the kernels that ran its linear layers.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from phikit.errors import PhikitError
from phikit.quantize import GROUP_SIZE

DENSE = ("fp32", "bf16", "fp16")
QUANTIZED = ("int8", "int4", "nf4")
FILLER = (
    "The lighthouse keeper climbed the stairs at dusk, lit the lamp and watched the ships pass the rocks. "
    "Mathematics, like the beam, sweeps across the dark and shows the way one proof at a time. "
)


@dataclass
class BenchSettings:
    model: str
    precisions: list[str]
    device: str = "auto"
    prompt_tokens: int = 128
    new_tokens: int = 128
    repeats: int = 3
    group_size: int = GROUP_SIZE
    compare_transformers: bool = False
    perplexity_data: str | None = None
    threads: int | None = None
    depths: list[int] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    kv_cache: str = "auto"  # phikit.load's kv_cache: auto, fp16 or int8


def machine_description(threads: int | None = None) -> str:
    """The CPU (and GPU), the threads a run uses (``threads``, else torch's choice) of those the machine has."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    used = threads or torch.get_num_threads()
    return f"{cpu}, {used} of {os.cpu_count()} CPU threads{gpu}, torch {torch.__version__}"


def prompt_ids(tokenizer, n: int) -> list[int]:
    ids = tokenizer.encode(FILLER * (n // 20 + 2))
    return ids[:n]


def measure_phikit(s: BenchSettings, precision: str) -> dict:
    """One precision with phikit: load, then prefill and decode timings."""
    import torch

    from phikit.api import load
    from phikit.backends import kernel_names
    from phikit.generate import GenerationConfig, generate_tokens, peak_memory_bytes

    quantize = precision if precision in QUANTIZED else None
    dtype = precision if precision in DENSE else "auto"
    start = time.perf_counter()
    group = s.group_size if quantize == "int4" else None  # int4's own: the other rows have none
    phi = load(s.model, dtype=dtype, device=s.device, quantize=quantize, group_size=group, kv_cache=s.kv_cache)
    load_s = time.perf_counter() - start
    model, ids = phi.model, prompt_ids(phi.tokenizer, s.prompt_tokens)
    loaded = _loaded_memory(model.device)
    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)

    def prefill() -> float:
        cache = model.new_cache(1, len(ids) + 1)
        t = time.perf_counter()
        with torch.inference_mode():
            model.prefill(torch.tensor([ids], device=model.device), torch.arange(len(ids), device=model.device), cache)
        sync()
        return time.perf_counter() - t

    def first_token() -> float:
        t = time.perf_counter()
        next(iter(generate_tokens(model, [ids], GenerationConfig(max_new_tokens=1), phi.tokenizer.pad_id)))
        sync()
        return time.perf_counter() - t

    def decode() -> float:
        """seconds per token from a 16-token context, after the first two (the prefill's token, and the
        step that may capture a CUDA graph for a new cache)"""
        config = GenerationConfig(max_new_tokens=s.new_tokens)
        stamps = []
        for _ in generate_tokens(model, [ids[:16]], config, phi.tokenizer.pad_id):
            sync()
            stamps.append(time.perf_counter())
        first = 1 if len(stamps) > 2 else 0
        return (stamps[-1] - stamps[first]) / (len(stamps) - 1 - first)

    prefill()
    for _ in generate_tokens(model, [ids[:16]], GenerationConfig(max_new_tokens=8), phi.tokenizer.pad_id):
        pass  # warm-up
    prefill_s = statistics.median(prefill() for _ in range(s.repeats))
    ttft_s = statistics.median(first_token() for _ in range(s.repeats))
    decode_runs = [1 / decode() for _ in range(s.repeats)]
    row = {
        "engine": "phikit",
        "precision": precision,
        "load_s": load_s,
        "prefill_tok_s": len(ids) / prefill_s,
        "ttft_s": ttft_s,
        "decode_tok_s": statistics.median(decode_runs),
        "decode_tok_s_runs": decode_runs,  # each repeat: how much the machine's speed moved
        "peak_memory_gb": peak_memory_bytes(model.device) / 1e9,
        **loaded,
        "kv_cache_mb": model.kv_cache_bytes(len(ids) + 1) / 1e6,  # the prefill's cache
        "kv_cache_dtype": str(model.cache_dtype()).removeprefix("torch."),
        "kernels": kernel_names(model),
    }
    if s.depths:
        row["decode_at_depth_tok_s"] = {str(d): decode_at_depth(model, d, s.new_tokens, ids[0]) for d in s.depths}
        row["kv_cache_mb_at_depth"] = {str(d): model.kv_cache_bytes(d) / 1e6 for d in s.depths}
    if model.device.type == "cpu":
        from phikit import pagecache
        from phikit.backends import autotune

        row["weights_on_2mb_pages_gb"] = pagecache.pmd_mapped_total() / 1e9  # mapped weights' 2 MB entries
        row["prefill_paths"] = {k: v["path"] for k, v in autotune.decisions().items()}
    if s.perplexity_data:
        from phikit.evaluate import perplexity, read_text

        row["perplexity"] = perplexity(model, read_text(s.perplexity_data, phi.tokenizer)).perplexity
    return row


def decode_at_depth(model, depth: int, new_tokens: int, token_id: int, kv_cache=None) -> float:
    """tokens/s of ``new_tokens`` decoding steps of ``model`` after ``depth`` tokens of context, in a new cache
    of ``kv_cache``'s dtype (default the model's choice). The cache holds random keys and values rather than a
    prefill's (a step's cost does not depend on them; a 32k-token prefill would take minutes on a small CPU),
    as many bytes as a real context's; an int8 cache holds them quantized, as a prefill writes them."""
    import torch

    from phikit.models.common import quantize_rows

    sync = torch.cuda.synchronize if model.device.type == "cuda" else (lambda: None)
    cache = model.new_cache(1, depth + new_tokens + 1, kv_cache)
    block = torch.randn(
        cache.k.shape[:3] + (min(depth, 256), cache.k.shape[-1]), generator=torch.Generator().manual_seed(0)
    )
    if cache.scales is None:
        blocks = (block, block)
    else:
        codes, scale = quantize_rows(block)
        blocks = (codes, codes, scale, scale)
    for t, b in zip(cache.tensors, blocks):
        for start in range(0, depth, block.shape[3]):
            n = min(block.shape[3], depth - start)
            t[:, :, :, start : start + n] = b[:, :, :, :n]
    token = torch.tensor([[token_id]], device=model.device)
    slot = torch.tensor([depth], device=model.device)
    position = torch.tensor([[depth]], device=model.device)
    stamps = []
    with torch.inference_mode():
        for _ in range(new_tokens):
            logits = model.decode_step(token, slot, cache, position, None)
            token = logits[:, -1].argmax(-1, keepdim=True)
            sync()
            stamps.append(time.perf_counter())
            slot += 1
            position += 1
    first = 1 if len(stamps) > 2 else 0
    return (len(stamps) - 1 - first) / (stamps[-1] - stamps[first])


def measure_transformers(s: BenchSettings, precision: str) -> dict:
    """The same measurements with transformers' model of the checkpoint's family (PhiForCausalLM,
    Phi3ForCausalLM) and generate."""
    import torch
    from transformers import AutoModelForCausalLM

    from phikit.checkpoint import resolve_device, resolve_model_path
    from phikit.generate import peak_memory_bytes
    from phikit.tokenizer import Tokenizer

    folder = resolve_model_path(s.model)
    device = resolve_device(s.device)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    kwargs = {"dtype": dtypes.get(precision, torch.bfloat16)}
    if precision == "nf4":
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )
    elif precision not in dtypes:
        raise PhikitError(f"transformers has no built-in {precision} path to compare with")
    if precision == "nf4" and device.type == "cuda":
        kwargs["device_map"] = {"": device}
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).eval()
    if "device_map" not in kwargs:
        model.to(device)
    load_s = time.perf_counter() - start
    loaded = _loaded_memory(device)
    tokenizer = Tokenizer(folder)
    ids = torch.tensor([prompt_ids(tokenizer, s.prompt_tokens)], device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    class Stamps:
        """A generate streamer that notes when each token arrives (the first call hands over the prompt)."""

        def __init__(self):
            self.times: list[float] = []

        def put(self, value):
            sync()
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def run(n: int, prompt: torch.Tensor) -> tuple[float, list[float]]:
        stamps = Stamps()
        t = time.perf_counter()
        with torch.inference_mode():
            model.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=tokenizer.pad_id,
                streamer=stamps,
            )
        sync()
        return time.perf_counter() - t, stamps.times[1:]  # the new tokens' arrival times

    def decode() -> float:
        """seconds per token, measured between the tokens themselves (never a difference of two runs' medians,
        which noise can turn negative), after the first two as phikit's"""
        _, times = run(s.new_tokens, ids[:, :16])
        first = 1 if len(times) > 2 else 0
        return (times[-1] - times[first]) / (len(times) - 1 - first)

    run(4, ids[:, :16])
    first = statistics.median(run(1, ids)[0] for _ in range(s.repeats))
    decode_runs = [1 / decode() for _ in range(s.repeats)]
    return {
        "engine": "transformers",
        "precision": precision,
        "load_s": load_s,
        "prefill_tok_s": ids.shape[1] / first,
        "ttft_s": first,
        "decode_tok_s": statistics.median(decode_runs),
        "decode_tok_s_runs": decode_runs,
        "peak_memory_gb": peak_memory_bytes(device) / 1e9,
        **loaded,
    }


def _loaded_memory(device) -> dict:
    """On CUDA: memory allocated once loaded and the peak while loading (GB); the peak counter restarts so
    that ``peak_memory_gb`` is the peak while generating. Nothing on CPU (peak RSS covers it)."""
    import torch

    if device.type != "cuda":
        return {}
    torch.cuda.synchronize(device)
    row = {
        "loaded_memory_gb": torch.cuda.memory_allocated(device) / 1e9,
        "load_peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9,
        "gpu": torch.cuda.get_device_name(device),
    }
    torch.cuda.reset_peak_memory_stats(device)
    return row


def run_one(s: BenchSettings, engine: str, precision: str) -> dict:
    """Measure one engine/precision in a fresh Python process and return its row."""
    payload = json.dumps({"settings": asdict(s), "engine": engine, "precision": precision})
    env = dict(os.environ)
    if s.threads:
        env["OMP_NUM_THREADS"] = str(s.threads)
    proc = subprocess.run([sys.executable, "-m", "phikit.bench", payload], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit code {proc.returncode}"
        return {"engine": engine, "precision": precision, "error": tail}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_bench(s: BenchSettings, progress: bool = True, on_row=None) -> dict:
    """All requested measurements; returns the JSON-ready report (settings, machine, rows).
    ``on_row(report)`` is called with the report so far after each measurement."""
    from tqdm.auto import tqdm

    jobs = []
    if s.compare_transformers:  # transformers' NF4 is bitsandbytes' CUDA path: compared on a GPU only
        nf4 = ("nf4",) if _device_type(s.device) == "cuda" else ()
        jobs += [("transformers", p) for p in dict.fromkeys(["bf16", *s.precisions]) if p in (*DENSE, *nf4)]
    # the baselines (the ratios' denominators) first: a run cut short still has them
    jobs += [("phikit", p) for p in s.precisions]
    machine = machine_description(s.threads)
    report = {"date": time.strftime("%Y-%m-%d"), "machine": machine, "settings": asdict(s), "rows": []}
    bar = tqdm(jobs, desc="bench", unit="run", disable=None if progress else True, file=sys.stderr)
    for engine, precision in bar:
        bar.set_postfix_str(f"{engine} {precision}")
        report["rows"].append(run_one(s, engine, precision))
        _compare(report["rows"])
        if on_row is not None:
            on_row(report)
    return report


def _device_type(device: str) -> str:
    from phikit.checkpoint import resolve_device

    return resolve_device(device).type


def _compare(rows: list[dict]) -> None:
    """Each row's decode speed relative to transformers bf16's, once that is measured."""
    reference = [r for r in rows if r["engine"] == "transformers" and r["precision"] == "bf16" and "error" not in r]
    base = reference[0]["decode_tok_s"] if reference else None
    for r in rows:
        if base and "decode_tok_s" in r:
            r["decode_vs_transformers_bf16"] = r["decode_tok_s"] / base


def markdown(report: dict) -> str:
    cols = [
        ("engine", "engine"),
        ("precision", "precision"),
        ("load_s", "load s"),
        ("prefill_tok_s", "prefill tok/s"),
        ("ttft_s", "first token s"),
        ("decode_tok_s", "decode tok/s (range)"),
        ("loaded_memory_gb", "loaded GB"),
        ("peak_memory_gb", "peak mem GB"),
        ("kv_cache_mb", "KV cache MB"),
        ("kv_cache_dtype", "KV cache type"),
        ("decode_at_depth", "decode tok/s after N tokens (KV cache MB)"),
        ("decode_vs_transformers_bf16", "decode vs transformers bf16"),
        ("perplexity", "perplexity"),
    ]
    rows = [_with_depth_cell(r) for r in report["rows"]]
    cols = [c for c in cols if any(c[0] in r for r in rows)]
    lines = ["| " + " | ".join(h for _, h in cols) + " |", "|" + "---|" * len(cols)]
    spread = False  # some row's decode repeats more than 25% apart
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['engine']} | {r['precision']} | error: {r['error']} |")
            continue
        digits = {"ttft_s": 3}  # a first token within tens of milliseconds
        cells = [f"{r[k]:.{digits.get(k, 2)}f}" if isinstance(r.get(k), float) else str(r.get(k, "")) for k, _ in cols]
        runs = r.get("decode_tok_s_runs") or []
        if len(runs) > 1:  # the repeats' range beside their median
            at = [k for k, _ in cols].index("decode_tok_s")
            cells[at] += f" ({min(runs):.2f}-{max(runs):.2f})"
            spread = spread or max(runs) > 1.25 * min(runs)
        lines.append("| " + " | ".join(cells) + " |")
    if spread:
        lines.append(
            "\ndecode repeats differed by more than 25% (range in brackets): the machine was busy or its memory "
            "bandwidth moved; compare rows of one run, or raise --repeats"
        )
    if any(c[0] == "perplexity" for c in cols):
        lines.append(
            "\nperplexity: of the --perplexity-data text, windows of 1,024 tokens (or the model's context, if "
            "shorter), half of each scored; phikit's rows only"
        )
    return "\n".join(lines)


def _with_depth_cell(row: dict) -> dict:
    """The row with its decode-after-depth results as one table cell (the report itself is left as measured)."""
    if "decode_at_depth_tok_s" not in row:
        return row
    depth = row["decode_at_depth_tok_s"].items()
    mb = row["kv_cache_mb_at_depth"]  # whole MB, or two significant digits under 10 MB (a small model's cache)
    cell = ", ".join(f"{d}: {v:.2f} ({mb[d]:{'.0f' if mb[d] >= 10 else '.2g'}})" for d, v in depth)
    return {**row, "decode_at_depth": cell}


def _worker(payload: str) -> None:
    job = json.loads(payload)
    s = BenchSettings(**job["settings"])
    if s.threads:
        import torch

        torch.set_num_threads(s.threads)
    measure = measure_phikit if job["engine"] == "phikit" else measure_transformers
    print(json.dumps(measure(s, job["precision"])))


if __name__ == "__main__":
    try:
        _worker(sys.argv[1])
    except PhikitError as e:
        print(f"phikit: error: {e}", file=sys.stderr)
        sys.exit(2)
