"""``tools/capfilt.py``: BLIP's CapFilt over an image-text source (see :mod:`beit3.capfilt`), resumable and sharded
over ranks; writes the new source, ``capfilt_report.json`` and two pictures (score histograms, examples).

    python tools/capfilt.py --source coco_retrieval.train.jsonl --root runs/demo/data \\
        --captioner runs/demo/ft/captioning_pretrained_seed0 --matcher runs/demo/ft/retrieval_itm --out runs/capfilt
    torchrun --nproc_per_node 8 tools/capfilt.py --source 'shards/{00000..00099}.tar' --root /data/laion ...

Errors a user can fix exit with code 2 and one ``error:`` line; Ctrl-C exits 130 and keeps every finished unit.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from beit3.errors import CheckpointError
from beit3.finetune.evaluation import BEST_DIR
from beit3.models.checkpoint import CONFIG_FILE
from .commands import _fail, out_folder


def _model_folder(path: str) -> Path:
    """The model folder of a fine-tuning run folder (its ``best/``), a ``save_pretrained`` folder or a hub id."""
    from beit3.hub import resolve_pretrained

    folder = resolve_pretrained(path)
    return folder / BEST_DIR if (folder / BEST_DIR / CONFIG_FILE).is_file() else folder


def _load(path: str, what: str) -> torch.nn.Module:
    from beit3.models import from_pretrained

    try:
        return from_pretrained(_model_folder(path))
    except (CheckpointError, FileNotFoundError, OSError) as err:
        raise CheckpointError(f"--{what} '{path}': {err}") from err


def _tokenizer(args, captioner: str):
    from beit3.text import TextTokenizer

    path = Path(args.tokenizer) if args.tokenizer else _model_folder(captioner) / "beit3.spm"
    if not path.is_file():
        raise FileNotFoundError(f"no text tokenizer: {path} does not exist (pass --tokenizer beit3.spm)")
    return TextTokenizer.from_file(path)


def draw_report(report: dict, out_dir: Path) -> list[Path]:
    """``capfilt_scores.png`` (histograms of the match probabilities, the threshold marked) and
    ``capfilt_examples.png`` (example images with their original and synthetic captions, kept in green)."""
    from beit3.demo.plots import _figure, image_grid
    from PIL import Image

    fig = _figure(6.0, 3.2)
    ax = fig.add_subplot(1, 1, 1)
    edges = report["histogram_bins"]
    centres = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    width = edges[1] - edges[0]
    ax.bar([c - width / 4 for c in centres], report["original_histogram"], width / 2, label="original captions")
    ax.bar([c + width / 4 for c in centres], report["synthetic_histogram"], width / 2, label="synthetic captions")
    ax.axvline(report["config"]["threshold"], color="k", linestyle="--", label="threshold")
    ax.set_xlabel("ITM match probability" if report["config"]["scorer"] == "itm" else "(1 + cosine) / 2 (ITC)")
    ax.set_ylabel("captions")
    ax.legend(fontsize=8)
    fig.tight_layout()
    scores = out_dir / "capfilt_scores.png"
    fig.savefig(scores, dpi=90)
    paths = [scores]
    rows = []
    for example in report["examples"][:8]:
        lines = [f"{'KEPT' if c['kept'] else 'cut '} {c['score']:.2f} {c['kind']}: {c['text']}"
                 for c in example["captions"]]
        rows.append({"text": "\n".join(lines), "images": [Image.open(out_dir / example["thumbnail"]).convert("RGB")],
                     "marks": [any(c["kept"] for c in example["captions"])]})
    if rows:
        paths.append(image_grid(rows, out_dir / "capfilt_examples.png",
                                title="CapFilt: original and synthetic captions"))
    return paths


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Caption and filter an image-text source (BLIP CapFilt)."""
    from beit3.capfilt import CapFiltConfig, CapFilter, merge_units, plant_noise, run_units, work_units
    from beit3.engine import barrier, get_local_rank, get_rank, get_world_size, init_distributed
    from beit3.jsonl import read_jsonl

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True,
                        help="a JSONL pair index (image_path, text_segment) or img2dataset shards (a .tar, a brace "
                             "pattern, a glob or a folder of .tar), relative to --root")
    parser.add_argument("--root", default=".", help="the data root the source's paths are relative to")
    parser.add_argument("--captioner", required=True, help="captioning fine-tune (run folder or model folder)")
    parser.add_argument("--matcher", required=True,
                        help="retrieval fine-tune (with the ITM head, model.overrides.itm, for --scorer itm)")
    parser.add_argument("--tokenizer", default=None, help="beit3.spm (default: the captioner's)")
    parser.add_argument("--out", required=True, type=out_folder, help="folder of the new source and the report")
    defaults = CapFiltConfig()
    for name in ("threshold", "top_p", "num_synthetic", "max_caption_len", "max_text_len", "batch_size", "chunk_size",
                 "seed"):
        kind = type(getattr(defaults, name))
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=getattr(defaults, name))
    parser.add_argument("--scorer", choices=("itm", "itc"), default=defaults.scorer,
                        help="itm: the ITM head's match probability (BLIP); itc: (1 + cosine) / 2 of the contrastive "
                             "embeddings (CLIP-score filtering)")
    parser.add_argument("--plant-noise", type=float, default=0.0,
                        help="measure the filter: give this fraction of a JSONL source's pairs another image's "
                             "caption first (marked noisy; the report counts them before and after)")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: this rank's GPU if any)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0, help=argparse.SUPPRESS)  # deepspeed
    args = parser.parse_args(argv)
    try:
        cfg = CapFiltConfig(**{k: getattr(args, k) for k in vars(defaults)})
        root, out_dir = Path(args.root), Path(args.out)
        items = None
        if args.plant_noise:
            if not args.source.endswith(".jsonl"):
                raise ValueError("--plant-noise works on a JSONL source")
            items = plant_noise(read_jsonl(root / args.source), args.plant_noise, cfg.seed)
        units = work_units(args.source, root, cfg.chunk_size, items)
        init_distributed()
        rank, world = get_rank(), get_world_size()
        device = args.device or (f"cuda:{get_local_rank()}" if torch.cuda.is_available() else "cpu")
        captioner, matcher = _load(args.captioner, "captioner"), _load(args.matcher, "matcher")
        capfilter = CapFilter(captioner, matcher, _tokenizer(args, args.captioner), cfg, device)
        out_dir.mkdir(parents=True, exist_ok=True)
        done = run_units(units, capfilter, root, out_dir, rank, world)
        barrier()
        if rank == 0:
            report = merge_units(units, args.source, out_dir, cfg)
            draw_report(report, out_dir)
            summary = {k: report[k] for k in ("samples", "skipped", "kept_original_fraction", "kept_synthetic_fraction",
                                               "pairs_written", "new_source")}
            summary["units_processed_now"] = done
            if "planted_noise" in report:
                summary["planted_noise"] = report["planted_noise"]
            print(json.dumps(summary))
    except KeyboardInterrupt:
        print("error: interrupted (finished units are kept; the same command resumes)", file=sys.stderr)
        return 130
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as err:
        return _fail(err)
    return 0
