"""Evaluate a task checkpoint (fine-tuning run dir, save_pretrained dir, or a .pth loaded into the configured model
for zero-shot evaluation) and write a metrics JSON, plus the VQAv2 submission / COCO caption results file.

    python tools/evaluate.py --task vqav2 --checkpoint runs/demo/vqav2 --set data.root=DIR --split test --out m.json
"""
import sys

from beit3.cli.finetune import evaluate_main

if __name__ == "__main__":
    sys.exit(evaluate_main())
