"""Shared helpers for the benchmark scripts: a full-size random Phi-2 checkpoint, machine info, tables."""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = Path(os.environ.get("PHIKIT_BENCH_WORK", HERE / "_work"))
# Phi-2's own tokenizer: GPT-2's BPE plus 38 whitespace-run tokens, 50,295 in all
SHARED_TOKENIZER = Path(
    os.environ.get("PHIKIT_BENCH_TOKENIZER", HERE.parent.parent / "shared" / "data" / "phi2-tokenizer")
)

PHI2_SHAPE = dict(
    vocab_size=51200,
    hidden_size=2560,
    intermediate_size=10240,
    num_hidden_layers=32,
    num_attention_heads=32,
    max_position_embeddings=2048,
    partial_rotary_factor=0.4,
    rope_theta=10000.0,
    layer_norm_eps=1e-5,
    bos_token_id=50256,
    eos_token_id=50256,
    resid_pdrop=0.1,
)

# gpu_check.sh's dry run (PHIKIT_CHECK_DRY=1) on the CPU: Phi-2's layout (heads of 80, partial rotary 0.4,
# MLP 4x, its vocabulary) at 2 layers x 320, small enough to make, load and quantize (int4 groups of 64) in seconds
DRY_PHI2_SHAPE = dict(hidden_size=320, intermediate_size=1280, num_hidden_layers=2, num_attention_heads=4)

PROMPT = (
    "Instruct: Write a detailed analogy between mathematics and a lighthouse. Explain how the beam of light "
    "relates to proofs, how the keeper relates to the mathematician, and why ships at sea need both.\nOutput:"
)


# Prompts in the style of Python's documentation, what make_tiny_trained.py's model was trained on.
DOC_PROMPTS = [
    "The for statement is used to",
    "The try statement specifies exception handlers",
    "A class definition defines a class object",
    "The while statement is used for repeated execution",
    "Assignment statements are used to",
    "The with statement is used to wrap the execution",
    "Slicings select a range of items",
    "The import statement",
]


def small_phi(folder: Path, layers: int, hidden: int) -> Path:
    """Write (once) a small Phi-2-shaped checkpoint with random weights (heads of 80, MLP 4x hidden, partial
    rotary 0.4, Phi-2's 50,295-token vocabulary padded to 50304) for the fine-tuning and serving benchmarks."""
    if (folder / "config.json").is_file():
        refresh_tokenizer(folder)
        return folder
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    torch.manual_seed(0)
    config = PhiConfig(
        vocab_size=50304,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 80,
        partial_rotary_factor=0.4,
        max_position_embeddings=2048,
        bos_token_id=50256,
        eos_token_id=50256,
    )
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    PhiForCausalLM(config).save_pretrained(tmp)
    copy_tokenizer(tmp)
    tmp.rename(folder)
    return folder


def random_phi2(folder: Path = WORK / "phi2-random", device: str = "cpu", **overrides) -> Path:
    """Write (once) a full-size Phi-2-shaped checkpoint with random weights, saved by transformers in fp16
    as 2 shards like microsoft/phi-2, with the tokenizer files next to it (initialised on ``device``:
    a GPU does it in seconds)."""
    if (folder / "config.json").is_file():
        refresh_tokenizer(folder)
        return folder
    import torch
    from transformers import PhiConfig, PhiForCausalLM

    print(f"creating a random full-size Phi-2 checkpoint in {folder} (once) ...", file=sys.stderr)
    torch.manual_seed(0)
    config = PhiConfig(**{**PHI2_SHAPE, **overrides})
    with torch.device(device):
        model = PhiForCausalLM._from_config(config, dtype=torch.float16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="3GB")
    copy_tokenizer(tmp)
    tmp.rename(folder)
    return folder


SHARED_DATA = SHARED_TOKENIZER.parent


def _longrope(rotary_dim: int) -> dict:
    """LongRoPE settings shaped as the Hub's 128k configs (factors made up: speed does not depend on them)."""
    half = rotary_dim // 2
    return {
        "type": "longrope",
        "short_factor": [1.0 + 0.05 * i for i in range(half)],
        "long_factor": [1.0 + 1.2 * i for i in range(half)],
    }


# Full-size shapes of the Phi-3 family (the Hub's config.json values; LongRoPE factors made up). "phi3-mini"
# is Phi-3.5-mini-instruct / Phi-3-mini-128k: 32 x 3072, 32 heads of 96 (MHA), 128k with LongRoPE.
PHI3_SHAPES = {
    "phi3-mini": dict(
        vocab_size=32064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling=_longrope(96),
        sliding_window=262144,
        bos_token_id=1,
        eos_token_id=32000,
        pad_token_id=32000,
    ),
    "phi4-mini": dict(
        vocab_size=200064,
        hidden_size=3072,
        intermediate_size=8192,
        num_hidden_layers=32,
        num_attention_heads=24,
        num_key_value_heads=8,
        partial_rotary_factor=0.75,
        max_position_embeddings=131072,
        original_max_position_embeddings=4096,
        rope_scaling=_longrope(96),
        sliding_window=262144,
        tie_word_embeddings=True,
        bos_token_id=199999,
        eos_token_id=199999,
        pad_token_id=199999,
    ),
}
PHI3_TOKENIZERS = {"phi3-mini": "phi3-tokenizer", "phi4-mini": "phi4-mini-tokenizer"}


def random_phi3(variant: str, folder: Path | None = None) -> Path:
    """Write (once) a full-size Phi-3-family checkpoint with random bf16 weights (as the Hub ships them) and
    the real tokenizer from ../shared/data; ``variant`` is a key of ``PHI3_SHAPES``."""
    folder = folder or WORK / f"{variant}-random"
    if (folder / "config.json").is_file():
        return folder
    import gzip

    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    tokenizer = SHARED_DATA / PHI3_TOKENIZERS[variant]
    if not tokenizer.is_dir():
        raise SystemExit(f"need the tokenizer at {tokenizer} (../shared/data)")
    print(f"creating a random full-size {variant} checkpoint in {folder} (once) ...", file=sys.stderr)
    torch.manual_seed(0)
    with torch.device("cpu"):
        model = Phi3ForCausalLM._from_config(Phi3Config(**PHI3_SHAPES[variant]), dtype=torch.bfloat16)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, max_shard_size="4GB")
    del model
    for f in tokenizer.iterdir():
        if f.name == "tokenizer.json.gz":
            (tmp / "tokenizer.json").write_bytes(gzip.decompress(f.read_bytes()))
        elif f.is_file() and f.name != "PROVENANCE.md":
            shutil.copyfile(f, tmp / f.name)
    tmp.rename(folder)
    return folder


# bytes per weight a decoding step reads through the linear layers and the output head (int8 adds a per-row
# scale, int4 (group 64) an fp16 scale and minimum per group: 4.5 bits); Phi-2: 2.648e9 such weights
BYTES_PER_WEIGHT = {"bf16": 2.0, "int8": 1.0, "int4": 4.5 / 8, "f16": 2.0, "q8_0": 34 / 32, "q4_0": 18 / 32}
# (llama.cpp's blocks of 32: Q8_0 an fp16 scale, Q4_0 an fp16 scale per 32 nibbles; its Q4_0 files keep the
# output head in Q6_K, 6.56 bits, counted here as Q4_0: its limit is slightly overstated)


def sum_bandwidth() -> float:
    """GB/s of ``tensor.sum()`` over 2 GB of fp32 (median of 5), the bandwidth decoding can reach: the tensor on
    2 MB pages as phikit places weights (``kernels.empty_weight``; on 4 KB pages the same sum read 28-29
    against 36 GB/s on the 2-core EPYC VM, benchmarks/RESULTS.md, issue 23)."""
    import statistics

    import torch

    from phikit import kernels

    t = kernels.empty_weight((2**29,), torch.float32).fill_(1.0)
    t.sum()
    times = []
    for _ in range(5):
        started = time.perf_counter()
        t.sum()
        times.append(time.perf_counter() - started)
    return t.numel() * 4 / statistics.median(times) / 1e9


def _attention_shape(c: dict) -> tuple[int, int, int]:
    """(query heads, key-value heads, head dim) of a checkpoint's config.json."""
    heads = c["num_attention_heads"]
    return heads, c.get("num_key_value_heads") or heads, c.get("head_dim") or c["hidden_size"] // heads


def decode_kv_bytes(model: Path, prompt_tokens: int, new_tokens: int) -> float:
    """Bytes of the fp16 KV cache (phikit's and llama.cpp's default) a decoding step reads besides the weights,
    every layer's keys and values, at the decode's mean context (the prompt and half the new tokens), from
    config.json (up to a sliding window's length, which the contexts measured with it here stay within)."""
    c = json.loads((model / "config.json").read_text())
    _, kv, head_dim = _attention_shape(c)
    return 2 * c["num_hidden_layers"] * kv * head_dim * 2 * (prompt_tokens + new_tokens / 2)


def linear_weights(model: Path) -> int:
    """Weights a decoding step reads through linear layers (every layer's projections and the output head,
    tied or not), from the checkpoint's config.json: the bandwidth limit's numerator."""
    c = json.loads((model / "config.json").read_text())
    hidden, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    heads, kv, head_dim = _attention_shape(c)
    attention = hidden * head_dim * (heads + 2 * kv) + heads * head_dim * hidden
    mlp = 2 * hidden * inter + inter * hidden if c["model_type"] == "phi3" else 2 * hidden * inter
    return layers * (attention + mlp) + c["vocab_size"] * hidden


def copy_tokenizer(folder: Path) -> None:
    """Put the shared tokenizer's files (not its ``reference/`` folder) into the checkpoint ``folder``."""
    if not SHARED_TOKENIZER.is_dir():
        raise SystemExit(f"need Phi-2's tokenizer at {SHARED_TOKENIZER} (set PHIKIT_BENCH_TOKENIZER to its folder)")
    for f in SHARED_TOKENIZER.iterdir():
        if not f.is_file() or f.name == "PROVENANCE.md":
            continue
        target = folder / f.name
        if not target.is_file() or target.read_bytes() != f.read_bytes():
            tmp = target.with_name(target.name + ".tmp")
            shutil.copyfile(f, tmp)
            tmp.replace(target)


def refresh_tokenizer(folder: Path) -> None:
    """Bring a checkpoint written by an earlier run up to date with the shared tokenizer (those written before
    Phi-2's tokenizer was shared carry GPT-2's 50,257 tokens); without the shared one, keep what is there."""
    if SHARED_TOKENIZER.is_dir():
        copy_tokenizer(folder)


def machine() -> str:
    """One line naming the CPU (and GPU if any), core count and torch version."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return f"{cpu} ({os.cpu_count()} cores){gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def run_worker(script: Path, args: list[str], timeout: int = 3600) -> dict:
    """Run one measurement in a fresh process (so peak RSS is its own) and parse its last JSON line."""
    proc = subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def isa_flags() -> str:
    """The CPU's vector-instruction flags (AVX*, AMX, FMA, F16C), sorted: what the kernels may use and what
    every speed number in RESULTS.md names."""
    from phikit import kernels

    return " ".join(sorted(f for f in kernels.cpu_flags() if f.startswith(("avx", "amx", "fma", "f16c")))) or "unknown"


def markdown_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Rows of dicts -> a Markdown table; columns are (key, header)."""
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _ in columns:
            value = row.get(key, "")
            cells.append(f"{value:.2f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_json(path: Path, payload: dict) -> None:
    payload = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), **payload}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    tmp.replace(path)
