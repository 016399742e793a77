"""Train a VQ-KD visual tokenizer (BEiT v2) on the shared DeepSpeed engine.

    python tools/train_tokenizer.py --config configs/tokenizer/demo.yaml --set data.root=DIR --set output_dir=OUT
    deepspeed --num_gpus 2 tools/train_tokenizer.py --config configs/tokenizer/demo.yaml ...
Writes OUT/log.jsonl, OUT/tokenizer/ (load with tokenizer.load_tokenizer(OUT)), OUT/tokenizer_eval.json and
OUT/codebook_usage.png.
"""
from beit3.engine.dist import exit_process
from beit3.cli.train_tokenizer import main

if __name__ == "__main__":
    exit_process(main())
