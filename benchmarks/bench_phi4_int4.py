"""Phi-4 (14.7B) in int4 on a small machine: load within memory, decode and prefill against llama.cpp Q4_0.

    python benchmarks/bench_phi4_int4.py [--rounds 2] [--prompt-tokens 256] [--new-tokens 32]

1. A random full-size Phi-4 checkpoint (40 layers x 5120, 40 query / 10 key-value heads of 128, MLP 17920,
   vocabulary 100352, rope_theta 250000, untied head: 14.66e9 parameters, 29.3 GB in bf16) is written once,
   shard by shard (4 layers a shard, as the Hub's 6 shards of ~5 GB), so it never exists whole in memory:
   it does not fit in this machine's 24 GB. The tokenizer is Phi-3's from ../shared/data (Phi-4's own
   100352-token BPE is not there; the converter pads the vocabulary as for any smaller tokenizer).
2. phikit loads it with ``quantize="int4"`` (group 64): each weight is read into its own buffer, quantized
   and dropped before the next, so the bf16 model never exists either; peak RSS (ru_maxrss of the
   process, loading plus prefill and decoding) is compared with the int4 weights' bytes.
3. llama.cpp: the converter writes TQ2_0 (ternary, about 6 GB: an F16 file, 29 GB, would not fit on this
   disk next to the checkpoint), and llama-quantize --allow-requantize makes Q4_0 of it: the same format,
   size and speed as Q4_0 from F16, only the (random) values differ. llama-bench measures it, interleaved
   with phikit, each round: phikit then llama.cpp.

Writes benchmarks/results_phi4_int4.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import bench_llamacpp  # noqa: E402
from bench_vs_llamacpp import llama  # noqa: E402
from common import (  # noqa: E402
    SHARED_DATA,
    WORK,
    isa_flags,
    linear_weights,
    machine,
    markdown_table,
    save_json,
    sum_bandwidth,
)

from phikit.bench import BenchSettings, run_one  # noqa: E402

PHI4 = dict(
    architectures=["Phi3ForCausalLM"],
    model_type="phi3",
    vocab_size=100352,
    hidden_size=5120,
    intermediate_size=17920,
    num_hidden_layers=40,
    num_attention_heads=40,
    num_key_value_heads=10,
    max_position_embeddings=16384,
    original_max_position_embeddings=16384,
    rope_theta=250000.0,
    rms_norm_eps=1e-5,
    hidden_act="silu",
    tie_word_embeddings=False,
    sliding_window=None,
    bos_token_id=1,  # Phi-3's tokenizer stands in for Phi-4's
    eos_token_id=32000,
    pad_token_id=32000,
    torch_dtype="bfloat16",
)
LAYERS_PER_SHARD = 4


def random_phi4(folder: Path = WORK / "phi4-random") -> Path:
    """Write (once) the random full-size Phi-4 checkpoint shard by shard (bf16, std 0.02)."""
    if (folder / "config.json").is_file():
        return folder
    import torch
    from safetensors.torch import save_file

    tokenizer = SHARED_DATA / "phi3-tokenizer"
    if not tokenizer.is_dir():
        raise SystemExit(f"need Phi-3's tokenizer at {tokenizer} (../shared/data)")
    c = PHI4
    hidden, inter, heads, kv = (
        c["hidden_size"],
        c["intermediate_size"],
        c["num_attention_heads"],
        c["num_key_value_heads"],
    )
    head_dim = hidden // heads
    layers = c["num_hidden_layers"]

    def rand(*shape):
        return (torch.randn(*shape, dtype=torch.bfloat16) * 0.02).contiguous()

    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    groups = [list(range(i, min(i + LAYERS_PER_SHARD, layers))) for i in range(0, layers, LAYERS_PER_SHARD)]
    shards = len(groups) + 1
    weight_map, total = {}, 0
    torch.manual_seed(0)
    for s, group in enumerate([None, *groups]):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        if group is None:  # the embedding, the final norm and the head
            tensors = {
                "model.embed_tokens.weight": rand(c["vocab_size"], hidden),
                "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                "lm_head.weight": rand(c["vocab_size"], hidden),
            }
        else:
            tensors = {}
            for i in group:
                p = f"model.layers.{i}."
                tensors[p + "input_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
                tensors[p + "self_attn.qkv_proj.weight"] = rand((heads + 2 * kv) * head_dim, hidden)
                tensors[p + "self_attn.o_proj.weight"] = rand(hidden, heads * head_dim)
                tensors[p + "post_attention_layernorm.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
                tensors[p + "mlp.gate_up_proj.weight"] = rand(2 * inter, hidden)
                tensors[p + "mlp.down_proj.weight"] = rand(hidden, inter)
        save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update(dict.fromkeys(tensors, name))
        print(f"  wrote {name} ({total / 1e9:.1f} GB so far)", file=sys.stderr, flush=True)
        del tensors
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (tmp / "config.json").write_text(json.dumps(PHI4, indent=2))
    for f in tokenizer.iterdir():
        if f.is_file() and f.name != "PROVENANCE.md":
            shutil.copyfile(f, tmp / f.name)
    tmp.rename(folder)
    return folder


def q4_0_gguf(model: Path) -> Path:
    """llama.cpp's Q4_0 of the checkpoint, made once (converter TQ2_0, then llama-quantize) where
    bench_llamacpp.py looks for it, so its llama-bench runs take it as is."""
    src = bench_llamacpp.source(None)
    bin_dir = bench_llamacpp.build(src)
    out_dir = bench_llamacpp.LLAMA / "gguf"
    out_dir.mkdir(parents=True, exist_ok=True)
    intermediate, q4 = out_dir / f"{model.name}-tq2_0.gguf", out_dir / f"{model.name}-q4_0.gguf"
    if q4.is_file():
        return q4
    if not intermediate.is_file():
        tmp = intermediate.with_name(intermediate.stem + ".tmp.gguf")
        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        print(f"converting {model} to {intermediate.name} ...", file=sys.stderr, flush=True)
        args = [
            sys.executable,
            str(src / "convert_hf_to_gguf.py"),
            "--outtype",
            "tq2_0",
            "--outfile",
            str(tmp),
            str(model),
        ]
        bench_llamacpp.run([*bench_llamacpp.NICE, *args], "convert-phi4", env)
        tmp.rename(intermediate)
    tmp = q4.with_name(q4.stem + ".tmp.gguf")
    print(f"quantizing {intermediate.name} to Q4_0 ...", file=sys.stderr, flush=True)
    cmd = [str(bin_dir / "llama-quantize"), "--allow-requantize", str(intermediate), str(tmp), "Q4_0", "2"]
    bench_llamacpp.run([*bench_llamacpp.NICE, *cmd], "quantize-phi4")
    tmp.rename(q4)
    intermediate.unlink()  # no longer needed
    return q4


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompt-tokens", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=HERE / "results_phi4_int4.json")
    args = ap.parse_args()
    model = random_phi4()
    q4_0_gguf(model)
    weights = linear_weights(model)
    int4_gb = weights * 4.5 / 8 / 1e9  # group 64: 4 bits + an fp16 scale and minimum per 64 weights
    embedding_gb = PHI4["vocab_size"] * PHI4["hidden_size"] * 2 / 1e9  # stays bf16
    settings = BenchSettings(str(model), [], prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens, repeats=1)
    mine, theirs, bandwidth = [], [], []
    for r in range(args.rounds):
        bandwidth.append(sum_bandwidth())
        print(
            f"round {r + 1}/{args.rounds}: tensor.sum {bandwidth[-1]:.1f} GB/s; phikit int4",
            file=sys.stderr,
            flush=True,
        )
        row = run_one(settings, "phikit", "int4")
        if "error" in row:
            raise SystemExit(f"phikit int4 failed: {row['error']}")
        mine.append(row)
        print(f"round {r + 1}/{args.rounds}: llama.cpp Q4_0", file=sys.stderr, flush=True)
        theirs.append(llama(model, "q4_0", args.prompt_tokens, args.new_tokens))
    gbs = statistics.median(bandwidth)

    def med(rows, key):
        return statistics.median(x[key] for x in rows)

    limit = gbs / int4_gb  # tokens/s if every int4 weight byte is read once per token
    peak = max(x["peak_memory_gb"] for x in mine)
    rows = [
        {
            "engine": "phikit",
            "precision": "int4 (g64)",
            "prefill_tok_s": med(mine, "prefill_tok_s"),
            "decode_tok_s": med(mine, "decode_tok_s"),
            "load_s": med(mine, "load_s"),
            "peak_memory_gb": peak,
            "decode_of_bandwidth_limit": f"{med(mine, 'decode_tok_s') / limit:.0%}",
        },
        {
            "engine": "llama.cpp",
            "precision": "Q4_0",
            "prefill_tok_s": med(theirs, "prefill_tok_s"),
            "decode_tok_s": med(theirs, "decode_tok_s"),
            "file_gb": theirs[0]["size_gb"],
        },
    ]
    ratio = rows[0]["decode_tok_s"] / rows[1]["decode_tok_s"]
    print(
        f"\nMachine: {machine()}\nCPU flags: {isa_flags()}\nModel: {model} (random Phi-4 shape, {weights / 1e9:.2f}e9 "
        f"weights in linear layers and head); prefill {args.prompt_tokens}, decode {args.new_tokens} tokens; "
        f"medians of {args.rounds} interleaved rounds; tensor.sum {gbs:.1f} GB/s\n"
        f"int4 weights {int4_gb:.2f} GB (+ bf16 embedding {embedding_gb:.2f} GB); phikit peak RSS {peak:.2f} GB = "
        f"{peak / int4_gb:.2f}x the int4 weights ({peak / (int4_gb + embedding_gb):.2f}x with the embedding); "
        f"decode {ratio:.2f}x llama.cpp Q4_0\n"
    )
    columns = [
        ("engine", "engine"),
        ("precision", "precision"),
        ("prefill_tok_s", "prefill tok/s"),
        ("decode_tok_s", "decode tok/s"),
        ("decode_of_bandwidth_limit", "decode / bandwidth limit"),
        ("load_s", "load s"),
        ("peak_memory_gb", "peak RSS GB"),
        ("file_gb", "GGUF GB"),
    ]
    print(markdown_table(rows, columns))
    save_json(
        args.out,
        {
            "command": " ".join(sys.argv),
            "machine": machine(),
            "cpu_flags": isa_flags(),
            "model": str(model),
            "linear_weights": weights,
            "int4_weights_gb": int4_gb,
            "embedding_gb": embedding_gb,
            "peak_over_int4": peak / int4_gb,
            "decode_vs_llama_cpp": ratio,
            "rows": rows,
            "samples": {"phikit": mine, "llama.cpp": theirs},
            "sum_bandwidth_gb_s": bandwidth,
        },
    )


if __name__ == "__main__":
    main()
