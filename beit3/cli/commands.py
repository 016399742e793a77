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


def out_folder(value: str) -> str:
    """argparse ``type`` of an ``--out`` that is a folder: ``~`` expanded, an existing file refused."""
    path = Path(value).expanduser()
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"'{value}' is an existing file; this tool writes a folder there")
    return str(path)


def out_file(value: str) -> str:
    """argparse ``type`` of an ``--out`` that is one file: ``~`` expanded, an existing folder refused."""
    path = Path(value).expanduser()
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"'{value}' is a folder; this tool writes one file: give its path, e.g. "
                                         f"'{path / 'out.json'}'")
    return str(path)


def make_demo_data_main(argv: Argv = None) -> int:
    """Generate the procedural demo data root (images, BEiT-3 index files, corpus, beit3.spm, WebDataset shards), or
    with --photos a COCO Karpathy raw release of real photographs (for tools/convert_dataset.py coco_karpathy)."""
    from beit3.demo.data import make_demo_data
    from beit3.demo.photos import make_photo_release

    parser = argparse.ArgumentParser(description=make_demo_data_main.__doc__)
    parser.add_argument("--out", required=True, type=out_folder,
                        help="output data root (with --photos: the raw release folder)")
    parser.add_argument("--num-images", type=int, default=400,
                        help="images to generate, split 80/10/10 into train/val/test (default 400; tools/demo.sh uses 600)")
    parser.add_argument("--image-size", type=int, default=None, help="default 64 (demo scenes), 128 (--photos)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same files")
    parser.add_argument("--num-shards", type=int, default=4, help="WebDataset shards of the image-text pairs")
    parser.add_argument("--photos", action="store_true",
                        help="real photographs shipped by scikit-image / scikit-learn, captioned with their names")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    try:
        if args.photos:
            summary = make_photo_release(args.out, args.num_images, args.image_size or 128, args.seed)
            print(json.dumps(summary, indent=1))
        else:
            manifest = make_demo_data(args.out, args.num_images, args.image_size or 64, args.seed,
                                      num_shards=args.num_shards)
            print(json.dumps(manifest["index_lines"], indent=1))
    except ValueError as err:  # sizes the generator cannot honour (too few images, ...)
        return _fail(err)
    print(f"wrote {args.out} in {time.perf_counter() - start:.1f}s")
    return 0


def convert_dataset_main(argv: Argv = None) -> int:
    """Convert a public raw dataset release into a BEiT-3 data root (official JSONL index layouts)."""
    from beit3.data.convert import CONVERTERS, convert_dataset

    parser = argparse.ArgumentParser(description=convert_dataset_main.__doc__)
    parser.add_argument("dataset", choices=sorted(CONVERTERS))
    parser.add_argument("--src", required=True, help="folder holding the raw release")
    parser.add_argument("--out", required=True, type=out_folder, help="output data root")
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
    parser.add_argument("--out", required=True, type=out_file, help="output prefix; writes PREFIX.model and PREFIX.vocab")
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
    from tokenizer.precomputed import list_images, read_jsonl_index, tokenize_images

    parser = argparse.ArgumentParser(description=tokenize_dataset_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", required=True, help="our tokenizer directory or an official VQ-KD .pth")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--images", help="image folder (all images below it)")
    source.add_argument("--index", nargs="+", help="JSONL index file(s) with image_path entries relative to --root; "
                        "several files are coded into one directory (e.g. the image and the pair stream's indexes)")
    parser.add_argument("--root", help="data root for --index (default: the first index file's folder)")
    parser.add_argument("--out", required=True, type=out_folder, help="output directory")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--resize", type=int, default=None, help="shorter side before the crop (default S*256/224)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    try:
        if args.images:
            root, paths = Path(args.images), list_images(args.images)
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
    from beit3.cli.pretrain import export_pretrained

    parser = argparse.ArgumentParser(description=export_checkpoint_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", required=True, help="output_dir of a pretraining run")
    parser.add_argument("--out", required=True, type=out_folder, help="directory to write the exported model into")
    args = parser.parse_args(argv)
    try:
        out = export_pretrained(args.run, args.out)
    except (ConfigError, CheckpointError, FileNotFoundError) as err:
        return _fail(err)
    print(f"exported to {out}")
    return 0


def probe_pretrained_main(argv: Argv = None) -> int:
    """Held-out masked-data-modeling evaluation and grounding probe of a pretrained checkpoint; writes a JSON report.

    python tools/probe_pretrained.py --checkpoint runs/demo/pretrained --data-root runs/demo/data \\
        --tokenizer runs/demo/tokenizer --config configs/pretrain/demo.yaml --out probe.json
    python tools/probe_pretrained.py --checkpoint beit3_base_patch16_224.pth --model beit3_base_patch16_224 \\
        --data-root /data/coco --text-tokenizer beit3.spm --tokenizer vqkd_encoder_base_decoder_3x768x12_clip.pth \\
        --probe-words colour=red,green,blue,yellow,white,black --out probe.json

    Held-out sources, probe words and masking come from the pretraining config (``eval:``, ``objective.masking``,
    ``data.*`` sources: their val-split files) when --config is given; --set overrides its keys.
    """
    from beit3.config import ConfigError, load_config
    from beit3.models import CheckpointError
    from beit3.probing import probe_pretrained
    from beit3.cli.pretrain import PretrainConfig

    parser = argparse.ArgumentParser(description=probe_pretrained_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="export directory, beit3_pretrained.pth or an official .pth")
    parser.add_argument("--data-root", required=True, help="data root holding the held-out index files")
    parser.add_argument("--model", default="", help="architecture of a bare .pth, e.g. beit3_base_patch16_224")
    parser.add_argument("--tokenizer", default="", help="visual tokenizer (ours or an official VQ-KD .pth); without "
                        "it only the text metrics are measured")
    parser.add_argument("--text-tokenizer", default="", help="SentencePiece model (default: DATA_ROOT/beit3.spm)")
    parser.add_argument("--config", default=None, help="pretraining YAML whose eval/masking/data sections to use")
    parser.add_argument("--set", dest="overrides", metavar="KEY=VALUE", nargs="+", action="extend", default=[],
                        help="override a key of that config, e.g. --set eval.max_samples=512")
    parser.add_argument("--probe-words", metavar="CLASS=W1,W2", nargs="+", action="extend", default=[],
                        help="a probe word class (repeatable), e.g. colour=red,green,blue")
    parser.add_argument("--out", required=True, type=out_file, help="JSON report to write")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(PretrainConfig, args.config, args.overrides)
        for spec in args.probe_words:
            name, sep, words = spec.partition("=")
            if not sep or not name or not words:
                raise ConfigError(f"--probe-words '{spec}': expected CLASS=WORD1,WORD2,...")
            cfg.eval.probe_words[name] = [w for w in words.split(",") if w]
        report = probe_pretrained(
            args.checkpoint, args.data_root, model_name=args.model, visual_tokenizer=args.tokenizer,
            text_tokenizer=args.text_tokenizer, eval_cfg=cfg.eval, masking=cfg.objective.masking,
            train_sources={"image": cfg.data.image_source, "pair": cfg.data.pair_source,
                           "text": cfg.data.text_sources[0] if cfg.data.text_sources else ""},
            max_text_len=cfg.data.max_text_len)
    except (ConfigError, CheckpointError, FileNotFoundError, ValueError) as err:
        return _fail(err)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    from beit3.probing import eval_summary_line

    print(eval_summary_line(-1, report["metrics"]).replace("step -1", "checkpoint"))
    print(f"wrote {out}")
    return 0
