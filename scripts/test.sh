#!/usr/bin/env bash
# Set everything up (scripts/setup.sh) and run the whole test-suite; extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python -m pytest "$@"
