"""Held-out evaluation and grounding probe of a pretrained checkpoint (see `beit3.cli.probe_pretrained_main`)."""
import sys

from beit3.cli.commands import probe_pretrained_main

if __name__ == "__main__":
    sys.exit(probe_pretrained_main())
