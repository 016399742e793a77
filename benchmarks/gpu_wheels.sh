#!/usr/bin/env bash
# Wheels that the GPU machine lacks (its image has PyTorch, timm, transformers, sentencepiece, einops, safetensors,
# but not deepspeed or webdataset), built or downloaded here into DIR (default .whl) at the versions this machine's
# environment holds, for Python 3.12 on x86-64. Then on that machine:
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
# (benchmarks/gpu_check.sh --wheels DIR does that itself).
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="${1:-.whl}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$DIR"
version() { "$PY" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$1"; }
# deepspeed ships as a source archive only: build its pure-Python wheel (no ops compiled; the check uses a client
# optimizer, as every tool here does)
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "deepspeed==$(version deepspeed)"
binary=()
for name in pydantic pydantic-core annotated-types typing-inspection typing-extensions hjson webdataset braceexpand; do
    binary+=("$name==$(version "$name")")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d "$DIR" "${binary[@]}"
ls "$DIR"
