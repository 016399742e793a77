"""Precompute VQ-KD codes of a data set (resize + center crop) for pretraining; format in tokenizer/precomputed.py.

    python tools/tokenize_dataset.py --tokenizer runs/vqkd_demo --images data/images --out data/codes
    python tools/tokenize_dataset.py --tokenizer vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth \
        --index data/coco_retrieval.train.jsonl --root data/coco --out data/coco_codes --device cuda
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tokenizer.checkpoint import load_tokenizer
from tokenizer.precomputed import list_image_folder, read_jsonl_index, tokenize_images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
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

    if args.images:
        root, paths = Path(args.images), list_image_folder(args.images)
    else:
        root = Path(args.root or Path(args.index[0]).parent)
        paths = list(dict.fromkeys(p for index in args.index for p in read_jsonl_index(index)))
    tokenizer = load_tokenizer(args.tokenizer, device=args.device)
    out = tokenize_images(tokenizer, root, paths, args.out, batch_size=args.batch_size, resize=args.resize,
                          num_workers=args.num_workers, tokenizer_name=str(args.tokenizer))
    print(f"wrote codes of {len(paths)} images to {out}")


if __name__ == "__main__":
    main()
