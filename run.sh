#!/usr/bin/env bash
# One entry point that also does the set-up: creates .venv on first use and installs the pinned
# requirements (again only when requirements.txt changes).
#   bash run.sh                  the main job end to end: demo log (if DATA/train_user/ is empty), train, export
#                                to disk and to Redis (a bundled server is started when none listens on :6379)
#   bash run.sh --epochs 10 ...  the same with train.py flags
#   bash run.sh test             the test suite (what CI runs); pytest flags may follow
#   bash run.sh bench            the benchmark table
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
    echo "run.sh: needs Python 3.10+ ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
    exit 1
fi
if [ ! -x .venv/bin/python ]; then
    echo "run.sh: creating .venv"
    "$PYTHON" -m venv .venv
fi
want=$(sha1sum requirements.txt | cut -d' ' -f1)
if [ "$(cat .venv/.requirements.sha1 2>/dev/null)" != "$want" ]; then
    echo "run.sh: installing requirements.txt into .venv (CPU torch; a few minutes the first time)"
    .venv/bin/python -m pip install -q --disable-pip-version-check -r requirements.txt
    echo "$want" > .venv/.requirements.sha1
fi

case "${1:-}" in
    test) shift; exec .venv/bin/python -m pytest "$@" ;;
    bench) shift; exec .venv/bin/python bench.py "$@" ;;
    *) exec .venv/bin/python train.py "$@" ;;
esac
