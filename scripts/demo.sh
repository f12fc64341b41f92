#!/usr/bin/env bash
# Set everything up (scripts/setup.sh), then run the whole flow on embedded defaults
# (scripts/demo.py): own redis-server, moto S3, tiny checkpoint unless --model is given.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python scripts/demo.py "$@"
