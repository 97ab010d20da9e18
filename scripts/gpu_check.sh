#!/usr/bin/env bash
# The GPU checks in one call (bench/gpu_check.py says what they are), for a lent GPU machine.
#
#   bash scripts/gpu_check.sh --prepare     # here, once: wheels the GPU image lacks into .whl/, E2E into .gpu_data/
#   device run: bash scripts/gpu_check.sh   # with carry [".whl", ".gpu_data"], timeout_s 600
#   bash scripts/gpu_check.sh --cpu         # here: the same script on the CPU, 2 layers (checks the script)
#
# The GPU image has its own torch (CUDA) and an older transformers, and nothing can be downloaded there, so
# --prepare fetches the pinned transformers, accelerate and the [serve] packages as wheels (Python 3.12,
# manylinux) and builds deepspeed's (the zero3 part), and
# the run puts them and src/ on PYTHONPATH instead of installing prefixtune. Results land in $OUT (the device
# tool brings them back) and in bench/results/gpu_check.{json,md}.
set -euo pipefail
cd "$(dirname "$0")/.."
DEEPSPEED_VERSION=0.19.8  # built here by --prepare (25 s on 2 cores), for the zero3 part

if [[ "${1:-}" == "--prepare" ]]; then
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  grep -qx '/.gpu_data/' .git/info/exclude 2>/dev/null || echo /.gpu_data/ >> .git/info/exclude
  rm -rf .whl && mkdir -p .whl .gpu_data
  pin() { grep -E "^$1==" constraints.txt; }  # what the suite is tested with; the rest as installed here
  have() { .venv/bin/python -c "import importlib.metadata as m, sys; print(sys.argv[1] + '==' + m.version(sys.argv[1]))" "$1"; }
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    "$(pin transformers)" "$(pin fastapi)" "$(pin uvicorn)" "$(have starlette)" "$(have pydantic)" \
    "$(have pydantic-core)" "$(have typing-inspection)" "$(have annotated-types)" "$(have opentelemetry-api)" \
    "$(pin accelerate)" "$(have psutil)" "$(have msgpack)" hjson py-cpuinfo ninja einops  # the last: deepspeed's
  # deepspeed is an sdist only on PyPI (its binary-only download is a 2020 0.3.1 dev wheel): build a pure-Python
  # wheel with no compiled ops (DS_BUILD_OPS=0; ZeRO-3 with torch's AdamW needs none) against the venv's torch.
  # A failed build is recorded, not fatal: the zero3 part then fails with ModuleNotFoundError on the GPU.
  if ! DS_BUILD_OPS=0 .venv/bin/python -m pip wheel -q --no-deps --no-build-isolation -w .whl \
      "deepspeed==$DEEPSPEED_VERSION" > .whl/deepspeed-build.log 2>&1; then
    echo "deepspeed $DEEPSPEED_VERSION wheel build failed (see .whl/deepspeed-build.log); zero3 will fail" >&2
  fi
  data="${PREFIXTUNE_DATA:-../shared/data}"
  rm -rf .gpu_data/e2e && cp -r "$data/e2e" .gpu_data/e2e  # 2.5 MB; ignored by git, carried to the machine
  du -sh .whl .gpu_data
  exit 0
fi

if [[ "${1:-}" == "--cpu" ]]; then
  . .venv/bin/activate
  exec python bench/gpu_check.py --device cpu --quick --out "${OUT:-/tmp/gpu-check}"
fi

export PYTHONUNBUFFERED=1
if [[ -d .whl ]]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD/src"
else
  export PYTHONPATH="$PWD/src"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
python3 -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), 'transformers', transformers.__version__)"
OUT="${OUT:-/tmp/gpu-check}"
timeout 570 python3 bench/gpu_check.py --device cuda --data .gpu_data --out "$OUT" --keep
