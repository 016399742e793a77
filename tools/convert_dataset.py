"""Convert a public raw dataset release into a BEiT-3 data root (official JSONL index layouts) (see `beit3.cli.convert_dataset_main`)."""
import sys

from beit3.cli.commands import convert_dataset_main

if __name__ == "__main__":
    sys.exit(convert_dataset_main())
