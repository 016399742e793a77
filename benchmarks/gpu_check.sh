#!/usr/bin/env bash
# The GPU check, one script, for a bare H100/H200 machine that has PyTorch but not deepspeed or webdataset (carried
# as wheels made here by benchmarks/gpu_wheels.sh). Writes its results as JSON into one folder, at most 8 files.
#
#   bash benchmarks/gpu_check.sh --out DIR [--wheels .whl]     on the GPU machine (about 8 minutes)
#   bash benchmarks/gpu_check.sh --dry-run --out DIR           the same steps on the CPU with tiny models (CI runs it)
#
# Steps, each under its own time limit; one that fails is recorded and the next one runs:
#   environment    GPU, driver, torch / CUDA / package versions                     DIR/environment.json
#   gpu_tests      pytest tests/test_gpu.py: bf16 + SDPA vs fp32, DeepSpeed ZeRO-2 and ZeRO-3 pretraining steps on
#                  one device, torch.compile without graph breaks                   DIR/gpu_tests.xml
#   mfu_base       tools/benchmark.py, BEiT-3 base in bf16, compiled: backbone pair step, pretraining step
#                  (precomputed codes), the whole DeepSpeed step; MFU and peak memory DIR/mfu_base_bf16.json
#   giant_zero3    BEiT-3 giant, DeepSpeed ZeRO-3 + activation checkpointing on one GPU, peak memory
#                                                                                   DIR/giant_zero3.json
#   demo_*         demo data, visual tokenizer, the demo pretraining on one device (600 steps): step time and the
#                  held-out grounding evaluation                                    DIR/pretrain_demo.json
# and DIR/summary.json (each step's exit status and seconds), DIR/gpu_check.log (all output).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="" DRY=0 WHEELS=""
while [ $# -gt 0 ]; do
    case "$1" in
        --out) OUT="$2"; shift 2 ;;
        --wheels) WHEELS="$2"; shift 2 ;;
        --dry-run) DRY=1; shift ;;
        -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
done
if [ -z "$OUT" ]; then echo "gpu_check.sh: --out DIR is required" >&2; exit 2; fi
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
PY="${PYTHON:-python3}"
if [ -n "$WHEELS" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/beit3_site \
        "$WHEELS"/*.whl || { echo "gpu_check.sh: installing the wheels of '$WHEELS' failed" >&2; exit 1; }
    export PYTHONPATH="/tmp/beit3_site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
exec > >(tee "$OUT/gpu_check.log") 2>&1

if [ "$DRY" = 1 ]; then
    export BEIT3_GPU_DRY_RUN=1 CUDA_VISIBLE_DEVICES=""
    # no --compile here: inductor's C++ build takes minutes on a small CPU (tracing is checked by gpu_tests)
    DEVICE=cpu BENCH=(--suite quick --model beit3_tiny_patch8_32 --steps 1 --repeats 1 --warmup 0) COMPILE=()
    GIANT=(--suite quick --model beit3_tiny_patch8_32 --steps 1 --repeats 1 --warmup 0)
    IMAGES=60 TOK_STEPS=4 TOK_SETS=(--set data.image_batch=16) PRE_STEPS=4
    PRE_SETS=(--set model.overrides.depth=2 --set data.image_batch=4
        --set data.text_batch=4 --set data.pair_batch=4 --set eval.every_steps=2 --set eval.max_samples=16)
    LIMIT_TESTS=600 LIMIT_BENCH=300 LIMIT_DEMO=300
else
    DEVICE=cuda BENCH=(--suite full --batch 64 --steps 10 --repeats 3 --warmup 3) COMPILE=(--compile)
    GIANT=(--suite full --model beit3_giant_patch14_224 --batch 8 --steps 2 --repeats 2 --warmup 1)
    IMAGES=600 TOK_STEPS=300 TOK_SETS=() PRE_STEPS=600 PRE_SETS=()
    LIMIT_TESTS=150 LIMIT_BENCH=150 LIMIT_DEMO=150
fi

SUMMARY="$WORK/summary.jsonl"
step() {  # step NAME LIMIT_S COMMAND...: run under a time limit, record exit status and seconds
    local name="$1" limit="$2"; shift 2
    echo ">>> $name (limit ${limit}s)"
    local start=$SECONDS
    timeout --kill-after=10 "$limit" "$@"
    local rc=$?
    echo "<<< $name: exit $rc after $((SECONDS - start))s"
    echo "{\"step\": \"$name\", \"exit\": $rc, \"seconds\": $((SECONDS - start)), \"limit_s\": $limit}" >> "$SUMMARY"
}

step environment 60 "$PY" -c '
import json, platform, subprocess, sys, importlib.metadata as m
import torch
env = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
       "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu (dry run)",
       "packages": {}}
for name in ("deepspeed", "timm", "transformers", "webdataset", "sentencepiece", "triton"):
    try:
        env["packages"][name] = m.version(name)
    except m.PackageNotFoundError:
        env["packages"][name] = None
try:
    env["nvidia_smi"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm",
                                        "--format=csv,noheader"], capture_output=True, text=True).stdout.strip()
except OSError:
    env["nvidia_smi"] = None
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(json.dumps(env))
' "$OUT/environment.json"

step gpu_tests "$LIMIT_TESTS" "$PY" -m pytest -q -p no:cacheprovider tests/test_gpu.py \
    --junitxml "$OUT/gpu_tests.xml"

step mfu_base "$LIMIT_BENCH" "$PY" tools/benchmark.py --device "$DEVICE" --precision bf16 "${COMPILE[@]}" \
    --no-baselines "${BENCH[@]}" --cases backbone_pair,pretrain_precomputed,pretrain_deepspeed --out "$OUT/mfu_base_bf16.json"

step giant_zero3 "$LIMIT_BENCH" "$PY" tools/benchmark.py --device "$DEVICE" --precision bf16 --no-baselines \
    "${GIANT[@]}" --cases pretrain_deepspeed --zero-stage 3 --deepspeed-config configs/deepspeed/zero3.json \
    --checkpointing all --out "$OUT/giant_zero3.json"

step demo_data 180 "$PY" tools/make_demo_data.py --out "$WORK/data" --num-images "$IMAGES"
step demo_tokenizer "$LIMIT_DEMO" "$PY" tools/train_tokenizer.py --config configs/tokenizer/demo.yaml \
    --set data.root="$WORK/data" --set output_dir="$WORK/tokenizer" --set train.steps="$TOK_STEPS" \
    --set train.save_every="$TOK_STEPS" "${TOK_SETS[@]}"
step demo_pretrain "$LIMIT_DEMO" "$PY" tools/pretrain.py --config configs/pretrain/demo.yaml \
    --set data.root="$WORK/data" --set tokenizer.path="$WORK/tokenizer" --set output_dir="$WORK/pretrain" \
    --set train.steps="$PRE_STEPS" --set train.save_every="$PRE_STEPS" "${PRE_SETS[@]}"
step demo_report 30 "$PY" - "$WORK/pretrain/log.jsonl" "$OUT/pretrain_demo.json" <<'PYEOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])]
train = [r for r in rows if "loss" in r and not any(k.startswith("eval_") for k in r)]
evals = [r for r in rows if any(k.startswith("eval_") for k in r)]
report = {"steps": train[-1].get("step"), "last_train_row": train[-1], "eval_rows": evals}
json.dump(report, open(sys.argv[2], "w"), indent=2)
print(json.dumps({"steps": report["steps"], "eval_rows": len(evals)}))
PYEOF

"$PY" - "$SUMMARY" "$OUT/summary.json" "$DRY" <<'PYEOF'
import json, sys
steps = [json.loads(line) for line in open(sys.argv[1])]
json.dump({"dry_run": sys.argv[3] == "1", "steps": steps, "passed": all(s["exit"] == 0 for s in steps)},
          open(sys.argv[2], "w"), indent=2)
print(json.dumps(steps))
PYEOF
grep -q '"exit": [^0]' "$SUMMARY" && exit 1 || exit 0
