"""Plot loss curves of log.jsonl files (pretraining, tokenizer or fine-tuning runs) into one PNG.

    python tools/plot_logs.py runs/demo/pretrain/log.jsonl --out runs/demo/pretrain_loss.png
    python tools/plot_logs.py A/log.jsonl B/log.jsonl --keys loss --out losses.png
    python tools/plot_logs.py runs/demo/pretrain/log.jsonl --eval --out grounding.png   # held-out grounding gaps
"""
import argparse

from beit3.demo.plots import gap_keys, plot_logs, read_log
from beit3.cli.commands import out_file


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("logs", nargs="+", help="log.jsonl files (one panel each)")
    parser.add_argument("--out", required=True, type=out_file, help="PNG to write")
    parser.add_argument("--keys", nargs="*", default=None, help="fields to plot (default: every loss* field)")
    parser.add_argument("--labels", nargs="*", default=None, help="panel titles (default: the run folder names)")
    parser.add_argument("--eval", action="store_true", help="plot the held-out evaluation's gaps (eval_*gap fields)")
    parser.add_argument("--title", default="")
    parser.add_argument("--log-y", action="store_true", help="logarithmic y axis")
    args = parser.parse_args()
    keys = args.keys
    if args.eval:
        keys = sorted({k for log in args.logs for k in gap_keys(read_log(log))}) + list(keys or [])
    print(plot_logs(args.logs, args.out, keys=keys, labels=args.labels, title=args.title, log_y=args.log_y))


if __name__ == "__main__":
    main()
