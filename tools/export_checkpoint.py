"""Export a pretraining run as safetensors and as an official-layout beit3_pretrained.pth (see `beit3.cli.export_checkpoint_main`)."""
import sys

from beit3.cli.commands import export_checkpoint_main

if __name__ == "__main__":
    sys.exit(export_checkpoint_main())
