#!/usr/bin/env bash
# One-shot GPU check, under 9 minutes on a fresh GPU machine with no network:
#   1. the GPU tests (pytest -m gpu: logits and greedy vs transformers, graphs vs eager, quantized kernels,
#      QLoRA + PEFT, speculative and batched generation, the server);
#   2. a full-size random Phi-2 made there (phi-2's shapes and tokenizer, fp16, 2 shards);
#   3. decoding taken apart (eager / CUDA graphs / graphs + compiled layer) and each linear kernel's GB/s;
#   4. 20 QLoRA steps at 1024 tokens against transformers + peft + trl with the same settings;
#   5. phikit bench in fp16, bf16, int8, int4 and nf4 against transformers fp16/bf16 generate and
#      transformers + bitsandbytes NF4 (its JSON grows row by row: a stage cut short keeps what it measured).
# Writes summary.md, bench.json, finetune.json, decode.json and check.log to the folder given (default
# $OUT, else ./gpu_check_out). Each stage has its own time limit (PHIKIT_CHECK_LIMITS, seconds, in the
# order above); a stage that fails or runs out is recorded and the next one runs.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#
# Before the run: `bash benchmarks/gpu_wheels.sh` where pip works, so that the git-ignored .whl/ (the extra
# wheels, about 52 MB) and .device/ (Phi-2's tokenizer and 300 guanaco rows, about 4 MB) travel with the
# working tree (the device tool's `carry: [".whl", ".device"]`). The script checks both, and that torch sees a
# GPU, first: without them it stops within seconds, saying why in one line of summary.md.
#
# The Python it runs (python3, or $PYTHON) needs torch with CUDA/ROCm, transformers, peft, accelerate,
# safetensors, tokenizers, huggingface_hub, numpy, pyyaml, tqdm and pytest; the rest (bitsandbytes,
# fastapi, uvicorn, pydantic, datasets, gguf, trl, openai and what they need) it installs from wheels in
# .whl/ when that folder exists (download them where pip works: bash benchmarks/gpu_wheels.sh), else it
# expects them installed. The tokenizer comes from $PHIKIT_BENCH_TOKENIZER (default ../shared/data/
# phi2-tokenizer, else .device/phi2-tokenizer) and the QLoRA rows from $PHIKIT_CHECK_DATA (default
# ../shared/data/guanaco-1k/train.jsonl, else .device/guanaco.jsonl).
set -uo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT_DIR=${1:-${OUT:-gpu_check_out}}
mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)
PY=${PYTHON:-python3}
LOG=$OUT_DIR/check.log
SUMMARY=$OUT_DIR/summary.md
STAGES=5
stop() {  # stop REASON: one line in summary.md (and on the terminal), exit 2
  echo "GPU check stopped before any stage: $1" | tee "$SUMMARY" >&2
  exit 2
}
read -r -a LIMITS <<<"${PHIKIT_CHECK_LIMITS:-100 40 75 90 180}"
[ "${#LIMITS[@]}" -eq "$STAGES" ] ||
  stop "PHIKIT_CHECK_LIMITS has ${#LIMITS[@]} values, one per stage is $STAGES (tests phi2 decode qlora bench)"
for limit in "${LIMITS[@]}"; do
  [[ $limit =~ ^[0-9]+$ ]] || stop "PHIKIT_CHECK_LIMITS: '$limit' is not a whole number of seconds"
done
WORK=${PHIKIT_BENCH_WORK:-/tmp/phikit_gpu_check}
export PHIKIT_BENCH_WORK=$WORK HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
first_dir() { for d in "$@"; do [ -e "$d" ] && { echo "$d"; return; }; done; echo "$1"; }
export PHIKIT_BENCH_TOKENIZER=${PHIKIT_BENCH_TOKENIZER:-$(first_dir ../shared/data/phi2-tokenizer .device/phi2-tokenizer)}
DATA=${PHIKIT_CHECK_DATA:-$(first_dir ../shared/data/guanaco-1k/train.jsonl .device/guanaco.jsonl)}

[ -e ../shared/data/phi2-tokenizer ] || [ -e .device/phi2-tokenizer ] ||
  stop "no .device/ (nor ../shared/data): run bash benchmarks/gpu_wheels.sh where pip works, and carry .device"
ls .whl/*.whl >/dev/null 2>&1 || [ -n "${PHIKIT_CHECK_NO_WHEELS:-}" ] ||
  stop "no .whl/*.whl: run bash benchmarks/gpu_wheels.sh where pip works and carry .whl (or set PHIKIT_CHECK_NO_WHEELS=1 where everything is installed)"
timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1 ||
  stop "torch sees no CUDA/ROCm GPU ($PY: $(timeout 30 "$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1))"

if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/phikit_site \
    .whl/*.whl >>"$LOG" 2>&1 || echo "wheel install failed (see check.log)" | tee -a "$LOG"
  export PYTHONPATH=/tmp/phikit_site:$REPO${PYTHONPATH:+:$PYTHONPATH}
else
  export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}
fi

{
  echo "# GPU check $(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
  echo
  echo '```'
  timeout 20 nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null ||
    timeout 20 rocm-smi 2>/dev/null | head -5
  timeout 60 "$PY" - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda, "| hip", torch.version.hip)
print("gpu", torch.cuda.get_device_name() if torch.cuda.is_available() else "none", torch.cuda.get_device_capability() if torch.cuda.is_available() else "")
for name in ("transformers", "peft", "accelerate", "bitsandbytes", "trl", "datasets", "fastapi"):
    try:
        print(name, importlib.import_module(name).__version__)
    except Exception as e:
        print(name, "missing:", type(e).__name__)
EOF
  echo '```'
  echo
  echo "| stage | exit | seconds |"
  echo "|---|---|---|"
} >"$SUMMARY" 2>&1

stage() {  # stage NAME LIMIT COMMAND...: run with a time limit, log its output, note its exit code and time
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  echo "=== $name (limit ${limit}s) ===" >>"$LOG"
  local mark
  mark=$(wc -l <"$LOG")
  timeout --kill-after=5 "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  case $rc in
  124 | 137) rc="$rc (time limit)" ;;  # 137: killed after the grace period
  0) tail -n +"$((mark + 1))" "$LOG" | grep -Eq '^(=+ )?[0-9]+ skipped(,| in )' && rc="0 (every test skipped)" ;;
  esac
  echo "| $name | $rc | $((SECONDS - start)) |" >>"$SUMMARY"
  echo "=== $name: exit $rc after $((SECONDS - start))s ===" >>"$LOG"
}

# compiling off (a test about compiling turns it on itself); -v: a cut stage still names the tests that passed
stage tests "${LIMITS[0]}" env PHIKIT_CUDA_COMPILE=0 "$PY" -m pytest -v -m gpu tests/test_gpu.py --tb=short \
  -p no:cacheprovider -rfEs
stage phi2 "${LIMITS[1]}" "$PY" -c "
import sys; sys.path.insert(0, 'benchmarks')
from common import random_phi2
print(random_phi2(device='cuda'))"
PHI2=$WORK/phi2-random
make_phi2() {  # a later stage re-creates the checkpoint where the phi2 stage did not finish it
  [ -f "$PHI2/config.json" ] || timeout 120 "$PY" -c "
import sys; sys.path.insert(0, 'benchmarks')
from common import random_phi2
random_phi2(device='cuda')" >>"$LOG" 2>&1
}
make_phi2
stage decode "${LIMITS[2]}" "$PY" benchmarks/bench_gpu_decode.py --model "$PHI2" --precisions bf16,int4 \
  --json "$OUT_DIR/decode.json"
stage qlora "${LIMITS[3]}" "$PY" benchmarks/bench_finetune.py --gpu --steps 20 --data "$DATA" \
  --out "$OUT_DIR/finetune.json"
make_phi2
stage bench "${LIMITS[4]}" "$PY" -m phikit bench --model "$PHI2" --precisions fp16,bf16,int8,int4,nf4 \
  --compare-transformers --prompt-tokens 128 --new-tokens 64 --repeats 2 --json "$OUT_DIR/bench.json"

"$PY" - "$OUT_DIR" >>"$SUMMARY" 2>>"$LOG" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
def table(rows, cols):
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(c):.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)
if (out / "bench.json").is_file():
    rows = json.loads((out / "bench.json").read_text())["rows"]
    print("\n## phikit bench (full-size random Phi-2)\n")
    print(table(rows, ["engine", "precision", "decode_tok_s", "prefill_tok_s", "ttft_s", "loaded_memory_gb", "peak_memory_gb", "load_s", "error"]))
    for r in rows:
        if r.get("kernels"):
            print(f"\n- {r['precision']}: " + "; ".join(r["kernels"]))
if (out / "finetune.json").is_file():
    print("\n## QLoRA, 20 steps x 1024 tokens\n")
    print(table(json.loads((out / "finetune.json").read_text())["rows"], ["engine", "tokens_per_s", "s_per_step", "peak_gpu_memory_gb", "first_loss", "last_loss", "speedup"]))
if (out / "decode.json").is_file():
    report = json.loads((out / "decode.json").read_text())
    print(f"\n## Decoding taken apart (copy bandwidth {report['copy_GB_s']:.0f} GB/s)\n")
    print(table(report.get("decode", []), ["precision", "mode", "decode_tok_s", "graph_breaks", "seconds_with_capture_and_compile"]))
    print()
    print(table(report["kernels"], ["shape", "kernel", "us", "GB/s"]))
EOF
cat "$SUMMARY"
