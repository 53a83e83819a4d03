"""Does llama.cpp run what `phikit export --format gguf` writes, and give the same text as phikit?

    python benchmarks/bench_export_llamacpp.py [--model DIR] [--types f16,q8_0] [-n TOKENS] [-t THREADS]

For each GGUF type this script:
1. exports the checkpoint with phikit (`phikit.export.export_gguf`);
2. converts the same checkpoint with llama.cpp's own `convert_hf_to_gguf.py` (`--outtype f16|q8_0`) and
   compares the two files tensor by tensor (names, shapes, GGML types, bytes) and key by key;
3. generates greedily from each prompt with llama.cpp's `llama-completion` on phikit's file and with phikit
   itself on the checkpoint (fp32), and counts how many of the first N tokens agree.

The default model is the small *trained* Phi checkpoint of make_tiny_trained.py (benchmarks/_work/tiny-trained,
trained on Python's documentation), so greedy text is not noise. The prompts are the first 40 tokens of
every fifth long paragraph of its held-out text (heldout.txt); for another model, a few fixed sentences.
llama.cpp is fetched and built as in bench_llamacpp.py (under benchmarks/_work/llamacpp, nothing committed),
plus the `llama-completion` tool. Prints a Markdown table and writes benchmarks/results_export.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llamacpp import LOGS, NICE, build, run, source  # noqa: E402
from common import DOC_PROMPTS, HERE, WORK, markdown_table, save_json  # noqa: E402

IGNORED_KEYS = {"general.name", "general.file_type", "general.quantization_version", "general.size_label"}


def prompts_for(model: Path, tokenizer) -> list[str]:
    held = model / "heldout.txt"
    if not held.is_file():
        return DOC_PROMPTS
    paragraphs = [p for p in held.read_text().split("\n\n") if len(p) > 200][:40:5]
    return [tokenizer.decode(tokenizer.encode(p)[:40]) for p in paragraphs]


def completion_tool(src: Path, bin_dir: Path) -> Path:
    """llama-completion (one prompt, print the continuation), built once next to llama-bench."""
    tool = bin_dir / "llama-completion"
    if not tool.is_file():
        build_dir = bin_dir.parent
        run([*NICE, "cmake", "--build", str(build_dir), "--target", "llama-completion", "-j2"], "build-completion")
    return tool


def converter_gguf(src: Path, model: Path, out: Path, outtype: str) -> Path:
    if not out.is_file():
        tmp = out.with_name(out.stem + ".tmp.gguf")
        import os

        env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
        args = ["--outtype", outtype, "--outfile", str(tmp), str(model)]
        run([*NICE, sys.executable, str(src / "convert_hf_to_gguf.py"), *args], f"convert-{outtype}", env)
        tmp.rename(out)
    return out


def compare_files(ours: Path, theirs: Path) -> dict:
    """Tensor-by-tensor and key-by-key comparison of two GGUF files with gguf-py's reader."""
    import gguf

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    same_bytes, max_diff, mismatched = 0, 0.0, []
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            mismatched.append(f"{name}: only in {'phikit' if name in ta else 'converter'}")
            continue
        x, y = ta[name], tb[name]
        if x.tensor_type != y.tensor_type or list(x.shape) != list(y.shape):
            mismatched.append(f"{name}: {x.tensor_type.name}{list(x.shape)} vs {y.tensor_type.name}{list(y.shape)}")
            continue
        if np.array_equal(np.asarray(x.data).view(np.uint8), np.asarray(y.data).view(np.uint8)):
            same_bytes += 1
        else:
            dx = gguf.quants.dequantize(x.data, x.tensor_type)
            dy = gguf.quants.dequantize(y.data, y.tensor_type)
            max_diff = max(max_diff, float(np.abs(dx.astype(np.float64) - dy).max()))
    keys = {}
    for reader, side in ((a, "phikit"), (b, "converter")):
        for key, field in reader.fields.items():
            if key.startswith("GGUF.") or key in IGNORED_KEYS:
                continue
            keys.setdefault(key, {})[side] = field.contents()
    key_diffs = [k for k, v in sorted(keys.items()) if v.get("phikit") != v.get("converter")]
    return {
        "tensors": len(ta),
        "identical_bytes": same_bytes,
        "max_abs_diff_other": max_diff,
        "mismatched_tensors": mismatched,
        "differing_keys": key_diffs,
    }


def llama_greedy(tool: Path, gguf_file: Path, prompt: str, n: int, threads: int) -> str:
    cmd = [
        str(tool), "-m", str(gguf_file), "-p", prompt, "-n", str(n), "--temp", "0", "-t", str(threads),
        "-no-cnv", "--no-display-prompt", "--no-escape", "--no-warmup", "-s", "0", "--ignore-eos", "-c", "512",
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    LOGS.mkdir(parents=True, exist_ok=True)
    (LOGS / "completion.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(f"{proc.stderr[-2000:]}\nerror: llama-completion failed (exit {proc.returncode})")
    return proc.stdout


def agreement(tokenizer, ours: list[int], text: str, n: int) -> int:
    """How many of phikit's first n tokens llama.cpp's text reproduces (re-tokenized, prefix match)."""
    theirs = tokenizer.encode(text)
    same = 0
    for x, y in zip(ours[:n], theirs[:n]):
        if x != y:
            break
        same += 1
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=WORK / "tiny-trained", help="checkpoint folder")
    ap.add_argument("--types", default="f16,q8_0", help="GGUF types to export and compare (default f16,q8_0)")
    ap.add_argument("-n", type=int, default=32, help="greedy tokens per prompt (default 32)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--version", default=None, help="llama-cpp-python sdist version (default: newest present)")
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(f"error: no checkpoint at {args.model}; run benchmarks/make_tiny_trained.py or pass --model")

    import phikit
    from phikit.export import export_gguf

    src = source(args.version)
    tool = completion_tool(src, build(src))
    out_dir = WORK / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    phi = phikit.load(args.model, dtype="fp32", device="cpu")
    prompts = prompts_for(args.model, phi.tokenizer)
    ours_greedy = {}
    for prompt in prompts:
        c = phi.generate(prompt, template="raw", max_new_tokens=args.n, temperature=0)
        ours_greedy[prompt] = c
    rows, results = [], []
    for gtype in args.types.split(","):
        t0 = time.perf_counter()
        ours = export_gguf(args.model, out_dir / f"{args.model.name}-phikit-{gtype}.gguf", gguf_type=gtype,
                           overwrite=True)  # fmt: skip
        export_s = time.perf_counter() - t0
        theirs = converter_gguf(src, args.model, out_dir / f"{args.model.name}-converter-{gtype}.gguf", gtype)
        cmp = compare_files(ours, theirs)
        agree, total, examples = 0, 0, []
        for prompt in prompts:
            text = llama_greedy(tool, ours, prompt, args.n, args.threads)
            ids = ours_greedy[prompt].token_ids
            same = agreement(phi.tokenizer, ids, text, args.n)
            agree += same
            total += min(args.n, len(ids))
            examples.append({"prompt": prompt, "phikit": ours_greedy[prompt].text, "llama.cpp": text, "agree": same})
        result = {
            "type": gtype,
            "export_seconds": round(export_s, 2),
            "bytes": ours.stat().st_size,
            "converter_bytes": theirs.stat().st_size,
            **cmp,
            "greedy_tokens_agreeing": agree,
            "greedy_tokens": total,
            "examples": examples,
        }
        results.append(result)
        rows.append(
            {
                "type": gtype,
                "export": f"{export_s:.1f}",
                "identical": f"{cmp['identical_bytes']}/{cmp['tensors']}",
                "mismatches": len(cmp["mismatched_tensors"]) + len(cmp["differing_keys"]),
                "agree": f"{agree}/{total}",
            }
        )
        print(f"{gtype}: {rows[-1]}", file=sys.stderr)
        for k in cmp["mismatched_tensors"] + cmp["differing_keys"]:
            print(f"  differs: {k}", file=sys.stderr)
    columns = [
        ("type", "GGUF type"),
        ("export", "phikit export s"),
        ("identical", "tensors byte-identical to llama.cpp's converter"),
        ("mismatches", "other differences"),
        ("agree", "greedy tokens llama.cpp = phikit"),
    ]
    print(markdown_table(rows, columns))
    save_json(HERE / "results_export.json", {"model": str(args.model), "results": results})


if __name__ == "__main__":
    main()
