"""Benchmark BEiT-3 training steps: throughput, MFU, peak memory, with same-run torchscale / timm baselines.

    python tools/benchmark.py --suite quick --out results.json            # tiny model, seconds (CI smoke test)
    python tools/benchmark.py --suite full --precision bf16 --out r.json  # BEiT-3 base, 8 pairs, 224 px, 64 tokens
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from beit3.bench.common import ALL_CASES, SUITES, BenchConfig, write_json  # noqa: E402
from beit3.bench.run import format_table, run  # noqa: E402
from beit3.cli.commands import out_file


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--suite", choices=sorted(SUITES), default=None, help="preset; explicit options override it")
    p.add_argument("--model", default=None)
    p.add_argument("--batch", type=int, default=None)
    p.add_argument("--text-len", type=int, default=None)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--steps", type=int, default=None, help="training steps per timed repeat")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--checkpointing", choices=("none", "all", "every_k"), default="none")
    p.add_argument("--checkpoint-every", type=int, default=2, help="k for --checkpointing every_k")
    p.add_argument("--zero-stage", type=int, choices=(0, 1, 2, 3), default=1, help="ZeRO stage of pretrain_deepspeed")
    p.add_argument("--deepspeed-config", default="", help="DeepSpeed JSON for pretrain_deepspeed (default: built-in)")
    p.add_argument("--no-baselines", action="store_true", help="skip the torchscale / timm baselines")
    p.add_argument("--tokenizer", default=None, help="VQ-KD config name for the online tokenizer")
    p.add_argument("--data-root", default=None, help="data root for the loading benchmark (default: generated demo)")
    p.add_argument("--cases", default=",".join(ALL_CASES), help=f"comma list of {','.join(ALL_CASES)}")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--out", default=None, type=out_file, help="JSON file for the results")
    args = p.parse_args(argv)

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    preset = dict(SUITES[args.suite or "full"])
    bench = BenchConfig(
        model=args.model or preset["model"], batch=args.batch or preset["batch"],
        text_len=args.text_len or preset["text_len"], precision=args.precision, device=args.device,
        steps=args.steps or preset["steps"], repeats=args.repeats or preset["repeats"],
        warmup=preset["warmup"] if args.warmup is None else args.warmup, compile=args.compile,
        checkpointing=args.checkpointing, checkpoint_every=args.checkpoint_every,
        baselines=preset["baselines"] and not args.no_baselines, tokenizer=args.tokenizer or preset["tokenizer"],
        loading_images=preset["loading_images"], data_root=args.data_root,
        cases=tuple(c for c in args.cases.split(",") if c), zero_stage=args.zero_stage,
        deepspeed_config=args.deepspeed_config,
    )
    unknown = set(bench.cases) - set(ALL_CASES)
    if unknown:
        p.error(f"unknown case(s) {sorted(unknown)}")
    results = run(bench)
    print()
    print(format_table(results))
    if args.out:
        write_json(results, args.out)
    return results


if __name__ == "__main__":
    main()
