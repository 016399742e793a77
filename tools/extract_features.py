"""Embed images and texts of a checkpoint into a safetensors file (see `beit3.cli.use.extract_features_main`)."""
import sys

from beit3.cli.use import extract_features_main

if __name__ == "__main__":
    sys.exit(extract_features_main())
