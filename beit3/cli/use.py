"""Command-line entry points for using a checkpoint: feature extraction and ONNX export (``tools/extract_features.py``,
``tools/export_onnx.py``). Errors a user can fix exit with code 2 and one ``error:`` line."""
from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

from .commands import _fail, out_file, out_folder

Argv = Optional[Sequence[str]]


def _add_checkpoint_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", required=True,
                        help="model folder (retrieval fine-tune OUT/best, pretraining export) or hub id; with --model "
                             "an official .pth")
    parser.add_argument("--model", default=None, help="registry name of a *_retrieval model, for an official .pth")
    parser.add_argument("--tokenizer", default=None,
                        help="text tokenizer (beit3.spm); default: beit3.spm in the checkpoint folder")


def extract_features_main(argv: Argv = None) -> int:
    """Embed a folder (or JSONL index) of images and/or a text file (one text per line) into a safetensors file.

    python tools/extract_features.py --checkpoint runs/demo/ft/retrieval_pretrained_seed0/best \\
        --images photos/ --texts captions.txt --out feats.safetensors

    Writes OUT (image_features, image_index, text_features, text_index) and OUT.json (image paths, texts, skipped
    images with the reason). An interrupted run resumes from OUT.parts/ when rerun with the same arguments.
    """
    from beit3.embeddings import FEATURES, extract_features, load_dual_encoder
    from beit3.errors import CheckpointError

    parser = argparse.ArgumentParser(description=extract_features_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_checkpoint_args(parser)
    parser.add_argument("--images", default=None, help="folder of images (searched recursively) or a .jsonl index")
    parser.add_argument("--texts", default=None, help="text file, one text per line")
    parser.add_argument("--out", required=True, type=out_file,
                        help="safetensors file to write (OUT.json is written beside it)")
    parser.add_argument("--features", choices=FEATURES, default="embedding",
                        help="embedding: the trained retrieval projections (default); cls: the backbone's CLS/BOS "
                             "outputs, for checkpoints without contrastive heads")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--chunk-size", type=int, default=2048, help="items per saved part (the unit of resuming)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.images is None and args.texts is None:
        parser.error("give --images, --texts or both")
    try:
        model = load_dual_encoder(args.checkpoint, args.model, args.tokenizer, args.features).to(args.device)
        result = extract_features(model, args.out, args.images, args.texts, args.batch_size, args.chunk_size,
                                  progress=not args.no_progress)
    except (CheckpointError, FileNotFoundError, ValueError, TypeError, KeyError) as err:
        return _fail(err)
    skipped = result.pop("skipped")
    print(json.dumps(result))
    if skipped:
        shown = "; ".join(f"{s['image']}: {s['reason']}" for s in skipped[:5])
        print(f"skipped {len(skipped)} unreadable image(s) (listed in {args.out}.json): {shown}")
    return 0


def export_onnx_main(argv: Argv = None) -> int:
    """Export the image and text encoders of a retrieval checkpoint to ONNX (dynamic batch and text length),
    verified against PyTorch with onnxruntime.

    python tools/export_onnx.py --checkpoint runs/demo/ft/retrieval_pretrained_seed0/best --out onnx/
    """
    from beit3.embeddings import load_dual_encoder
    from beit3.errors import CheckpointError
    from beit3.onnx_export import export_onnx

    parser = argparse.ArgumentParser(description=export_onnx_main.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_checkpoint_args(parser)
    parser.add_argument("--out", required=True, type=out_folder,
                        help="folder to write image_encoder.onnx, text_encoder.onnx into")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime check")
    args = parser.parse_args(argv)
    try:
        model = load_dual_encoder(args.checkpoint, args.model, args.tokenizer)
        report = export_onnx(model, args.out, verify=not args.no_verify)
    except (CheckpointError, FileNotFoundError, ValueError, TypeError, KeyError) as err:
        return _fail(err)
    print(json.dumps(report, indent=2))
    return 0
