#!/usr/bin/env bash
# One-shot GPU check, within 8 minutes on a fresh GPU machine with no network (the device's limit per command
# is 10: the stage limits may add up to 480 s at most, and no stage starts, or runs, past 570 s):
#   1. the GPU tests (pytest -m gpu: logits and greedy vs transformers, graphs vs eager, quantized kernels,
#      QLoRA + PEFT, speculative and batched generation, the server);
#   2. a full-size random Phi-2 made there (phi-2's shapes and tokenizer, fp16, 2 shards);
#   3. decoding taken apart (eager / CUDA graphs / graphs + compiled layer) and each linear kernel's GB/s;
#   4. 20 QLoRA steps at 1024 tokens against transformers + peft + trl with the same settings;
#   5. phikit bench in fp16, bf16, int8, int4 and nf4 against transformers fp16/bf16 generate and
#      transformers + bitsandbytes NF4 (its JSON grows row by row: a stage cut short keeps what it measured).
# Writes summary.md, bench.json, finetune.json, decode.json and check.log to the folder given (default
# $OUT, else ./gpu_check_out). Each stage has its own time limit (PHIKIT_CHECK_LIMITS, seconds, in the order
# above; default 100 35 75 80 150 = 440 s, which leaves 40 s of the 480 to the checks, the wheels' install,
# the versions and a re-made checkpoint; a set adding up to more than 480 s is refused); a stage that fails
# or runs out is recorded and the next one runs.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR]
#   PHIKIT_CHECK_DRY=1 bash benchmarks/gpu_check.sh [OUT_DIR]     # rehearsal on the CPU, about a minute
#
# The dry run needs no GPU: every stage runs on the CPU at tiny shapes and budgets (the gpu tests skip; a
# 2-layer Phi-2-shaped checkpoint; bench_gpu_decode --dry; 2 LoRA steps of a 2-layer Phi; phikit bench
# --device cpu on 8 tokens), the wheels are installed aside (/tmp/phikit_site_dry, unused) to time that, and
# summary.md gives each stage's seconds and the total. Its numbers mean nothing; its times are the script's.
#
# Before the run: `bash benchmarks/gpu_wheels.sh` where pip works, so that the git-ignored .whl/ (the extra
# wheels, about 52 MB) and .device/ (Phi-2's tokenizer and 300 guanaco rows, about 4 MB) travel with the
# working tree (the device tool's `carry: [".whl", ".device"]`). The script checks both (the tokenizer and
# the QLoRA rows it will read) and that torch sees a GPU, first: without them it stops within seconds, saying
# why in one line of summary.md. After installing the wheels it checks their own requirements against each
# other and the image's packages (benchmarks/wheel_deps.py) and writes what is unmet into summary.md.
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
: >"$LOG"
DRY=${PHIKIT_CHECK_DRY:-}
[ "$DRY" = 0 ] && DRY=
STAGES=5
BUDGET=480    # seconds the stage limits may add up to: the whole check within 8 minutes
DEADLINE=570  # seconds after the start past which no stage runs: the device allows 600 per command
stop() {  # stop REASON: one line in summary.md (and on the terminal), exit 2
  echo "GPU check stopped before any stage: $1" | tee "$SUMMARY" >&2
  exit 2
}
read -r -a LIMITS <<<"${PHIKIT_CHECK_LIMITS:-100 35 75 80 150}"
[ "${#LIMITS[@]}" -eq "$STAGES" ] ||
  stop "PHIKIT_CHECK_LIMITS has ${#LIMITS[@]} values, one per stage is $STAGES (tests phi2 decode qlora bench)"
total=0
for limit in "${LIMITS[@]}"; do
  [[ $limit =~ ^[0-9]+$ ]] || stop "PHIKIT_CHECK_LIMITS: '$limit' is not a whole number of seconds"
  total=$((total + 10#$limit))
done
[ "$total" -le "$BUDGET" ] ||
  stop "PHIKIT_CHECK_LIMITS add up to ${total}s, more than the ${BUDGET}s the stages may take (8 minutes in all)"
WORK=${PHIKIT_BENCH_WORK:-/tmp/phikit_gpu_check${DRY:+_dry}}  # a dry run's tiny checkpoint lives apart
export PHIKIT_BENCH_WORK=$WORK HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
export TOKENIZERS_PARALLELISM=false
first_dir() { for d in "$@"; do [ -e "$d" ] && { echo "$d"; return; }; done; echo "$1"; }
export PHIKIT_BENCH_TOKENIZER=${PHIKIT_BENCH_TOKENIZER:-$(first_dir ../shared/data/phi2-tokenizer .device/phi2-tokenizer)}
DATA=${PHIKIT_CHECK_DATA:-$(first_dir ../shared/data/guanaco-1k/train.jsonl .device/guanaco.jsonl)}

[ -e "$PHIKIT_BENCH_TOKENIZER/tokenizer.json" ] ||
  stop "no Phi-2 tokenizer at $PHIKIT_BENCH_TOKENIZER (no .device/ nor ../shared/data): run bash benchmarks/gpu_wheels.sh where pip works, and carry .device"
[ -s "$DATA" ] ||
  stop "no QLoRA rows at $DATA (no .device/ nor ../shared/data): run bash benchmarks/gpu_wheels.sh where pip works, and carry .device"
ls .whl/*.whl >/dev/null 2>&1 || [ -n "${PHIKIT_CHECK_NO_WHEELS:-}$DRY" ] ||
  stop "no .whl/*.whl: run bash benchmarks/gpu_wheels.sh where pip works and carry .whl (or set PHIKIT_CHECK_NO_WHEELS=1 where everything is installed)"
if [ -z "$DRY" ]; then
  timeout 60 "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" >>"$LOG" 2>&1 ||
    stop "torch sees no CUDA/ROCm GPU ($PY: $(timeout 30 "$PY" -c 'import torch; print(torch.__version__)' 2>&1 | tail -1))"
fi

NOTES=()  # lines for summary.md, which the version prelude below starts
if [ -z "${PHIKIT_CHECK_NO_WHEELS:-}" ] && ls .whl/*.whl >/dev/null 2>&1; then  # NO_WHEELS: all installed
  SITE=/tmp/phikit_site${DRY:+_dry}  # a dry run times the install but keeps this Python's own packages
  AS_DEVICE=()                       # ... and installs for the device's Python, whichever this one is
  [ -n "$DRY" ] && AS_DEVICE=(--python-version 3.12 --implementation cp --only-binary=:all:)
  started=$SECONDS
  timeout 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
    "${AS_DEVICE[@]}" .whl/*.whl >>"$LOG" 2>&1
  rc=$?
  case $rc in
  0) NOTES+=("Wheels installed in $((SECONDS - started)) s.") ;;
  124) NOTES+=("**Wheel install timed out after 120 s** (see check.log): the stages that need bitsandbytes, trl, datasets or the server's packages may fail.") ;;
  *) NOTES+=("**Wheel install failed** (exit $rc; see check.log).") ;;
  esac
  # the wheels' own requirements against each other and the image's packages: pip --no-deps checks none
  NOTES+=("$(timeout 60 "$PY" benchmarks/wheel_deps.py .whl 2>>"$LOG" || true)")
  [ -n "$DRY" ] || export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO${PYTHONPATH:+:$PYTHONPATH}

{
  echo "# GPU check${DRY:+ DRY RUN (on the CPU, tiny shapes: times only, the numbers mean nothing)}," \
    "$(date -u +%Y-%m-%dT%H:%MZ), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
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
  for note in "${NOTES[@]}"; do
    echo "$note"
    echo
  done
  echo "| stage | exit | seconds |"
  echo "|---|---|---|"
} >"$SUMMARY" 2>&1
echo "| setup: checks, wheels, versions | 0 | $SECONDS |" >>"$SUMMARY"

stage() {  # stage NAME LIMIT COMMAND...: run with a time limit, log its output, note its exit code and time
  local name=$1 limit=$2
  shift 2
  local start=$SECONDS
  local room=$(($(left) - 5))  # the deadline's say: 5 s of grace for a kill
  if [ "$room" -lt 10 ]; then
    echo "| $name | not run (the check's ${DEADLINE} s are spent) | 0 |" >>"$SUMMARY"
    return
  fi
  [ "$room" -lt "$limit" ] && limit=$room
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
left() { echo $((DEADLINE - SECONDS)); }  # seconds before the deadline

DEVICE=cuda
[ -n "$DRY" ] && DEVICE=cpu
# a per-test time limit where pytest-timeout is there (the GPU image has it), so that one stuck test leaves
# time to the others; -v: a cut stage still names the tests that passed
TEST_TIMEOUT=()
timeout 30 "$PY" -c 'import pytest_timeout' >/dev/null 2>&1 &&
  TEST_TIMEOUT=(-p timeout "--timeout=${PHIKIT_CHECK_TEST_TIMEOUT:-60}")
# compiling off (a test about compiling turns it on itself)
stage tests "${LIMITS[0]}" env PHIKIT_CUDA_COMPILE=0 "$PY" -m pytest -v -m gpu tests/test_gpu.py --tb=short \
  -p no:cacheprovider -rfEs "${TEST_TIMEOUT[@]}"
MAKE_PHI2="
import sys; sys.path.insert(0, 'benchmarks')
from common import DRY_PHI2_SHAPE, random_phi2
print(random_phi2(device='$DEVICE', **(DRY_PHI2_SHAPE if '$DRY' else {})))"
stage phi2 "${LIMITS[1]}" "$PY" -c "$MAKE_PHI2"
PHI2=$WORK/phi2-random
make_phi2() {  # a later stage re-creates the checkpoint where the phi2 stage did not finish it
  [ -f "$PHI2/config.json" ] && return
  local start=$SECONDS limit=$(($(left) - 60)) rc
  [ "$limit" -gt 120 ] && limit=120
  [ "$limit" -lt 10 ] && return
  timeout "$limit" "$PY" -c "$MAKE_PHI2" >>"$LOG" 2>&1
  rc=$?
  echo "| phi2 re-made | $rc | $((SECONDS - start)) |" >>"$SUMMARY"
}
make_phi2
if [ -n "$DRY" ]; then
  QLORA=(--steps 2 --layers 2 --hidden 160 --seq-len 64 --batch-size 1)
  BENCH=(--device cpu --prompt-tokens 16 --new-tokens 8 --repeats 1)
else
  QLORA=(--gpu --steps 20)
  BENCH=(--prompt-tokens 128 --new-tokens 64 --repeats 2)
fi
stage decode "${LIMITS[2]}" "$PY" benchmarks/bench_gpu_decode.py --model "$PHI2" --precisions bf16,int4 \
  --json "$OUT_DIR/decode.json" ${DRY:+--dry}
stage qlora "${LIMITS[3]}" "$PY" benchmarks/bench_finetune.py "${QLORA[@]}" --data "$DATA" \
  --out "$OUT_DIR/finetune.json"
make_phi2
stage bench "${LIMITS[4]}" "$PY" -m phikit bench --model "$PHI2" --precisions fp16,bf16,int8,int4,nf4 \
  --compare-transformers "${BENCH[@]}" --json "$OUT_DIR/bench.json"

echo "| **total** | | **$SECONDS** |" >>"$SUMMARY"
echo "=== total: ${SECONDS}s ===" >>"$LOG"

PHIKIT_CHECK_DRY=$DRY "$PY" - "$OUT_DIR" >>"$SUMMARY" 2>>"$LOG" <<'EOF'
import json, os, sys
from pathlib import Path

out = Path(sys.argv[1])
dry = " (dry run on the CPU: tiny shapes, numbers mean nothing)" if os.environ.get("PHIKIT_CHECK_DRY") else ""
def table(rows, cols):
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(f"{r.get(c):.3g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines)
if (out / "bench.json").is_file():
    rows = json.loads((out / "bench.json").read_text())["rows"]
    print(f"\n## phikit bench (full-size random Phi-2){dry}\n")
    print(table(rows, ["engine", "precision", "decode_tok_s", "prefill_tok_s", "ttft_s", "loaded_memory_gb", "peak_memory_gb", "load_s", "error"]))
    for r in rows:
        if r.get("kernels"):
            print(f"\n- {r['precision']}: " + "; ".join(r["kernels"]))
if (out / "finetune.json").is_file():
    print(f"\n## QLoRA, 20 steps x 1024 tokens{dry}\n")
    print("LoRA weights: the dtype each side trains them in (phikit fp32 under bf16 autocast; TRL + PEFT bf16).\n")
    print(table(json.loads((out / "finetune.json").read_text())["rows"], ["engine", "tokens_per_s", "s_per_step", "peak_gpu_memory_gb", "first_loss", "last_loss", "speedup", "lora_dtype"]))
if (out / "decode.json").is_file():
    report = json.loads((out / "decode.json").read_text())
    print(f"\n## Decoding taken apart (copy bandwidth {report['copy_GB_s']:.0f} GB/s){dry}\n")
    print(table(report.get("decode", []), ["precision", "mode", "decode_tok_s", "graph_breaks", "seconds_with_capture_and_compile"]))
    print()
    print(table(report["kernels"], ["shape", "kernel", "us", "GB/s"]))
EOF
cat "$SUMMARY"
