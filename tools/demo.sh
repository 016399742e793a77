#!/usr/bin/env bash
# The whole pipeline on procedural demo data, in one command (19 min on a 2-core CPU, 42 on a slow day: README):
# demo data + text tokenizer -> visual tokenizer (VQ-KD) -> tiny BEiT-3 pretraining (DeepSpeed: 2 CPU ranks, or all
# GPUs) -> export -> fine-tuning of retrieval, VQA and captioning from the pretrained model and from scratch -> results
# table (runs/demo/results.md, results.json) and plots (runs/demo/*.png).
#
#   bash tools/demo.sh [OUT]            # OUT defaults to runs/demo; an existing OUT is reused stage by stage
#
# Environment: BEIT3_VENV / BEIT3_SKIP_INSTALL (see tools/_venv.sh); stage sizes DEMO_IMAGES, TOKENIZER_STEPS,
# PRETRAIN_STEPS, RETRIEVAL_STEPS, VQA_STEPS and CAPTION_STEPS; DEMO_SEEDS=N fine-tunes every task and init with
# seeds 0..N-1 (the table shows mean ± std); DEMO_FRESH=1 deletes OUT first.
set -euo pipefail
cd "$(dirname "$0")/.."
source tools/_venv.sh
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

OUT="${1:-runs/demo}"
DEMO_IMAGES="${DEMO_IMAGES:-600}"
TOKENIZER_STEPS="${TOKENIZER_STEPS:-300}"
PRETRAIN_STEPS="${PRETRAIN_STEPS:-1000}"
RETRIEVAL_STEPS="${RETRIEVAL_STEPS:-600}"
VQA_STEPS="${VQA_STEPS:-400}"
CAPTION_STEPS="${CAPTION_STEPS:-400}"
DEMO_SEEDS="${DEMO_SEEDS:-1}"
[ "${DEMO_FRESH:-0}" = "1" ] && rm -rf "$OUT"
mkdir -p "$OUT/ft"
DATA="$OUT/data"
START=$(date +%s)
TIMINGS="$OUT/timings.json"
[ -f "$TIMINGS" ] || echo "{}" > "$TIMINGS"

NGPU=$("$PY" -c "import torch; print(torch.cuda.device_count())")
if [ "$NGPU" -gt 0 ]; then
    RANKS="$NGPU"; export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
else
    RANKS=2; export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"   # 2 CPU ranks x 1 thread; single runs use 2 threads
fi

stage() {  # stage NAME COMMAND...: run, print elapsed time, record it
    local name="$1"; shift
    local t0; t0=$(date +%s)
    echo "[demo $(( t0 - START ))s] >>> $name"
    "$@"
    local t1; t1=$(date +%s)
    echo "[demo $(( t1 - START ))s] <<< $name done in $(( t1 - t0 ))s (load: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a))"
    "$PY" - "$TIMINGS" "$name" "$(( t1 - t0 ))" <<'PYEOF'
import json, sys
path, name, secs = sys.argv[1], sys.argv[2], float(sys.argv[3])
data = json.load(open(path)); data[name] = secs; json.dump(data, open(path, "w"))
PYEOF
}

echo "[demo] output $OUT, python $PY, $( [ "$NGPU" -gt 0 ] && echo "$NGPU GPU(s)" || echo "CPU ($(getconf _NPROCESSORS_ONLN) cores)" ), load $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null || echo n/a)"

if [ ! -f "$DATA/manifest.json" ]; then
    # make_demo_data writes the corpus and trains beit3.spm itself; the explicit call below trains the same text
    # tokenizer (vocab 1000) with the command a user runs on their own corpus, and replaces it. words.txt (the
    # corpus's words, one per line) keeps SentencePiece from spelling the templated corpus's words out.
    stage "demo data ($DEMO_IMAGES images, 64 px)" "$PY" tools/make_demo_data.py --out "$DATA" --num-images "$DEMO_IMAGES"
    stage "text tokenizer (SentencePiece on corpus.txt)" bash -c \
        "'$PY' tools/train_text_tokenizer.py --input '$DATA/corpus.txt' '$DATA/words.txt' --out '$DATA/spm' --vocab-size 1000 \
         && mv '$DATA/spm.model' '$DATA/beit3.spm' && rm -f '$DATA/spm.vocab'"
fi

if [ ! -f "$OUT/tokenizer/tokenizer_eval.json" ]; then
    stage "visual tokenizer (VQ-KD, $TOKENIZER_STEPS steps)" env OMP_NUM_THREADS=2 "$PY" tools/train_tokenizer.py \
        --config configs/tokenizer/demo.yaml --set data.root="$DATA" --set output_dir="$OUT/tokenizer" \
        --set train.steps="$TOKENIZER_STEPS" --set train.save_every="$TOKENIZER_STEPS"
fi

if [ ! -f "$OUT/pretrained/beit3_pretrained.pth" ]; then
    stage "pretraining ($PRETRAIN_STEPS steps, DeepSpeed, $RANKS ranks)" deepspeed --num_gpus "$RANKS" \
        tools/pretrain.py --config configs/pretrain/demo.yaml --set data.root="$DATA" \
        --set tokenizer.path="$OUT/tokenizer" --set output_dir="$OUT/pretrain" --set train.steps="$PRETRAIN_STEPS" \
        --set train.save_every="$PRETRAIN_STEPS"
    stage "export" "$PY" tools/export_checkpoint.py --run "$OUT/pretrain" --out "$OUT/pretrained"
fi

finetune() {  # finetune TASK CONFIG STEPS INIT SEED
    local task="$1" config="$2" steps="$3" init="$4" seed="$5" run="$OUT/ft/$1_$4_seed$5"
    [ -f "$run/metrics.json" ] && return 0
    local from=""
    [ "$init" = "pretrained" ] && from="$OUT/pretrained/beit3_pretrained.pth"
    stage "fine-tune $task from $init, seed $seed ($steps steps)" env OMP_NUM_THREADS=2 "$PY" tools/finetune.py \
        --config "$config" --set data.root="$DATA" --set output_dir="$run" --set model.init_from="$from" \
        --set train.steps="$steps" --set train.save_every="$steps" --set eval.every_steps="$steps" \
        --set train.seed="$seed"
}
for seed in $(seq 0 $(( DEMO_SEEDS - 1 ))); do
    for init in pretrained scratch; do
        finetune retrieval configs/finetune/demo_retrieval.yaml "$RETRIEVAL_STEPS" "$init" "$seed"
        finetune vqav2 configs/finetune/demo_vqav2.yaml "$VQA_STEPS" "$init" "$seed"
        finetune captioning configs/finetune/demo_captioning.yaml "$CAPTION_STEPS" "$init" "$seed"
    done
done

stage "report" "$PY" tools/demo_report.py --run "$OUT" --timings "$TIMINGS"
echo "[demo] total $(( $(date +%s) - START ))s; results in $OUT/results.md, plots in $OUT/*.png"
