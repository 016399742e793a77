"""Tiny training script for the multi-rank engine tests: ``deepspeed --num_gpus 2 engine_ds_script.py --config X``."""
import argparse

from _engine_toy import CrashAfter, StateDump, ToyBatches, ToyRunConfig, make_model

from beit3.config import load_config, to_dict
from beit3.engine import add_common_args, get_rank, init_distributed, train
from beit3.engine.dist import exit_process


def main():
    parser = add_common_args(argparse.ArgumentParser())
    parser.add_argument("--output", required=True)
    args = parser.parse_args()
    cfg = load_config(ToyRunConfig, args.config, args.overrides)
    init_distributed()
    model = make_model(0)
    batches = ToyBatches(seed=cfg.train.seed, rank=get_rank(), batch_size=cfg.batch_size, poison=cfg.poison)
    out = train(model, batches, cfg.train, cfg.optim, args.output, config_snapshot=to_dict(cfg),
                callbacks=[CrashAfter(cfg.crash_after_step), StateDump(cfg.dump_states)])
    if get_rank() == 0:
        print(f"DONE step={out['step']}")


if __name__ == "__main__":
    main()
    exit_process(0)
