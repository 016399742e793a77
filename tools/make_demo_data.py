"""Generate the procedural demo data root (images, BEiT-3 index files, corpus, beit3.spm, WebDataset shards) (see `beit3.cli.make_demo_data_main`)."""
import sys

from beit3.cli import make_demo_data_main

if __name__ == "__main__":
    sys.exit(make_demo_data_main())
