"""Loading throughput: images per second for one worker doing decode + the pretraining two-view transform."""
from __future__ import annotations

import json
import platform
import random
import time
from pathlib import Path

import torch

from beit3.data.sources import open_image_source
from beit3.data.transforms import TwoViewTransform


def measure_loading(root: str | Path, image_source: str = "imagenet.train.index.jsonl", num_images: int = 200,
                    image_size: int = 224, tokenizer_image_size: int = 224, out_json: str | Path | None = None) -> dict:
    """Time decode + two-view transform of ``num_images`` images in this process (= one DataLoader worker).

    Returns (and writes to ``out_json`` when given) ``{"images_per_s_per_worker", ...}`` with the settings used.
    """
    source = open_image_source(image_source, Path(root))
    transform = TwoViewTransform(image_size, tokenizer_image_size)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker runs single-threaded
    try:
        start = time.perf_counter()
        for i in range(num_images):
            sample = source.load(i % len(source))
            transform(sample["image"], random.Random(i))
        seconds = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    result = {
        "images_per_s_per_worker": num_images / seconds, "num_images": num_images, "seconds": seconds,
        "image_size": image_size, "tokenizer_image_size": tokenizer_image_size, "root": str(root),
        "image_source": image_source, "machine": platform.processor() or platform.machine(),
    }
    if out_json is not None:
        Path(out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(out_json).write_text(json.dumps(result, indent=2) + "\n")
    return result
