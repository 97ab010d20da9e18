#!/usr/bin/env bash
# The main job on a fresh machine: set up, train an E2E prefix on SmolLM2-135M-Instruct from a few hundred
# training pairs, evaluate it on the official E2E test set, print the official scores.
# Options can be overridden through the environment, e.g. TRAIN_SIZE=500 EPOCHS=5 LIMIT=100 bash scripts/main.sh
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)
bash scripts/setup.sh
. .venv/bin/activate
RUN=${RUN:-runs/e2e-${TRAIN_SIZE:-300}}
python -m prefixtune train --task e2e --model smollm2-135m --train-size "${TRAIN_SIZE:-300}" --seed "${SEED:-0}" \
  --output "$RUN" --prefix-length 10 --lr 5e-4 --epochs "${EPOCHS:-3}" --batch-size 10
limit=()
[ -n "${LIMIT:-}" ] && limit=(--limit "$LIMIT")
python -m prefixtune evaluate --model smollm2-135m --prefix "$RUN" --task e2e --split test "${limit[@]}" \
  --output "$RUN/eval" --num-beams "${BEAMS:-5}" --batch-size 32 --bf16 auto
echo "total wall time: $(( $(date +%s) - start )) s (set-up, training and evaluation)"
