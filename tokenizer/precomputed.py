"""Precomputed VQ-KD codes of a fixed-crop data set, so pretraining can read codes instead of running the tokenizer.

Directory format (written by ``tokenize_images``, read by ``load_precomputed_codes``)::

    codes.npy            [N_images, N_patches] uint16 (int32 when the codebook has more than 65536 codes),
                         row-major patch order, one row per distinct image
    codes_index.jsonl    one line per image: {"image_path": "<path relative to the data root>", "row": <int>}
    codes_meta.json      {"tokenizer", "img_size", "resize", "num_patches", "codebook_size", "dtype", "num_images"}

Images get the official validation view: bicubic resize of the shorter side to ``resize`` (default
``img_size * 256 / 224``), center crop to ``img_size``, ``ToTensor`` ([0, 1]); the tokenizer maps them to [-1, 1].
Sources: an image folder (every image file below it, sorted) or a JSONL index in the official BEiT-3 layout (one JSON
object per line with an ``image_path`` relative to a root; repeated paths, e.g. several captions, are coded once).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from beit3.jsonl import read_jsonl
from tokenizer.vqkd import VQKD

CODES_FILE = "codes.npy"
INDEX_FILE = "codes_index.jsonl"
META_FILE = "codes_meta.json"
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif", ".tif", ".tiff")


def list_images(root: str | Path, allow_empty: bool = False) -> list[str]:
    """Image files below ``root`` (by suffix, any depth), as sorted POSIX paths relative to ``root``; a folder
    without images is an error unless ``allow_empty``."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder '{root}' does not exist")
    paths = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not paths and not allow_empty:
        raise ValueError(f"image folder '{root}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return paths


def read_jsonl_index(index_file: str | Path) -> list[str]:
    """Distinct ``image_path`` values of a BEiT-3 JSONL index, in first-seen order."""
    paths: dict[str, None] = {}
    for number, entry in enumerate(read_jsonl(index_file), 1):
        if not isinstance(entry.get("image_path"), str):
            raise ValueError(f"index file '{index_file}' entry {number}: no string 'image_path'")
        paths[entry["image_path"]] = None
    if not paths:
        raise ValueError(f"JSONL index '{index_file}' has no entries")
    return list(paths)


def default_resize(img_size: int) -> int:
    """The shorter side the fixed view resizes to before its center crop (the official ``img_size * 256 / 224``)."""
    return round(img_size * 256 / 224)


def fixed_view(img_size: int, resize: int | None = None) -> list:
    """The PIL steps of the one view precomputed codes are made from: bicubic resize of the shorter side to
    ``resize`` (default :func:`default_resize`), center crop to ``img_size``. Both the offline tokenisation
    (:func:`eval_transform`) and the pretraining reader of stored codes (``beit3.data.codes``) build on it."""
    return [transforms.Resize(resize or default_resize(img_size), interpolation=transforms.InterpolationMode.BICUBIC),
            transforms.CenterCrop(img_size)]


def eval_transform(img_size: int, resize: int | None = None) -> transforms.Compose:
    """:func:`fixed_view` + ToTensor ([0, 1]): the official VQ-KD validation view, what the tokenizer codes."""
    return transforms.Compose(fixed_view(img_size, resize) + [transforms.ToTensor()])


class _ImageList(Dataset):
    def __init__(self, root: Path, paths: list[str], transform: transforms.Compose):
        self.root, self.paths, self.transform = root, paths, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor:
        path = self.root / self.paths[i]
        try:
            with Image.open(path) as image:
                return self.transform(image.convert("RGB"))
        except OSError as err:
            raise OSError(f"cannot read image '{path}': {err}") from err


@torch.no_grad()
def tokenize_images(tokenizer: VQKD, root: str | Path, image_paths: list[str], out_dir: str | Path,
                    batch_size: int = 64, resize: int | None = None, num_workers: int = 0,
                    tokenizer_name: str = "") -> Path:
    """Code every image (paths relative to ``root``) and write the directory format above to ``out_dir``."""
    cfg = tokenizer.config
    device = next(tokenizer.parameters()).device
    tokenizer.eval()
    dtype = np.uint16 if cfg.codebook_size <= 65536 else np.int32
    data = _ImageList(Path(root), image_paths, eval_transform(cfg.img_size, resize))
    loader = DataLoader(data, batch_size=batch_size, num_workers=num_workers, shuffle=False)
    codes = np.empty((len(image_paths), cfg.num_patches), dtype=dtype)
    row = 0
    for images in loader:
        batch_codes = tokenizer.get_codebook_indices(images.to(device)).cpu().numpy()
        codes[row:row + len(batch_codes)] = batch_codes.astype(dtype)
        row += len(batch_codes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    np.save(out_dir / CODES_FILE, codes)
    _write_lines(out_dir / INDEX_FILE, (json.dumps({"image_path": p, "row": i}) for i, p in enumerate(image_paths)))
    meta = {"tokenizer": tokenizer_name, "img_size": cfg.img_size, "resize": resize or default_resize(cfg.img_size),
            "num_patches": cfg.num_patches, "codebook_size": cfg.codebook_size, "dtype": np.dtype(dtype).name,
            "num_images": len(image_paths)}
    (out_dir / META_FILE).write_text(json.dumps(meta, indent=2))
    return out_dir


def _write_lines(path: Path, lines: Iterable[str]) -> None:
    path.write_text("".join(line + "\n" for line in lines))


def load_precomputed_codes(directory: str | Path, mmap: bool = True) -> tuple[dict[str, int], np.ndarray]:
    """``({image_path: row}, codes [N_images, N_patches])`` of a directory written by ``tokenize_images``."""
    directory = Path(directory)
    for name in (CODES_FILE, INDEX_FILE):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"'{directory}' is not a precomputed-codes directory: {name} is missing")
    codes = np.load(directory / CODES_FILE, mmap_mode="r" if mmap else None)
    rows = {}
    for line in (directory / INDEX_FILE).read_text().splitlines():
        if line.strip():
            entry = json.loads(line)
            rows[entry["image_path"]] = int(entry["row"])
    if len(rows) != codes.shape[0] or (rows and max(rows.values()) >= codes.shape[0]):
        raise ValueError(f"'{directory}': {INDEX_FILE} lists {len(rows)} images but {CODES_FILE} has "
                         f"{codes.shape[0]} rows")
    return rows, codes
