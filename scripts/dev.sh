#!/usr/bin/env bash
# One entry point for a fresh machine (Python ≥3.11 and PyPI are all it needs).
#   scripts/dev.sh serve  set up .venv, fetch the default model, serve it (gRPC :50051, OpenAI HTTP API
#                         :8000; CPU-sized)
#   scripts/dev.sh demo   set up .venv, fetch the default model, answer a chat prompt
#   scripts/dev.sh test   set up .venv with dev extras, fetch the model, run the whole test suite
# Both create or refresh .venv/ at the repo root; a second run skips what is already done.
set -euo pipefail
cd "$(dirname "$0")/.."

pick_python() {
  for candidate in "${PYTHON:-}" python3.11 python3.12 python3.13 python3; do
    [ -n "$candidate" ] || continue
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null; then
      echo "$candidate"; return
    fi
  done
  echo "scripts/dev.sh: need Python ≥ 3.11 (set PYTHON=...)" >&2; exit 1
}

ensure_venv() {  # $1: the extras to install, e.g. "" or "dev"
  local extras="$1" spec="." stamp
  [ -n "$extras" ] && spec=".[$extras]"
  if [ ! -x .venv/bin/python ]; then
    "$(pick_python)" -m venv .venv
  fi
  # Reinstall only when pyproject.toml or the extras change.
  stamp=".venv/.qwenjax-installed-$( (cat pyproject.toml; echo "$extras") | sha256sum | cut -c1-16)"
  if [ ! -e "$stamp" ]; then
    echo "scripts/dev.sh: installing qwenjax$([ -n "$extras" ] && echo "[$extras]") into .venv" >&2
    .venv/bin/python -m pip install --quiet --upgrade pip >&2
    .venv/bin/python -m pip install --quiet -e "$spec" >&2
    rm -f .venv/.qwenjax-installed-*
    touch "$stamp"
  fi
}

case "${1:-}" in
  serve)
    shift
    ensure_venv ""
    .venv/bin/qwenjax fetch-model >&2
    # Sized for a CPU: few decode rows and prefill tokens keep the start-up compile short.
    exec .venv/bin/qwenjax serve --max-num-seqs 8 --max-num-batched-tokens 256 --prefill-chunk 128 \
      --max-model-len 4096 "$@"
    ;;
  demo)
    ensure_venv ""
    .venv/bin/qwenjax fetch-model >&2
    exec .venv/bin/qwenjax generate --chat --max-tokens 64 "What is the capital of France?"
    ;;
  test)
    shift
    ensure_venv "dev"
    .venv/bin/qwenjax fetch-model --quiet >&2
    set +e
    .venv/bin/python -m pytest -q "$@"
    status=$?
    set -e
    if [ "$status" -eq 5 ]; then
      echo "scripts/dev.sh: pytest collected no tests; that is a failure" >&2
      exit 1
    fi
    exit "$status"
    ;;
  *)
    echo "usage: scripts/dev.sh serve [qwenjax serve args] | demo | test [pytest args]" >&2
    exit 2
    ;;
esac
