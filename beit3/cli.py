"""Command-line entry points of the data and checkpoint tools (``tools/*.py`` and the ``beit3-*`` console scripts).

Each ``*_main(argv)`` parses arguments and calls one library function; errors a user can fix exit with code 2 and a
one-line message.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

Argv = Optional[Sequence[str]]


def _fail(err: Exception) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


def make_demo_data_main(argv: Argv = None) -> int:
    """Generate the procedural demo data root (images, BEiT-3 index files, corpus, beit3.spm, WebDataset shards)."""
    from beit3.data.demo import make_demo_data

    parser = argparse.ArgumentParser(description=make_demo_data_main.__doc__)
    parser.add_argument("--out", required=True, help="output data root")
    parser.add_argument("--num-images", type=int, default=400)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-shards", type=int, default=4)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    manifest = make_demo_data(args.out, args.num_images, args.image_size, args.seed, num_shards=args.num_shards)
    print(json.dumps(manifest["index_lines"], indent=1))
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


def convert_dataset_main(argv: Argv = None) -> int:
    """Convert a public raw dataset release into a BEiT-3 data root (official JSONL index layouts)."""
    from beit3.data.convert import CONVERTERS, convert_dataset

    parser = argparse.ArgumentParser(description=convert_dataset_main.__doc__)
    parser.add_argument("dataset", choices=sorted(CONVERTERS))
    parser.add_argument("--src", required=True, help="folder holding the raw release")
    parser.add_argument("--out", required=True, help="output data root")
    parser.add_argument("--tokenizer", help="SentencePiece model (beit3.spm); needed for all but imagenet")
    parser.add_argument("--min-answer-count", type=int, default=9, help="vqav2: answer vocabulary threshold")
    parser.add_argument("--rest-val-images", type=int, default=1000, help="vqav2: val images kept for validation")
    args = parser.parse_args(argv)
    options = {"min_answer_count": args.min_answer_count, "rest_val_images": args.rest_val_images} \
        if args.dataset == "vqav2" else {}
    try:
        summary = convert_dataset(args.dataset, args.src, args.out, args.tokenizer, **options)
    except (FileNotFoundError, ValueError) as err:
        return _fail(err)
    print(json.dumps(summary, indent=1))
    return 0


def train_text_tokenizer_main(argv: Argv = None) -> int:
    """Train a unigram SentencePiece text tokenizer with the beit3.spm piece layout (<unk>=0, <s>=1, </s>=2)."""
    from beit3.text import train_text_tokenizer

    parser = argparse.ArgumentParser(description=train_text_tokenizer_main.__doc__)
    parser.add_argument("--input", nargs="+", required=True, help="text files, one sentence or document per line")
    parser.add_argument("--out", required=True, help="output prefix; writes PREFIX.model and PREFIX.vocab")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--character-coverage", type=float, default=1.0)
    args = parser.parse_args(argv)
    try:
        print(train_text_tokenizer(args.input, args.out, args.vocab_size, args.character_coverage))
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        return _fail(err)
    return 0


def tokenize_dataset_main(argv: Argv = None) -> int:
    """Precompute VQ-KD codes of a data set (resize + center crop) for pretraining (``data.codes_dir``).

    python tools/tokenize_dataset.py --tokenizer runs/demo/tokenizer --images data/images --out data/codes
    python tools/tokenize_dataset.py --tokenizer vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth \\
        --index data/imagenet.train.index.jsonl data/coco_retrieval.train.jsonl --root data --out data/codes --device cuda
    """
    from tokenizer.checkpoint import load_tokenizer
    from tokenizer.precomputed import list_image_folder, read_jsonl_index, tokenize_images

    parser = argparse.ArgumentParser(description=tokenize_dataset_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="our tokenizer directory or an official VQ-KD .pth")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder (all images below it)")
    source.add_argument("--index", nargs="+", help="JSONL index file(s) with image_path entries relative to --root; "
                        "several files are coded into one directory (e.g. the image and the pair stream's indexes)")
    parser.add_argument("--root", help="data root for --index (default: the first index file's folder)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resize", type=int, default=None, help="shorter side before the crop (default S*256/224)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        if args.images:
            root, paths = Path(args.images), list_image_folder(args.images)
        else:
            root = Path(args.root or Path(args.index[0]).parent)
            paths = list(dict.fromkeys(p for index in args.index for p in read_jsonl_index(index)))
        tokenizer = load_tokenizer(args.tokenizer, device=args.device)
    except (FileNotFoundError, ValueError) as err:
        return _fail(err)
    out = tokenize_images(tokenizer, root, paths, args.out, batch_size=args.batch_size, resize=args.resize,
                          num_workers=args.num_workers, tokenizer_name=str(args.tokenizer))
    print(f"wrote codes of {len(paths)} images to {out}")
    return 0


def export_checkpoint_main(argv: Argv = None) -> int:
    """Export the latest checkpoint of a pretraining run as safetensors (config.json + model.safetensors) and as an
    official-layout beit3_pretrained.pth.

    python tools/export_checkpoint.py --run runs/demo/pretrain --out runs/demo/pretrained
    """
    from beit3.config import ConfigError
    from beit3.models import CheckpointError
    from beit3.run_pretraining import export_pretrained

    parser = argparse.ArgumentParser(description=export_checkpoint_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="output_dir of a pretraining run")
    parser.add_argument("--out", required=True, help="directory to write the exported model into")
    args = parser.parse_args(argv)
    try:
        out = export_pretrained(args.run, args.out)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        return _fail(err)
    print(f"exported to {out}")
    return 0
