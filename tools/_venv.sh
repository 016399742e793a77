# Sourced by tools/test.sh and tools/demo.sh (from the repository root): sets PY to a Python with this package and its
# [dev] extras installed. Default: create .venv if absent and `pip install -e '.[dev]'` into it.
# BEIT3_VENV=DIR uses another virtual environment; BEIT3_SKIP_INSTALL=1 skips the pip step (offline machines).
VENV="${BEIT3_VENV:-.venv}"
if [ ! -x "$VENV/bin/python" ]; then
    python3 -m venv "$VENV"
fi
if [ "${BEIT3_SKIP_INSTALL:-0}" != "1" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    "$VENV/bin/python" -m pip install -q -e '.[dev]'
fi
PY="$VENV/bin/python"
export PATH="$(cd "$VENV/bin" && pwd):$PATH"
