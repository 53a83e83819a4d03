"""Is what `phikit export --format gguf` writes what llama.cpp itself makes, and does llama.cpp run it as phikit?

    python benchmarks/bench_export_llamacpp.py [--model DIR] [--types f16,q4_0,...] [--greedy-types f32,f16]
                                               [-n TOKENS] [-t THREADS]

1. Converter types (f32, f16, bf16, q8_0, tq1_0, tq2_0): phikit's file against llama.cpp's own
   `convert_hf_to_gguf.py --outtype TYPE` (run with the gguf-py it vendors) on the same folder: whole files
   byte for byte; where they differ, which keys and tensors.
2. llama-quantize types (q4_0, q4_1, q5_0, q5_1): phikit's file against `llama-quantize` run on the
   converter's f16 file, once with `--output-tensor-type q8_0` (phikit's recipe: whole files byte for byte)
   and once plain, which puts output.weight in Q6_K (a k-quant gguf-py cannot write): every other tensor
   byte for byte, and for output.weight each side's error against the f16 values, phikit's within Q8_0's
   bound (half a step of max|x|/127 per 32 values, plus the fp16 scale's rounding).
3. Tokenizer: llama.cpp (llama-cpp-python, `vocab_only`) reading phikit's f16 file tokenizes the 46 strings
   of llama.cpp's own Phi-2 tokenizer test (../shared/data/phi2-tokenizer/reference) to phikit's ids, and
   both to the reference ids (Hugging Face's tokenizer for microsoft/phi-2).
4. Greedy: llama-cpp-python on phikit's files (--greedy-types, default f32 and f16) continues 8 prompts for
   N tokens, greedy, exactly as phikit does (fp32 on CPU), token id for token id, prompts fed as phikit's ids;
   with llama.cpp's KV cache in f32 (as phikit keeps it) and in f16 (llama.cpp's default), which can flip a
   near-tie between two tokens.

The default model is benchmarks/_work/tiny-phi2tok: make_tiny_trained.py's small *trained* Phi with Phi-2's
own tokenizer and 51,200 rows (`python benchmarks/make_tiny_trained.py --tokenizer ../shared/data/phi2-tokenizer
--out benchmarks/_work/tiny-phi2tok`), so greedy text is not noise. Prompts: the first 40 tokens of every
fifth long held-out paragraph (heldout.txt), or a few fixed sentences for another model.

A Phi-3-family checkpoint works the same way (--model DIR --out benchmarks/results_export_NAME.json): its
tokenizer's references are llama.cpp's Phi-3 .out (../shared/data/phi3-tokenizer) or, for o200k, tiktoken's
ids; with LongRoPE, --min-prompt-tokens past the original context puts phikit and llama.cpp (which picks
the long factors when its --n-ctx exceeds the original context) on the same factors.

llama.cpp comes from the llama-cpp-python sdist as in bench_llamacpp.py (converter, gguf-py, llama-quantize
built under benchmarks/_work/llamacpp); llama-cpp-python itself is built from the same sdist (CPU, native)
into benchmarks/_work/llamacpp/python-<version>/, not into the venv. Prints Markdown tables and writes
benchmarks/results_export.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_llamacpp import LLAMA, NICE, build, log, run, source  # noqa: E402
from common import DOC_PROMPTS, HERE, WORK, markdown_table, save_json  # noqa: E402

SHARED = HERE.parent.parent / "shared" / "data"
REFERENCE_SEPARATOR = "\n__ggml_vocab_test__\n"
QUANTIZE_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1")
BINDING_CMAKE_ARGS = (
    "-DLLAVA_BUILD=OFF -DGGML_NATIVE=ON -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF "
    "-DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_OPENSSL=OFF"
)


def python_binding(src: Path):
    """llama-cpp-python built from the sdist that vendors ``src`` (once), imported from its own folder."""
    version = src.parent.parent.name.removeprefix("llama_cpp_python-")
    target = LLAMA / f"python-{version}"
    if not (target / "llama_cpp" / "__init__.py").is_file():
        sdist = LLAMA / "sdist" / f"llama_cpp_python-{version}.tar.gz"
        tmp = target.with_name(target.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        log(f"building llama-cpp-python {version} into {target} (tens of minutes on 2 cores) ...")
        env = {**os.environ, "CMAKE_ARGS": BINDING_CMAKE_ARGS, "CMAKE_BUILD_PARALLEL_LEVEL": "2"}
        pip = [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(tmp)]
        run([*NICE, *pip, str(sdist if sdist.is_file() else src.parent.parent), "diskcache"], "python-binding", env)
        tmp.rename(target)
    sys.path.insert(0, str(target))
    import llama_cpp

    return llama_cpp


def converter_gguf(src: Path, model: Path, out: Path, outtype: str) -> Path:
    tmp = out.with_name(out.stem + ".tmp.gguf")
    env = {**os.environ, "PYTHONPATH": str(src / "gguf-py")}
    args = ["--outtype", outtype, "--outfile", str(tmp), str(model)]
    run([*NICE, sys.executable, str(src / "convert_hf_to_gguf.py"), *args], f"convert-{outtype}", env)
    tmp.replace(out)
    return out


def quantized_gguf(bin_dir: Path, f16: Path, out: Path, qtype: str, output_type: str | None) -> Path:
    tmp = out.with_name(out.stem + ".tmp.gguf")
    extra = ["--output-tensor-type", output_type] if output_type else []
    logname = f"quantize-{qtype}" + (f"-{output_type}-output" if output_type else "")
    run([*NICE, str(bin_dir / "llama-quantize"), *extra, str(f16), str(tmp), qtype, "2"], logname)
    tmp.replace(out)
    return out


def compare_files(ours: Path, theirs: Path, f16: Path | None = None) -> dict:
    """Whole-file and key-by-key / tensor-by-tensor comparison with gguf-py's reader. For tensors of
    different types, each side's largest error against the f16 file's values (``f16``) is reported."""
    import gguf

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    source = {t.name: t for t in gguf.GGUFReader(f16).tensors} if f16 else {}
    ta, tb = {t.name: t for t in a.tensors}, {t.name: t for t in b.tensors}
    identical, differing, other_types = 0, [], []
    for name in sorted(set(ta) | set(tb)):
        if name not in ta or name not in tb:
            differing.append(f"{name}: only in {'phikit' if name in ta else 'llama.cpp'}")
            continue
        x, y = ta[name], tb[name]
        if list(x.shape) != list(y.shape):
            differing.append(f"{name}: shape {list(x.shape)} vs {list(y.shape)}")
        elif x.tensor_type != y.tensor_type:
            other_types.append(type_difference(name, x, y, source.get(name)))
        elif np.asarray(x.data).tobytes() == np.asarray(y.data).tobytes():
            identical += 1
        else:
            dx = gguf.quants.dequantize(x.data, x.tensor_type).astype(np.float64)
            dy = gguf.quants.dequantize(y.data, y.tensor_type)
            differing.append(f"{name}: {x.tensor_type.name} bytes differ, max |diff| {np.abs(dx - dy).max():.3g}")
    keys = {}
    for reader, side in ((a, "phikit"), (b, "llama.cpp")):
        for key, field in reader.fields.items():
            if not key.startswith("GGUF."):
                keys.setdefault(key, {})[side] = (field.types, field.contents())
    differing_keys = [k for k, v in keys.items() if v.get("phikit") != v.get("llama.cpp")]
    same_key_order = [k for k in a.fields] == [k for k in b.fields]
    return {
        "file_identical": ours.read_bytes() == theirs.read_bytes(),
        "tensors": len(ta),
        "identical_tensors": identical,
        "differing_tensors": differing,
        "other_type_tensors": other_types,
        "differing_keys": differing_keys,
        "key_order_equal": same_key_order,
        "tensor_order_equal": [t.name for t in a.tensors] == [t.name for t in b.tensors],
    }


def type_difference(name: str, x, y, source) -> dict:
    """A tensor each side stores in another type: both errors against the f16 values, phikit's bound (Q8_0)."""
    import gguf

    row = {"tensor": name, "phikit": x.tensor_type.name, "llama.cpp": y.tensor_type.name}
    if source is None:
        return row
    ref = gguf.quants.dequantize(source.data, source.tensor_type).astype(np.float64)
    for side, t in (("phikit", x), ("llama.cpp", y)):
        error = np.abs(gguf.quants.dequantize(t.data, t.tensor_type) - ref)
        row[f"{side}_max_error"] = float(error.max())
        row[f"{side}_rms_error"] = float(np.sqrt((error**2).mean()))
    if x.tensor_type == gguf.GGMLQuantizationType.Q8_0:
        blocks = ref.reshape(-1, 32)
        d = np.abs(blocks).max(-1, keepdims=True) / 127
        bound = d / 2 + 127 * d * 2.0**-11
        error = np.abs(gguf.quants.dequantize(x.data, x.tensor_type).reshape(-1, 32) - blocks)
        row["phikit_within_q8_0_bound"] = bool((error <= bound * 1.0001).all())
    return row


def reference_strings(tokenizer) -> list[tuple[str, list[int]]]:
    """llama.cpp's 46 test strings with the reference ids of the checkpoint's tokenizer: llama.cpp's own
    .out files for Phi-2 and Phi-3 (../shared/data/*/reference), tiktoken's o200k for Phi-4-mini."""
    vocab = tokenizer._tok.get_vocab_size()
    name = "phi-3" if vocab < 40000 else "phi-2"
    folder = SHARED / ("phi3-tokenizer" if name == "phi-3" else "phi2-tokenizer") / "reference"
    inp = (SHARED / "phi2-tokenizer" / "reference" / "ggml-vocab-phi-2.gguf.inp").read_text(encoding="utf-8")
    texts = inp.removesuffix(REFERENCE_SEPARATOR).split(REFERENCE_SEPARATOR)
    if vocab > 100_000:  # o200k: the ids tiktoken gives (tests/test_tokenizer.py: equal on 233 strings)
        return [(text, tokenizer.encode(text)) for text in texts]
    out = (folder / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8")
    ids = [[int(i) for i in line.split()] for line in out.removesuffix("\n").split("\n")]
    return list(zip(texts, ids, strict=True))


def tokenization(llama_cpp, gguf_file: Path, tokenizer) -> dict:
    """The 46 reference strings through llama.cpp (as its own test-tokenizer-0: no BOS, specials parsed)."""
    llm = llama_cpp.Llama(model_path=str(gguf_file), vocab_only=True, verbose=False)
    cases = reference_strings(tokenizer)
    mismatches, ours_vs_reference = [], 0
    for text, expected in cases:
        ours = tokenizer.encode(text)
        theirs = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        ours_vs_reference += ours == expected
        if theirs != ours:
            mismatches.append(
                {"text": text, "phikit": ids_text(ours), "llama.cpp": ids_text(theirs), "reference": ids_text(expected)}
            )
    return {
        "strings": len(cases),
        "llama_cpp_equal_phikit": len(cases) - len(mismatches),
        "phikit_equal_reference": ours_vs_reference,
        "mismatches": mismatches,
    }


def prompts_for(model: Path, tokenizer, min_tokens: int = 0) -> list[list[int]]:
    """Prompt ids: the first 40 tokens of held-out paragraphs, else DOC_PROMPTS, each repeated up to
    ``min_tokens`` (a LongRoPE model whose original context they pass computes with its long factors)."""
    held = model / "heldout.txt"
    if held.is_file():
        paragraphs = [p for p in held.read_text().split("\n\n") if len(p) > 200][:40:5]
        prompts = [tokenizer.encode(p)[:40] for p in paragraphs]
    else:
        prompts = [tokenizer.encode(p) for p in DOC_PROMPTS]
    return [(ids * (min_tokens // len(ids) + 1))[: max(min_tokens, len(ids))] for ids in prompts]


def llama_greedy(
    llama_cpp, gguf_file: Path, prompts: list[list[int]], n: int, threads: int, stops, kv_type: str, n_ctx: int = 512
) -> list[list[int]]:
    """Greedy continuations by llama.cpp, its KV cache in ``kv_type`` (f16 is llama.cpp's default; f32 keeps
    keys and values as phikit's fp32 run does, so only the weights' type and summation order differ)."""
    kv = llama_cpp.GGML_TYPE_F32 if kv_type == "f32" else llama_cpp.GGML_TYPE_F16
    llm = llama_cpp.Llama(
        model_path=str(gguf_file), n_ctx=n_ctx, n_threads=threads, seed=0, type_k=kv, type_v=kv, verbose=False
    )
    outputs = []
    for ids in prompts:
        out = []
        for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
            if token in stops:  # phikit's token_ids end before its stop tokens too
                break
            out.append(int(token))
            if len(out) == n:
                break
        outputs.append(out)
    return outputs


def ids_text(ids: list[int]) -> str:
    """Token ids as one short JSON string (a list would take a line per id)."""
    return " ".join(map(str, ids))


def agreeing_prefix(a: list[int], b: list[int]) -> int:
    same = 0
    for x, y in zip(a, b):
        if x != y:
            break
        same += 1
    return same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=WORK / "tiny-phi2tok", help="checkpoint folder")
    ap.add_argument("--types", default="all", help="GGUF types to compare (default all phikit writes)")
    ap.add_argument("--greedy-types", default="f32,f16", help="GGUF types llama.cpp generates from (default f32,f16)")
    ap.add_argument("-n", type=int, default=32, help="greedy tokens per prompt (default 32)")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--version", default=None, help="llama-cpp-python sdist version (default: newest present)")
    ap.add_argument(
        "--min-prompt-tokens",
        type=int,
        default=0,
        help="repeat each prompt up to this many tokens (a LongRoPE model: past its original context, where "
        "phikit and llama.cpp both use the long factors)",
    )
    ap.add_argument("--n-ctx", type=int, default=512, help="llama.cpp's context (default 512)")
    ap.add_argument("--out", type=Path, help="results JSON (default benchmarks/results_export.json)")
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        raise SystemExit(
            f"error: no checkpoint at {args.model}; make it with python benchmarks/make_tiny_trained.py "
            "--tokenizer ../shared/data/phi2-tokenizer --out benchmarks/_work/tiny-phi2tok, or pass --model"
        )

    import phikit
    from phikit.export import CONVERTER_TYPES, GGUF_TYPES, export_gguf
    from phikit.generate import GenerationConfig, generate_tokens

    types = list(GGUF_TYPES) if args.types == "all" else args.types.split(",")
    greedy_types = [t for t in args.greedy_types.split(",") if t]
    src = source(args.version)
    bin_dir = build(src)
    out_dir = WORK / "export"
    out_dir.mkdir(parents=True, exist_ok=True)
    name = args.model.name

    files, rows, results = {}, [], []
    converter_f16 = converter_gguf(src, args.model, out_dir / f"{name}-converter-f16.gguf", "f16")
    for gtype in dict.fromkeys([*types, *greedy_types, "f16"]):
        t0 = time.perf_counter()
        files[gtype] = export_gguf(args.model, out_dir / f"{name}-phikit-{gtype}.gguf", gguf_type=gtype, overwrite=True)
        export_s = time.perf_counter() - t0
        if gtype not in types:
            continue
        if gtype in CONVERTER_TYPES:
            theirs = converter_f16
            if gtype != "f16":
                theirs = converter_gguf(src, args.model, out_dir / f"{name}-converter-{gtype}.gguf", gtype)
            checks = {"convert_hf_to_gguf.py": compare_files(files[gtype], theirs)}
        else:
            same = quantized_gguf(
                bin_dir, converter_f16, out_dir / f"{name}-quantize-q8out-{gtype}.gguf", gtype, "q8_0"
            )
            plain = quantized_gguf(bin_dir, converter_f16, out_dir / f"{name}-quantize-{gtype}.gguf", gtype, None)
            checks = {
                "llama-quantize --output-tensor-type q8_0": compare_files(files[gtype], same, converter_f16),
                "llama-quantize": compare_files(files[gtype], plain, converter_f16),
            }
        for against, cmp in checks.items():
            result = {"type": gtype, "against": against, "export_seconds": round(export_s, 2), **cmp}
            results.append(result)
            other = [f"{d['tensor']} {d['phikit']} vs {d['llama.cpp']}" for d in cmp["other_type_tensors"]]
            rows.append(
                {
                    "type": gtype,
                    "against": against,
                    "file": "identical" if cmp["file_identical"] else "differs",
                    "tensors": f"{cmp['identical_tensors']}/{cmp['tensors']}",
                    "other": ", ".join(other) or "-",
                    "keys": ", ".join(cmp["differing_keys"]) or "-",
                }
            )
            log(f"{gtype} vs {against}: {rows[-1]}")
            for item in cmp["differing_tensors"] + cmp["other_type_tensors"]:
                log(f"  differs: {item}")

    llama_cpp = python_binding(src)
    phi = phikit.load(args.model, dtype="fp32", device="cpu")
    tokens = tokenization(llama_cpp, files["f16"], phi.tokenizer)
    log(f"tokenizer: {tokens['llama_cpp_equal_phikit']}/{tokens['strings']} strings llama.cpp = phikit")
    for m in tokens["mismatches"]:
        log(f"  differs: {m}")

    prompt_ids = prompts_for(args.model, phi.tokenizer, args.min_prompt_tokens)
    prompts = [phi.tokenizer.decode(ids) for ids in prompt_ids]
    stops = phi.tokenizer.stop_ids
    ours = []
    for ids in prompt_ids:  # phikit's greedy tokens from the very ids llama.cpp gets, up to a stop token
        out = []
        for step in generate_tokens(phi.model, [ids], GenerationConfig(max_new_tokens=args.n), phi.tokenizer.pad_id):
            if int(step) in stops:
                break
            out.append(int(step))
        ours.append(out)
    greedy_rows, greedy = [], {}
    for gtype in greedy_types:
        for kv_type in ("f32", "f16"):
            theirs = llama_greedy(llama_cpp, files[gtype], prompt_ids, args.n, args.threads, stops, kv_type, args.n_ctx)
            same = [a == b for a, b in zip(ours, theirs)]
            agree = sum(agreeing_prefix(a, b) for a, b in zip(ours, theirs))
            total = sum(len(a) for a in ours)
            greedy[f"{gtype}, KV cache {kv_type}"] = [
                {"prompt": p, "phikit_text": phi.tokenizer.decode(a), "phikit": ids_text(a), "llama.cpp": ids_text(b)}
                for p, a, b in zip(prompts, ours, theirs)
            ]
            row = {"type": gtype, "kv": kv_type, "equal": f"{sum(same)}/{len(prompts)}", "tokens": f"{agree}/{total}"}
            greedy_rows.append(row)
            log(f"greedy: {row}")

    print(
        markdown_table(
            rows,
            [
                ("type", "type"),
                ("against", "llama.cpp's file"),
                ("file", "whole file"),
                ("tensors", "tensors byte-identical"),
                ("other", "tensors in another type"),
                ("keys", "differing keys"),
            ],
        )
    )
    print(
        f"\nTokenizer: llama.cpp on phikit's f16 file = phikit on {tokens['llama_cpp_equal_phikit']}/"
        f"{tokens['strings']} reference strings; phikit = reference on {tokens['phikit_equal_reference']}/"
        f"{tokens['strings']}\n"
    )
    print(
        markdown_table(
            greedy_rows,
            [
                ("type", "GGUF llama.cpp ran"),
                ("kv", "llama.cpp KV cache"),
                ("equal", f"continuations equal to phikit's ({args.n} tokens)"),
                ("tokens", "tokens agreeing"),
            ],
        )
    )
    save_json(
        args.out or HERE / "results_export.json",
        {
            "command": " ".join(sys.argv),
            "model": str(args.model),
            "llama_cpp": src.parent.parent.name,
            "files": results,
            "tokenizer": tokens,
            "greedy": {"tokens": args.n, "threads": args.threads, "rows": greedy_rows, "examples": greedy},
        },
    )


if __name__ == "__main__":
    main()
