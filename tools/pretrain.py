"""BEiT-3 masked data modeling pretraining.

    deepspeed [--hostfile HOSTFILE] tools/pretrain.py --config configs/pretrain/base.yaml [--set key=value ...]
    python tools/pretrain.py --config configs/pretrain/demo.yaml --set data.root=DIR --set tokenizer.path=TOK
"""
from beit3.engine.dist import exit_process
from beit3.cli.pretrain import main

if __name__ == "__main__":
    exit_process(main())
