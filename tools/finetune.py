"""BEiT-3 fine-tuning on a downstream task, with evaluation during training and best-checkpoint tracking.

    deepspeed tools/finetune.py --task vqav2 --config configs/finetune/vqav2.yaml --set data.root=DIR model.init_from=CKPT
    python tools/finetune.py --task coco_retrieval --config configs/finetune/demo_retrieval.yaml --set data.root=DIR
"""
from beit3.engine.dist import exit_process
from beit3.cli.finetune import main

if __name__ == "__main__":
    exit_process(main())
