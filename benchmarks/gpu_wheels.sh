#!/usr/bin/env bash
# Download, where pip works, the wheels benchmarks/gpu_check.sh installs on an offline GPU machine whose
# Python (3.12, manylinux x86_64) already has torch, transformers, peft, accelerate, safetensors, tokenizers,
# huggingface_hub, numpy, pyyaml, tqdm and pytest: into .whl/ (git-ignored; about 52 MB). The image's versions
# of the small packages the wheels need (typing-extensions, idna, anyio, annotated-doc, h11) are not known to
# meet their minimums (pydantic needs typing-extensions>=4.16, httpx2 idna>=3.18 and anyio>=4.10), so those
# travel too; benchmarks/wheel_deps.py, which gpu_check.sh runs there, names any requirement still unmet
# (datasets' pyarrow>=24, say: too large to carry). Also copies Phi-2's tokenizer and 300 guanaco rows from
# ../shared/data into .device/ (git-ignored, 4 MB), for a GPU machine that has no ../shared beside the repo.
# Without ../shared it still succeeds, with the wheels only.
#   bash benchmarks/gpu_wheels.sh [PYTHON_VERSION]     # default 3.12
set -euo pipefail
cd "$(dirname "$0")/.."
PYV=${1:-3.12}
WHEELS=(
  bitsandbytes==0.50.2 fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5
  annotated-types==0.8.0 typing-inspection==0.4.5 uvicorn==0.54.0 opentelemetry-api==1.45.2
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 gguf==0.19.0 trl==1.14.2
  openai==3.57.0 httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 jiter==0.19.0 sniffio==1.3.1
  hypothesis==6.170.17 sortedcontainers==2.4.0
  typing-extensions==4.16.0 idna==3.21 anyio==4.16.0 annotated-doc==0.0.7 h11==0.16.0
)
platforms=()
for p in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
  platforms+=(--platform "${p}_x86_64")
done
python3 -m pip download --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
  "${platforms[@]}" -d .whl "${WHEELS[@]}"
SHARED=../shared/data
if [ -d "$SHARED/phi2-tokenizer" ]; then
  mkdir -p .device/phi2-tokenizer
  for f in tokenizer.json tokenizer_config.json special_tokens_map.json added_tokens.json; do
    # 0644, not the source's read-only mode: a second run by a user who is not root can overwrite them
    install -m 0644 "$SHARED/phi2-tokenizer/$f" .device/phi2-tokenizer/
  done
  head -300 "$SHARED/guanaco-1k/train.jsonl" >.device/guanaco.jsonl
elif [ ! -e .device/phi2-tokenizer ]; then
  echo "gpu_wheels.sh: no $SHARED here, so no .device/ (the tokenizer and rows gpu_check.sh needs):" \
    "run it once where ../shared/data exists, or set PHIKIT_BENCH_TOKENIZER and PHIKIT_CHECK_DATA there" >&2
fi
du -sh .whl .device 2>/dev/null || true  # no .device/ where ../shared is absent: still a success
