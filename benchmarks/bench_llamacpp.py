"""Prefill and decode speed of llama.cpp on the same Phi-2 checkpoint, to compare with phikit side by side.

    python benchmarks/bench_llamacpp.py [--model DIR] [--types f16,q8_0,q4_0] [-t THREADS]
                                        [-p PROMPT_TOKENS] [-n GEN_TOKENS] [-r REPETITIONS]

Nothing from llama.cpp is kept in this repository: the script fetches and builds it on demand, all under
benchmarks/_work/llamacpp/ (git-ignored), and skips every step whose output is already there:

1. source: the llama-cpp-python sdist from PyPI (`pip download --no-binary :all: --no-deps`), which vendors
   llama.cpp in vendor/llama.cpp (C++ sources, convert_hf_to_gguf.py, gguf-py);
2. build: cmake, CPU only, -march=native (GGML_NATIVE), Release, static, only llama-bench and llama-quantize;
3. convert: the checkpoint -> GGUF F16 with the vendored convert_hf_to_gguf.py and the vendored gguf-py
   (via PYTHONPATH; it needs only torch, numpy, transformers, safetensors, PyYAML, tqdm from this venv);
4. quantize: F16 -> each other --types entry (Q8_0, Q4_0, ...) with llama-quantize;
5. measure: one `llama-bench -t THREADS -p PROMPT -n GEN -r REPS -o json` run over all the GGUF files.
   Prefill is llama-bench's pp test (one batch of PROMPT tokens), decode its tg test (GEN tokens one by one
   after an empty context); both are the mean tokens/s over the repetitions.

Steps 1-4 run under `nice -n 19` so they stay out of the way of other work; step 5 does not.
Each step logs to benchmarks/_work/llamacpp/logs/. To redo a step, delete its output there: the unpacked
llama_cpp_python-*/ folder, build-*/, or gguf/<model>-<type>.gguf.

Tokenizer: the converter names the BPE pre-tokenizer by hashing how the tokenizer encodes a test string and
looking the hash up in a table. The checkpoint's tokenizer is GPT-2's BPE (Phi-2's vocabulary minus its 38
added whitespace tokens) and hashes to the entry of openai-community/gpt2, so the converter writes
tokenizer.ggml.pre = "gpt-2" (llama.cpp maps "gpt-2" and "phi-2" to the same pre-tokenizer) and pads ids
50257..51199 as unused tokens: no workaround is needed. Should a future converter or transformers version
not recognise the hash ("BPE pre-tokenizer was not recognized"), the converter has no option to name the
pre-tokenizer, and its documented fix (convert_hf_to_gguf_update.py) downloads reference tokenizers from the
Hugging Face Hub, so the script then reruns the converter with get_vocab_base_pre() returning "gpt-2"
(a warning says so). The pre-tokenizer does not matter for the speed: llama-bench feeds random token ids.

Prints a Markdown table and writes benchmarks/results_llamacpp.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import HERE, WORK, machine, markdown_table, random_phi2, save_json  # noqa: E402

from phikit import pagecache  # noqa: E402

LLAMA = WORK / "llamacpp"
LOGS = LLAMA / "logs"
NICE = ["nice", "-n", "19"]
UNRECOGNISED = "BPE pre-tokenizer was not recognized"
# Reruns the converter with the pre-tokenizer named "gpt-2" (argv: llama.cpp dir, converter args...).
FORCE_GPT2_PRE = """
import runpy, sys
root = sys.argv[1]
sys.path[:0] = [root, root + "/gguf-py"]
import conversion.base
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = [root + "/convert_hf_to_gguf.py", *sys.argv[2:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cmd: list[str], logname: str, env: dict | None = None) -> str:
    """Run cmd with its output going to logs/<logname>.log; exit with the log's tail if it fails."""
    LOGS.mkdir(parents=True, exist_ok=True)
    path = LOGS / f"{logname}.log"
    with open(path, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    text = path.read_text(errors="replace")
    if proc.returncode != 0:
        tail = "\n".join(text.splitlines()[-25:])
        tool = Path(cmd[3] if cmd[0] == "nice" else cmd[0]).name
        raise SystemExit(f"{tail}\nerror: {tool} failed (exit {proc.returncode}); full log: {path}")
    return text


def step(msg: str):
    """Log that msg starts now; return a function that logs how long it took."""
    log(msg + " ...")
    start = time.perf_counter()
    return lambda: log(f"  done in {time.perf_counter() - start:.0f} s")


def source(version: str | None) -> Path:
    """The vendored llama.cpp folder of the llama-cpp-python sdist (downloaded and unpacked once)."""
    pattern = f"llama_cpp_python-{version or '*'}"
    found = sorted(LLAMA.glob(f"{pattern}/vendor/llama.cpp/convert_hf_to_gguf.py"), key=os.path.getmtime)
    if found:
        return found[-1].parent
    sdists = sorted((LLAMA / "sdist").glob(f"{pattern}.tar.gz"), key=os.path.getmtime)
    if not sdists:
        done = step("downloading the llama-cpp-python sdist from PyPI")
        spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
        pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps", spec]
        run([*NICE, *pip, "-d", str(LLAMA / "sdist")], "download")
        done()
        sdists = sorted((LLAMA / "sdist").glob(f"{pattern}.tar.gz"), key=os.path.getmtime)
        if not sdists:
            raise SystemExit(f"error: pip download left no {pattern}.tar.gz in {LLAMA / 'sdist'}")
    done = step(f"unpacking {sdists[-1].name}")
    tmp = LLAMA / "unpack.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(sdists[-1]) as tar:
        tar.extractall(tmp, filter="data")
    (top,) = tmp.iterdir()
    if not (top / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py").is_file():
        raise SystemExit(f"error: {sdists[-1].name} has no vendor/llama.cpp/convert_hf_to_gguf.py")
    shutil.rmtree(LLAMA / top.name, ignore_errors=True)
    top.rename(LLAMA / top.name)
    tmp.rmdir()
    done()
    return LLAMA / top.name / "vendor" / "llama.cpp"


def build(src: Path) -> Path:
    """Build llama-bench and llama-quantize (CPU, native, Release) once per sdist version; return bin/."""
    build_dir = LLAMA / ("build-" + src.parent.parent.name.removeprefix("llama_cpp_python-"))
    bin_dir = build_dir / "bin"
    if (bin_dir / "llama-bench").is_file() and (bin_dir / "llama-quantize").is_file():
        return bin_dir
    for tool in ("cmake", "c++", "nice"):
        if not shutil.which(tool):
            raise SystemExit(f"error: {tool} not found on PATH (on Debian/Ubuntu: apt-get install cmake g++)")
    done = step(f"building llama-bench and llama-quantize in {build_dir} (several minutes on 2 cores)")
    run(
        [
            *NICE,
            "cmake",
            "-S",
            str(src),
            "-B",
            str(build_dir),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DGGML_NATIVE=ON",
            "-DBUILD_SHARED_LIBS=OFF",
            "-DLLAMA_OPENSSL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DLLAMA_BUILD_SERVER=OFF",
        ],
        "cmake-configure",
    )
    run(
        [
            *NICE,
            "cmake",
            "--build",
            str(build_dir),
            "--config",
            "Release",
            "--target",
            "llama-bench",
            "llama-quantize",
            "-j2",
        ],
        "cmake-build",
    )
    done()
    return bin_dir


def convert(src: Path, model: Path, out: Path) -> None:
    """Checkpoint -> GGUF F16 with the vendored converter and gguf-py (see the tokenizer note above)."""
    tmp = out.with_name(out.stem + ".tmp.gguf")
    done = step(f"converting {model} to {out.name}")
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(src / "gguf-py"), os.environ.get("PYTHONPATH")])),
    }
    args = ["--outtype", "f16", "--outfile", str(tmp), str(model)]
    try:
        run([*NICE, sys.executable, str(src / "convert_hf_to_gguf.py"), *args], "convert", env)
    except SystemExit:
        if UNRECOGNISED not in (LOGS / "convert.log").read_text(errors="replace"):
            raise
        log(
            f"  warning: the converter did not recognise the tokenizer's hash; rerunning it with the "
            f"GPT-2 pre-tokenizer (log: {LOGS / 'convert-gpt2-pre.log'})"
        )
        run([*NICE, sys.executable, "-c", FORCE_GPT2_PRE, str(src), *args], "convert-gpt2-pre", env)
    tmp.rename(out)
    done()


def quantize(bin_dir: Path, f16: Path, out: Path, qtype: str, threads: int) -> None:
    tmp = out.with_name(out.stem + ".tmp.gguf")
    done = step(f"quantizing {f16.name} to {qtype.upper()}")
    run([*NICE, str(bin_dir / "llama-quantize"), str(f16), str(tmp), qtype.upper(), str(threads)], f"quantize-{qtype}")
    tmp.rename(out)
    done()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        type=Path,
        help="Hugging Face Phi-2 checkpoint folder (default: the random full-size Phi-2 in "
        "benchmarks/_work/phi2-random, made once)",
    )
    ap.add_argument(
        "--types",
        default="f16,q8_0,q4_0",
        help="comma-separated GGUF types; f16 comes from the converter, the others from "
        "llama-quantize (any type it knows, e.g. q4_k_m) (default: %(default)s)",
    )
    ap.add_argument("-t", "--threads", type=int, default=2, help="llama-bench -t (default: %(default)s)")
    ap.add_argument(
        "-p",
        "--prompt-tokens",
        type=int,
        default=512,
        help="llama-bench -p, prompt length of the prefill test (default: %(default)s)",
    )
    ap.add_argument(
        "-n",
        "--gen-tokens",
        type=int,
        default=128,
        help="llama-bench -n, tokens generated in the decode test (default: %(default)s)",
    )
    ap.add_argument(
        "-r", "--repetitions", type=int, default=5, help="llama-bench -r, runs averaged per test (default: %(default)s)"
    )
    ap.add_argument(
        "-d",
        "--depths",
        default="",
        help="llama-bench -d: comma-separated tokens of context before the decode test (e.g. 4096,16384); "
        "the rows then give decode speed at each depth (default: none, an empty context)",
    )
    ap.add_argument(
        "-fa",
        "--flash-attn",
        default="",
        help="llama-bench -fa: 0, 1 or 0,1 to measure both (default: llama-bench's own)",
    )
    ap.add_argument(
        "--cache-type",
        default="",
        help="llama-bench -ctk and -ctv: the KV cache's type, e.g. q8_0 (needs -fa 1; default: llama-bench's f16)",
    )
    ap.add_argument(
        "--llama-cpp-python",
        metavar="VERSION",
        help="sdist version to fetch (default: the one already here, else PyPI's latest)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=HERE / "results_llamacpp.json",
        help="results file (default: benchmarks/results_llamacpp.json)",
    )
    args = ap.parse_args()
    types = [t.strip().lower() for t in args.types.split(",") if t.strip()]
    model = (args.model or random_phi2()).resolve()
    if not (model / "config.json").is_file():
        raise SystemExit(f"error: {model} is not a Hugging Face checkpoint folder (no config.json)")

    src = source(args.llama_cpp_python)
    bin_dir = build(src)
    gguf_dir = LLAMA / "gguf"
    gguf_dir.mkdir(parents=True, exist_ok=True)
    files = {t: gguf_dir / f"{model.name}-{t}.gguf" for t in ["f16", *types]}
    if not files["f16"].is_file() and not all(files[t].is_file() for t in types):  # the F16 file may be removed
        convert(src, model, files["f16"])
    for t in types:
        if not files[t].is_file():
            quantize(bin_dir, files["f16"], files[t], t, args.threads)

    cmd = [
        str(bin_dir / "llama-bench"),
        "-t",
        str(args.threads),
        "-p",
        str(args.prompt_tokens),
        "-n",
        str(args.gen_tokens),
        "-r",
        str(args.repetitions),
        "-o",
        "json",
    ]
    if args.depths:
        cmd += ["-d", args.depths]
    if args.flash_attn:
        cmd += ["-fa", args.flash_attn]
    if args.cache_type:
        cmd += ["-ctk", args.cache_type, "-ctv", args.cache_type]
    settled = {}
    for t in types:
        cmd += ["-m", str(files[t])]
        # its best case, as phikit's loader gets: the GGUF in the page cache on 2 MB pages (phikit/pagecache.py)
        settled[t] = pagecache.settle(files[t], log)
    done = step(f"running llama-bench on {', '.join(types)} ({args.threads} threads)")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    (LOGS / "llama-bench.log").write_text(proc.stderr)
    if proc.returncode != 0:
        raise SystemExit(
            f"{proc.stderr[-3000:]}\nerror: llama-bench failed (exit {proc.returncode}); "
            f"log: {LOGS / 'llama-bench.log'}"
        )
    done()
    records = json.loads(proc.stdout)

    type_of = {str(path): t for t, path in files.items()}
    rows = []
    for t in types:
        mine = [r for r in records if type_of.get(r["model_filename"]) == t]
        pp = [r for r in mine if r["n_prompt"] > 0 and r["n_gen"] == 0]
        for tg in (r for r in mine if r["n_gen"] > 0 and r["n_prompt"] == 0):
            row = {"type": t.upper(), "size_gb": tg["model_size"] / 1e9, "page_cache": settled[t]}
            if pp:
                row.update(prefill_tok_s=pp[0]["avg_ts"], prefill_stddev=pp[0]["stddev_ts"])
            row.update(decode_tok_s=tg["avg_ts"], decode_stddev=tg["stddev_ts"])
            if args.depths or args.flash_attn:
                row.update(depth=tg.get("n_depth", 0), flash_attn=tg.get("flash_attn"))
            if args.cache_type:
                row.update(kv_cache=f"{tg.get('type_k')}/{tg.get('type_v')}")
            rows.append(row)

    first = records[0]
    print(
        f"\nMachine: {machine()}\nllama.cpp build {first['build_number']} ({first['build_commit']}), "
        f"{src.parent.parent.name}, {args.threads} threads\nModel: {model}, prefill {args.prompt_tokens} "
        f"tokens, decode {args.gen_tokens} tokens, mean of {args.repetitions} runs\n"
    )
    print(
        markdown_table(
            rows,
            [
                c
                for c in [
                    ("type", "type"),
                    ("size_gb", "size GB"),
                    ("depth", "context before decode"),
                    ("flash_attn", "flash attention"),
                    ("prefill_tok_s", "prefill tok/s"),
                    ("decode_tok_s", "decode tok/s"),
                ]
                if any(c[0] in r for r in rows)
            ],
        )
    )
    save_json(
        args.out,
        {
            "command": " ".join(sys.argv),
            "llama_bench_command": " ".join(cmd),
            "model": str(model),
            "llama_cpp": {
                "source": src.parent.parent.name,
                "build_number": first["build_number"],
                "build_commit": first["build_commit"],
                "cpu_info": first["cpu_info"],
                "backends": first["backends"],
            },
            "threads": args.threads,
            "prompt_tokens": args.prompt_tokens,
            "gen_tokens": args.gen_tokens,
            "repetitions": args.repetitions,
            "rows": rows,
            "llama_bench": records,
        },
    )
    log(f"wrote {args.out}")


if __name__ == "__main__":
    main()
