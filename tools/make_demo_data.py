"""Generate the procedural demo data root, or with --photos a raw COCO Karpathy release of real photographs (see `beit3.cli.make_demo_data_main`)."""
import sys

from beit3.cli.commands import make_demo_data_main

if __name__ == "__main__":
    sys.exit(make_demo_data_main())
