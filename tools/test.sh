#!/usr/bin/env bash
# The project's test command: creates .venv if absent, installs the package with its [dev] extras, runs pytest.
# Extra arguments go to pytest (e.g. `bash tools/test.sh -k backbone -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[dev]'
exec .venv/bin/python -m pytest "$@"
