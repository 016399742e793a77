"""Export the latest checkpoint of a pretraining run as safetensors (config.json + model.safetensors) and as an
official-layout beit3_pretrained.pth.

    python tools/export_checkpoint.py --run runs/demo/pretrain --out runs/demo/pretrained
"""
import argparse
import sys

from beit3.config import ConfigError
from beit3.models import CheckpointError
from beit3.run_pretraining import export_pretrained


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="output_dir of a pretraining run")
    parser.add_argument("--out", required=True, help="directory to write the exported model into")
    args = parser.parse_args()
    try:
        out = export_pretrained(args.run, args.out)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"exported to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
