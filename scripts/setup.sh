#!/usr/bin/env bash
# One-time (idempotent) set-up on a fresh Linux or macOS machine: system packages where
# apt-get exists, a virtual environment in .venv with the worker and test extras, and a
# redis-server answering on 127.0.0.1:6379 (started here when none answers).
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
command -v redis-server >/dev/null || need_apt+=(redis-server)
command -v sox >/dev/null || need_apt+=(sox libsox-fmt-all)
command -v espeak-ng >/dev/null || need_apt+=(espeak-ng)
command -v ffmpeg >/dev/null || need_apt+=(ffmpeg)
if [ ${#need_apt[@]} -gt 0 ]; then
  if command -v apt-get >/dev/null; then
    echo "setup: installing ${need_apt[*]}"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need_apt[@]}" >/dev/null
  elif command -v brew >/dev/null; then
    brew install redis sox espeak-ng ffmpeg
  else
    echo "setup: please install: ${need_apt[*]}" >&2
  fi
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
# pip's own exit status decides (pipefail); only this machine's noise about absent local
# package mirrors is filtered out of its output
python -m pip install -q --upgrade pip 2>&1 | { grep -v "^WARNING: Location" || true; }
python -m pip install -q -e ".[worker,test]" 2>&1 | { grep -v "^WARNING: Location" || true; }
python -c "import mlx.core, mlx_lm, rq, torch, transformers, moto" \
  || { echo "setup: the virtual environment is incomplete" >&2; exit 1; }

if ! python - <<'PY'
import redis, sys
try:
    redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=1).ping()
except redis.exceptions.ConnectionError:
    sys.exit(1)
PY
then
  echo "setup: starting redis-server on 127.0.0.1:6379"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --dir /tmp --logfile /tmp/audioq-redis.log
  for _ in $(seq 50); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.1; done
fi
