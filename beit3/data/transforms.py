"""Image transforms: the pretraining two-view transform and the fine-tuning train/eval transforms.

The two-view transform (BEiT v2 ``DataAugmentationForBEiT``) draws one crop box, one colour jitter and one flip and
applies them to both views. The DataLoader workers decode, crop, resize and flip; the views leave them as uint8
tensors (a quarter of the bytes of floats, one tensor when both views have one size) with the jitter's draws, and
``device_views`` applies the jitter on the device and makes the backbone's normalised input and the visual
tokenizer's [0, 1] input. Its randomness comes from an explicit ``random.Random`` so a sample's views are a pure
function of (image, seed), which the resumable mixer relies on.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import InterpolationMode

# BEiT-3 normalises with the Inception mean/std (0.5) rather than the ImageNet statistics.
BEIT3_MEAN = (0.5, 0.5, 0.5)
BEIT3_STD = (0.5, 0.5, 0.5)


def sample_crop_box(width: int, height: int, rng: random.Random, scale: tuple[float, float],
                    ratio: tuple[float, float] = (3 / 4, 4 / 3)) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random-resized-crop box, as torchvision's ``RandomResizedCrop``."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, height - h), rng.randint(0, width - w), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _jitter_draws(strength: float, rng: random.Random) -> list[tuple[str, float]]:
    """The colour jitter's random order and factors: brightness, contrast, saturation in [1 - s, 1 + s]."""
    if strength <= 0:
        return []
    ops = ["brightness", "contrast", "saturation"]
    rng.shuffle(ops)
    return [(op, rng.uniform(max(0.0, 1 - strength), 1 + strength)) for op in ops]


_LUMA = (0.299, 0.587, 0.114)  # PIL's RGB -> L weights
_OPS = {"brightness": 0, "contrast": 1, "saturation": 2}  # op codes of the ``jitter`` rows


def _jitter_rows(draws: list[tuple[str, float]], histogram: np.ndarray) -> torch.Tensor:
    """The jitter as rows (op code, factor, grey) in application order, for :func:`color_jitter_batch`. ``grey`` is
    what contrast blends with: the grey mean of the whole image as jittered so far (PIL's ``ImageEnhance.Contrast``
    on the whole image), not the crop's own mean. It comes from the whole image's per-channel ``histogram``
    (3, 256) through the brightness factors applied before it, with their clipping at 255 (saturation keeps each
    pixel's grey level up to its own clipping)."""
    values = np.arange(256, dtype=np.float64)
    rows = []
    for op, factor in draws:
        grey = 0.0
        if op == "contrast":
            grey = float(int(np.dot(_LUMA, histogram @ values / histogram[0].sum()) + 0.5))
        elif op == "brightness":
            values = np.minimum(np.floor(values * factor), 255.0)
        rows.append((_OPS[op], factor, grey))
    return torch.tensor(rows, dtype=torch.float32).view(len(rows), 3)


def _histogram(image: Image.Image, min_pixels: int = 16384) -> np.ndarray:
    """Per-channel histogram (3, 256) of every k-th pixel in each direction, k such that at least ``min_pixels``
    remain (all pixels of small images): the grey mean it gives is that of the whole image within a fraction of a
    grey level, at a fifth of the cost for a 640 x 480 photograph."""
    stride = max(1, int(math.sqrt(image.width * image.height / min_pixels)))
    if stride > 1:
        image = image.resize((image.width // stride, image.height // stride), Image.NEAREST)
    return np.asarray(image.histogram(), dtype=np.float64).reshape(3, 256)


def color_jitter_batch(images: torch.Tensor, jitter: torch.Tensor) -> torch.Tensor:
    """Apply per-sample colour jitter to float images (B, 3, H, W) in 0-255, on their device. ``jitter`` (B, K, 3):
    each sample's K ops in order as (op code, factor, grey). Each op is PIL's: blend with a degenerate image (black
    for brightness, the grey level for contrast, the pixel's own L for saturation), clipped and truncated to
    integers, so the result equals PIL's ``ImageEnhance`` ops on the uint8 image (tests/test_data_readers.py)."""
    jitter = jitter.to(device=images.device, dtype=torch.float32)
    luma = torch.tensor(_LUMA, device=images.device).view(1, 3, 1, 1)
    for k in range(jitter.shape[1]):
        op, factor, grey = (jitter[:, k, i].view(-1, 1, 1, 1) for i in range(3))
        own_grey = torch.floor((images * luma).sum(dim=1, keepdim=True) + 0.5)
        degenerate = torch.where(op == _OPS["saturation"], own_grey, grey)  # brightness rows carry grey 0: black
        images = torch.floor((degenerate + factor * (images - degenerate)).clamp(0, 255))
    return images


def device_views(stream: dict, device: torch.device | None = None, mean: Sequence[float] = BEIT3_MEAN,
                 std: Sequence[float] = BEIT3_STD) -> dict:
    """A loader stream batch with its uint8 views made into the float inputs, on ``device`` (default: where they
    are): ``image`` normalised for the backbone and ``tokenizer_image`` in [0, 1] (the model view's crop when the
    loader sent no separate one; not made when the stream has precomputed ``codes``), both colour-jittered by the
    stream's ``jitter`` rows. A stream whose ``image`` is already float is returned unchanged."""
    if "image" not in stream or stream["image"].dtype != torch.uint8:
        return stream
    out = {k: v for k, v in stream.items() if k not in ("image", "tokenizer_image", "jitter")}
    jitter = stream.get("jitter")

    def jittered(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device or images.device, non_blocking=True).float()
        return images if jitter is None else color_jitter_batch(images, jitter)

    model = jittered(stream["image"]) / 255
    m = torch.tensor(mean, device=model.device).view(-1, 1, 1)
    s = torch.tensor(std, device=model.device).view(-1, 1, 1)
    out["image"] = (model - m) / s
    if "codes" not in stream:
        out["tokenizer_image"] = jittered(stream["tokenizer_image"]) / 255 if "tokenizer_image" in stream else model
    return out


def _resized_crop(image: Image.Image, box: tuple[int, int, int, int], size: int, flip: bool) -> Image.Image:
    left, top, right, bottom = box
    if flip:  # the crop of the mirrored image is the mirror of the crop at the mirrored box
        left, right = image.width - right, image.width - left
    crop = image.resize((size, size), Image.BICUBIC, box=(left, top, right, bottom))
    return crop.transpose(Image.FLIP_LEFT_RIGHT) if flip else crop


def pil_to_uint8(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as a uint8 tensor (3, H, W), a channel-first view of its pixels (``torch.stack`` into the
    batch makes the one copy)."""
    return torch.from_numpy(np.array(image, dtype=np.uint8)).permute(2, 0, 1)


class TwoViewTransform:
    """Pretraining transform: one crop, flip and colour jitter for both views. Returns ``{"image": uint8 model
    view, "tokenizer_image": uint8 tokenizer view (only when its size differs: one crop serves both), "jitter":
    rows}``; :func:`device_views` makes the jittered float views on the device. ``hflip=False`` for data whose
    text speaks of left and right.

    The random draws are those of BEiT v2's ``DataAugmentationForBEiT`` (jitter the whole image, flip, then crop),
    in that order, but the pixels are computed crop first: the worker resizes the box (bicubic, from the box's
    exact coordinates) and mirrors it, and the jitter runs on the batch on the device. That equals the old order to
    within rounding (tests/test_data_readers.py states the tolerance) at a fraction of a worker's time (README).
    """

    def __init__(self, image_size: int, tokenizer_image_size: int, min_crop_scale: float = 0.2,
                 color_jitter_strength: float = 0.4, hflip: bool = True):
        if not 0 < min_crop_scale <= 1:
            raise ValueError(f"min_crop_scale must be in (0, 1], got {min_crop_scale}")
        self.image_size = image_size
        self.tokenizer_image_size = tokenizer_image_size
        self.scale = (min_crop_scale, 1.0)
        self.color_jitter_strength = color_jitter_strength
        self.hflip = hflip

    def __call__(self, image: Image.Image, rng: random.Random) -> dict[str, torch.Tensor]:
        draws = _jitter_draws(self.color_jitter_strength, rng)
        flip = self.hflip and rng.random() < 0.5
        top, left, h, w = sample_crop_box(image.width, image.height, rng, self.scale)
        histogram = _histogram(image) if draws else None
        box = (left, top, left + w, top + h)
        views = {"image": pil_to_uint8(_resized_crop(image, box, self.image_size, flip)),
                 "jitter": _jitter_rows(draws, histogram)}
        if self.tokenizer_image_size != self.image_size:
            views["tokenizer_image"] = pil_to_uint8(_resized_crop(image, box, self.tokenizer_image_size, flip))
        return views


def build_finetune_transform(image_size: int, train: bool, randaug: bool = False,
                             mean: Sequence[float] = BEIT3_MEAN, std: Sequence[float] = BEIT3_STD,
                             min_crop_scale: float = 0.5, hflip: bool = True) -> Callable:
    """Fine-tuning transform. Train: RandomResizedCrop (scale ``min_crop_scale``-1, bicubic; a plain resize when
    ``min_crop_scale`` is 1), horizontal flip unless ``hflip=False``, optional RandAugment(2, 9).
    Eval: bicubic resize to ``image_size`` x ``image_size`` (as the official vision-language tasks)."""
    if train:
        if min_crop_scale >= 1.0:
            steps = [T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)]
        else:
            steps = [T.RandomResizedCrop(image_size, scale=(min_crop_scale, 1.0), interpolation=InterpolationMode.BICUBIC)]
        if hflip:
            steps.append(T.RandomHorizontalFlip())
        if randaug:
            steps.append(T.RandAugment(num_ops=2, magnitude=9))
    else:
        steps = [T.Resize((image_size, image_size), interpolation=InterpolationMode.BICUBIC)]
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])
