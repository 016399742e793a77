"""Precompute VQ-KD codes of a data set (resize + center crop) for pretraining (``data.codes_dir``) (see `beit3.cli.tokenize_dataset_main`)."""
import sys

from beit3.cli.commands import tokenize_dataset_main

if __name__ == "__main__":
    sys.exit(tokenize_dataset_main())
