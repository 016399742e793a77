"""Embeddings from files: the dual encoder of a checkpoint, zero-shot retrieval over a folder of images and a text
file, and batched, resumable feature extraction into a safetensors file (``tools/extract_features.py``)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from .errors import CheckpointError
from .factory import attach_processor
from .hub import resolve_pretrained
from .jsonl import read_jsonl
from .models import BEiT3ForRetrieval, create_model, load_checkpoint
from .models.checkpoint import CONFIG_FILE, read_saved_config, saved_backbone_config
from .models.tasks.zero_shot import batch_slices, require_contrastive_heads
from .processing import BEiT3Processor

PathLike = Union[str, os.PathLike]
FEATURES = ("embedding", "cls")


def load_dual_encoder(checkpoint: PathLike, model_name: Optional[str] = None, tokenizer: Optional[PathLike] = None,
                      features: str = "embedding", max_text_len: int = 64) -> BEiT3ForRetrieval:
    """The image and text encoders of any checkpoint as a :class:`BEiT3ForRetrieval` in eval mode, with a processor.

    ``checkpoint``: a model folder / hub id (any class: retrieval fine-tune, pretraining export, ...) or, with
    ``model_name`` (a ``*_retrieval`` registry name), an official ``.pth``. ``features="embedding"`` needs trained
    contrastive heads (refused otherwise, see ``require_contrastive_heads``); ``"cls"`` uses the backbone's CLS / BOS
    outputs, which every checkpoint has."""
    if features not in FEATURES:
        raise ValueError(f"features must be one of {FEATURES}, got '{features}'")
    source = resolve_pretrained(checkpoint)
    if model_name is not None:
        model = create_model(model_name)
        if not isinstance(model, BEiT3ForRetrieval):
            raise ValueError(f"model '{model_name}' is a {type(model).__name__}; name a *_retrieval model")
    else:
        if not (source / CONFIG_FILE).is_file():
            raise CheckpointError(f"'{checkpoint}' is not a model folder (no {CONFIG_FILE}); for an official .pth "
                                  "pass its model name too (e.g. --model beit3_base_patch16_384_retrieval)")
        model = BEiT3ForRetrieval(saved_backbone_config(read_saved_config(source)))
    attach_processor(model, source if source.is_dir() else None, tokenizer, max_text_len)
    report = load_checkpoint(model, source)
    if features == "embedding":
        require_contrastive_heads(model, report, str(checkpoint))
    model.features = features
    return model.eval()


def _encoders(model: BEiT3ForRetrieval) -> tuple[Callable, Callable]:
    if getattr(model, "features", "embedding") == "embedding":
        return model.encode_image, model.encode_text

    def image_cls(images):
        return F.normalize(model.beit3(visual_tokens=images)["encoder_out"][:, 0], dim=-1)

    def text_cls(texts):
        ids, pad = model._processor().texts(texts)
        return F.normalize(model.beit3(textual_tokens=ids, text_padding_position=pad)["encoder_out"][:, 0], dim=-1)

    return image_cls, text_cls


def list_image_inputs(images: PathLike) -> tuple[Path, list[str]]:
    """``(root, relative paths)`` of a folder (any depth) or of a JSONL index's ``image_path`` values (relative to
    the index's folder)."""
    from tokenizer.precomputed import list_images

    path = Path(images).expanduser()
    if path.is_dir():
        return path, list_images(path)
    if path.is_file() and path.suffix == ".jsonl":
        seen = dict.fromkeys(row["image_path"] for row in read_jsonl(path) if "image_path" in row)
        if not seen:
            raise ValueError(f"index '{path}' has no image_path entries")
        return path.parent, list(seen)
    raise FileNotFoundError(f"images '{images}' is neither a folder nor a .jsonl index")


def read_text_lines(text_file: PathLike) -> list[str]:
    text_file = Path(text_file).expanduser()
    if not text_file.is_file():
        raise FileNotFoundError(f"text file '{text_file}' does not exist")
    texts = [line.strip() for line in text_file.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"text file '{text_file}' holds no non-empty line")
    return texts


@torch.no_grad()
def zero_shot_retrieval(model: BEiT3ForRetrieval, image_dir: PathLike, text_file: PathLike, top_k: int = 5,
                        batch_size: int = 64) -> dict:
    """Rank the images of a folder (any depth) against the lines of a text file with the dual encoder.

    Returns ``{"images": [relative paths], "texts": [lines], "scores": (N_images, N_texts) cosine,
    "text_to_image": [[top-k image indices] per text], "image_to_text": [[top-k text indices] per image],
    "skipped": [{"image", "reason"}] (unreadable files, left out of "images")}``."""
    root, paths = list_image_inputs(image_dir)
    texts = read_text_lines(text_file)
    encode_image, encode_text = _encoders(model)
    kept, loaded, skipped = _load_images(root, paths, model._processor())
    if not kept:
        raise ValueError(f"none of the {len(paths)} images in '{image_dir}' could be read: {skipped[0]['reason']}")
    device = model.logit_scale.device
    image_feats = torch.cat([encode_image(torch.stack(loaded[s]).to(device)) for s in batch_slices(len(kept), batch_size)])
    text_feats = torch.cat([encode_text(texts[s]) for s in batch_slices(len(texts), batch_size)])
    scores = image_feats @ text_feats.T
    return {
        "images": [paths[i] for i in kept],
        "texts": texts,
        "scores": scores,
        "text_to_image": scores.topk(min(top_k, len(kept)), dim=0).indices.T.tolist(),
        "image_to_text": scores.topk(min(top_k, len(texts)), dim=1).indices.tolist(),
        "skipped": skipped,
    }


def _load_images(root: Path, paths: Sequence[str], processor: BEiT3Processor) -> tuple[list[int], list[torch.Tensor], list[dict]]:
    kept, tensors, skipped = [], [], []
    for i, rel in enumerate(paths):
        try:
            with Image.open(root / rel) as image:
                tensors.append(processor.image_transform(image.convert("RGB")))
            kept.append(i)
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            skipped.append({"image": rel, "reason": f"{type(err).__name__}: {err}"})
    return kept, tensors, skipped


@torch.no_grad()
def extract_features(model: BEiT3ForRetrieval, out: PathLike, images: Optional[PathLike] = None,
                     texts: Optional[PathLike] = None, batch_size: int = 64, chunk_size: int = 2048,
                     progress: bool = True) -> dict:
    """Embed every image of ``images`` (folder or index) and every line of ``texts`` into ``out`` (safetensors:
    ``image_features`` (N, D), ``text_features`` (M, D)) with ``out`` + ``.json`` listing the images, texts and
    skipped (unreadable) images with the reason.

    Work is saved per chunk of ``chunk_size`` items in ``out.parts/``: a rerun of the same command skips the chunks
    already done and only then writes ``out``; the parts are removed at the end."""
    if images is None and texts is None:
        raise ValueError("extract_features needs images, texts or both")
    out = Path(out).expanduser()
    parts = out.with_name(out.name + ".parts")
    parts.mkdir(parents=True, exist_ok=True)
    encode_image, encode_text = _encoders(model)
    processor = model._processor()
    device = model.logit_scale.device
    tensors, report = {}, {"images": [], "texts": [], "skipped": []}
    jobs = []
    if images is not None:
        root, paths = list_image_inputs(images)
        report["image_root"], report["images"] = str(root), paths
        jobs.append(("image", paths))
    if texts is not None:
        report["texts"] = read_text_lines(texts)
        jobs.append(("text", report["texts"]))
    for kind, items in jobs:
        chunks = list(batch_slices(len(items), chunk_size))
        features, kept_all = [], []
        bar = tqdm(total=len(items), desc=f"{kind}s", unit=kind, disable=not progress, file=sys.stderr)
        for number, chunk in enumerate(chunks):
            bar.update(chunk.start - bar.n)  # the chunks before this one are done
            part = parts / f"{kind}_{number:06d}.safetensors"
            expected = json.dumps(items[chunk])
            if part.is_file():
                saved = load_file(str(part))
                meta = json.loads((part.with_suffix(".json")).read_text()) if part.with_suffix(".json").is_file() else {}
                if meta.get("items") == expected:
                    features.append(saved["features"])
                    kept_all.append(saved["index"])
                    report["skipped"] += meta.get("skipped", [])
                    continue
            if kind == "image":
                kept, loaded, skipped = _load_images(root, items[chunk], processor)
                feats = [encode_image(torch.stack(loaded[s]).to(device)) for s in batch_slices(len(loaded), batch_size)]
            else:
                kept, skipped = list(range(len(items[chunk]))), []
                feats = [encode_text(items[chunk][s]) for s in batch_slices(len(kept), batch_size)]
            feat = torch.cat(feats).float().cpu() if feats else torch.zeros(0, model.config.embed_dim)
            index = torch.tensor(kept, dtype=torch.long) + chunk.start
            part.with_suffix(".json").write_text(json.dumps({"items": expected, "skipped": skipped}))
            save_file({"features": feat.contiguous(), "index": index}, str(part))
            features.append(feat)
            kept_all.append(index)
            report["skipped"] += skipped
        bar.update(len(items) - bar.n)
        bar.close()
        tensors[f"{kind}_features"] = torch.cat(features)
        tensors[f"{kind}_index"] = torch.cat(kept_all)
    save_file(tensors, str(out), metadata={"format": "pt", "features": getattr(model, "features", "embedding")})
    out.with_name(out.name + ".json").write_text(json.dumps(report, indent=1) + "\n")
    for part in parts.iterdir():
        part.unlink()
    parts.rmdir()
    return {"out": str(out), **{k: int(v.shape[0]) for k, v in tensors.items() if k.endswith("_features")},
            "skipped": report["skipped"]}
