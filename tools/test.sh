#!/usr/bin/env bash
# The project's test command: creates .venv if absent, installs the package with its [dev] extras, runs pytest.
# Extra arguments go to pytest (e.g. `bash tools/test.sh -k backbone -x`).
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/_venv.sh
exec "$PY" -m pytest "$@"
