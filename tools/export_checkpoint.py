"""Export the latest checkpoint of a pretraining run as safetensors (config.json + model.safetensors) and as an (see `beit3.cli.export_checkpoint_main`)."""
import sys

from beit3.cli import export_checkpoint_main

if __name__ == "__main__":
    sys.exit(export_checkpoint_main())
