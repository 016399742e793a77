"""Procedural test images for the tokenizer tests: coloured shapes on gradient backgrounds, some striped."""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def shape_image(rng: np.random.Generator, size: int) -> Image.Image:
    """One RGB image: a two-colour gradient background with 1-4 ellipses, rectangles, triangles or stripe bands."""
    big = size * 2  # draw at 2x and downsample for anti-aliased edges
    ramp = np.linspace(0.0, 1.0, big)[None, :, None]
    if rng.random() < 0.5:
        ramp = ramp.transpose(1, 0, 2)
    a, b = np.array(_colour(rng)), np.array(_colour(rng))
    background = (a * (1 - ramp) + b * ramp) * np.ones((big, big, 1))
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 5)):
        x0, y0 = rng.integers(0, big - 8, 2)
        x1, y1 = x0 + rng.integers(8, big // 2 + 8), y0 + rng.integers(8, big // 2 + 8)
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=_colour(rng))
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=_colour(rng))
        elif kind == 2:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=_colour(rng))
        else:
            step = int(rng.integers(3, 9))
            for offset in range(0, int(x1 - x0), 2 * step):
                draw.rectangle([x0 + offset, y0, x0 + offset + step, y1], fill=_colour(rng))
    return image.resize((size, size), Image.BILINEAR)


def shape_images(num: int, size: int, seed: int = 0) -> torch.Tensor:
    """``[num, 3, size, size]`` float images in [0, 1]."""
    rng = np.random.default_rng(seed)
    arrays = np.stack([np.asarray(shape_image(rng, size)) for _ in range(num)])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0
