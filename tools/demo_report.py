"""Results table and plots of a tools/demo.sh run (see beit3.demo.summarize): writes RUN/results.{md,json} and PNGs.

    python tools/demo_report.py --run runs/demo [--timings runs/demo/timings.json]
"""
import argparse
import json
from pathlib import Path

from beit3.demo.report import summarize


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/demo", help="the demo run folder")
    parser.add_argument("--data", default=None, help="demo data root (default: RUN/data)")
    parser.add_argument("--which", choices=("final", "best"), default="final", help="which evaluation of each run")
    parser.add_argument("--timings", default=None, help="JSON {stage: seconds} to include")
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args()
    timings = json.loads(Path(args.timings).read_text()) if args.timings and Path(args.timings).is_file() else None
    result = summarize(args.run, args.data, which=args.which, plots=not args.no_plots, timings=timings)
    print((Path(args.run) / "results.md").read_text())
    for name, err in result["plot_errors"].items():
        print(f"warning: plot {name} failed: {err}")


if __name__ == "__main__":
    main()
