"""The visual-token targets of pretraining: precomputed codes (written by ``tools/tokenize_dataset.py``) or the frozen
tokenizer run on each batch (:func:`visual_codes_fn`).

With ``data.codes_dir`` set, image-bearing streams skip the online tokenizer: each image gets the fixed view its
codes were computed on (bicubic resize of the shorter side + center crop, no flip or jitter), as uint8 like the
online views, and its codes are looked up by ``image_path``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.transforms import InterpolationMode

from tokenizer.precomputed import META_FILE, fixed_view, load_precomputed_codes

from .readers import SkipSample
from .transforms import pil_to_uint8


def read_codes_meta(directory: str | Path) -> dict:
    """``codes_meta.json`` of a precomputed-codes directory (tokenizer, img_size, resize, num_patches, codebook_size)."""
    path = Path(directory) / META_FILE
    if not path.is_file():
        raise FileNotFoundError(f"'{directory}' is not a precomputed-codes directory: {META_FILE} is missing")
    return json.loads(path.read_text())


class PrecomputedCodes:
    """Codes of a ``tokenize_dataset`` directory, looked up by image path, plus the matching fixed model view."""

    def __init__(self, directory: str | Path, image_size: int):
        self.directory = Path(directory)
        self.rows, self.codes = load_precomputed_codes(self.directory)
        self.meta = read_codes_meta(self.directory)
        crop = int(self.meta["img_size"])
        to_model = [T.Resize(image_size, interpolation=InterpolationMode.BICUBIC)] if image_size != crop else []
        self.view = T.Compose(fixed_view(crop, int(self.meta["resize"])) + to_model + [pil_to_uint8])

    @property
    def codebook_size(self) -> int:
        return int(self.meta["codebook_size"])

    @property
    def num_patches(self) -> int:
        return int(self.meta["num_patches"])

    def __call__(self, image: Image.Image, image_path: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(model view uint8, codes LongTensor [N]) of one image; an image without codes is skipped as ``no_codes``."""
        row = self.rows.get(image_path)
        if row is None:
            raise SkipSample("no_codes", f"'{image_path}' has no codes in '{self.directory}'")
        return self.view(image), torch.from_numpy(self.codes[row].astype("int64"))


def visual_codes_fn(path: str, precision: str, device: torch.device, img_size: int) -> tuple[Callable[[torch.Tensor], torch.Tensor], object]:
    """The frozen tokenizer outside the engine at ``img_size`` px (positions resampled if it was trained at another
    size): eval mode, no grad, bf16 autocast on GPU (fp32 code search)."""
    from tokenizer import load_tokenizer

    tok = load_tokenizer(path, device=device, img_size=img_size).eval().requires_grad_(False)
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")

    @torch.no_grad()
    def codes(images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
            return tok.get_codebook_indices(images.to(device, non_blocking=True))

    return codes, tok
