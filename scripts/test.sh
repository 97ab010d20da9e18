#!/usr/bin/env bash
# Set up (idempotent) and run the whole test suite, slow tests on the real model included.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
python -m pytest -q -p no:cacheprovider "$@"
