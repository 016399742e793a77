"""Loading throughput: one worker doing decode + the pretraining two-view transform (``measure_loading``), and the
whole pipeline end to end on web-size photographs against the torchvision ImageNet loader
(``benchmark_data_pipeline``, ``tools/benchmark_data.py``)."""
from __future__ import annotations

import json
import os
import platform
import random
import time
from pathlib import Path

import torch

from beit3.bench.common import write_json
from beit3.data.sources import open_image_source
from beit3.data.transforms import TwoViewTransform, device_views


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
        write_json(result, out_json)
    return result


# ----------------------------------------------------------------------------------------------------------------
# End to end: read -> decode -> two-view transform -> collated batch out of the DataLoader, on web-size photographs

WEB_SIZES = ((500, 375), (640, 480), (375, 500))  # COCO / ImageNet-like JPEG sizes (width, height)


def make_web_photos(out: str | Path, num_images: int = 256, seed: int = 0, quality: int = 90) -> dict:
    """``num_images`` JPEGs at web sizes, random crops of the photographs scikit-image / scikit-learn ship, written
    three ways: ``images/<photo>/NNNNNN.jpg`` (a class-folder tree, which torchvision's ``ImageFolder`` reads too),
    ``images.jsonl`` (a BEiT-3 index of the same files) and ``shards/0000{0,1}.tar`` (WebDataset, jpg + txt)."""
    import io

    import numpy as np
    import webdataset as wds
    from PIL import Image

    from beit3.demo.photos import PHOTOS, random_crop

    out = Path(out)
    rng = random.Random(seed)
    photos = {name: Image.fromarray(np.asarray(load())).convert("RGB") for name, load in PHOTOS.items()}
    (out / "shards").mkdir(parents=True, exist_ok=True)
    rows, total_bytes = [], 0
    writers = [wds.TarWriter(str(out / "shards" / f"{k:05d}.tar")) for k in range(2)]
    try:
        for i in range(num_images):
            name = rng.choice(sorted(photos))
            width, height = WEB_SIZES[i % len(WEB_SIZES)]
            buffer = io.BytesIO()
            random_crop(photos[name], width, height, rng).save(buffer, "JPEG", quality=quality)
            data = buffer.getvalue()
            relative = f"images/{name}/{i:06d}.jpg"
            (out / relative).parent.mkdir(parents=True, exist_ok=True)
            (out / relative).write_bytes(data)
            rows.append({"image_path": relative})
            writers[i % 2].write({"__key__": f"{i:06d}", "jpg": data, "txt": f"a photo of a {name}"})
            total_bytes += len(data)
    finally:
        for writer in writers:
            writer.close()
    (out / "images.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": str(out), "num_images": num_images, "sizes": [list(s) for s in WEB_SIZES],
            "mean_jpeg_kb": total_bytes / num_images / 1024, "quality": quality}


def _timed_batches(loader, batches: int, batch_size: int, workers: int, to_float=None) -> dict:
    """Images/s (in all and per worker) over ``batches`` batches after the first (which includes the workers'
    start-up); ``to_float`` is applied to each batch in this process (uint8 batches to the model's floats)."""
    iterator = iter(loader)
    next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
        if to_float is not None:
            to_float(batch)
    seconds = time.perf_counter() - start
    rate = batches * batch_size / seconds
    return {"images_per_s": rate, "images_per_s_per_worker": rate / max(workers, 1), "workers": workers,
            "seconds": seconds, "batches": batches}


def measure_pipeline(root: str | Path, source: str, workers: int, batch_size: int = 32, batches: int = 8,
                     image_size: int = 224, tokenizer_image_size: int = 224, views_in_process: bool = False) -> dict:
    """The pretraining image stream as training runs it (``PretrainStepDataset`` + ``PretrainBatches``: sources,
    two-view transform, collation, DataLoader workers), images/s in all and per worker. The batches are uint8 views
    with jitter rows; ``views_in_process`` also runs :func:`device_views` (jitter, float views) on them here, on
    the CPU, as a run without a GPU does."""
    from beit3.data.pretrain import PretrainBatches, PretrainStepDataset, _Stream

    stream = _Stream("image", open_image_source(source, Path(root)), batch_size, seed=0, max_replacements=3)
    dataset = PretrainStepDataset([stream], TwoViewTransform(image_size, tokenizer_image_size), tokenizer=None,
                                  max_text_len=0, rank=0, world_size=1)
    batches_iter = PretrainBatches(dataset, workers, prefetch_factor=2, max_skip_fraction=1.0,
                                   skip_check_min_samples=10**9)
    to_float = (lambda batch: device_views(batch["image"])) if views_in_process else None
    return {**_timed_batches(batches_iter, batches, batch_size, workers, to_float), "loader": "beit3 two-view",
            "source": source, "views_in_process": views_in_process}


def measure_torchvision_baseline(root: str | Path, workers: int, batch_size: int = 32, batches: int = 8,
                                 image_size: int = 224) -> dict:
    """The plain torchvision ImageNet training loader on the same files: ``ImageFolder`` + ``RandomResizedCrop`` +
    flip + ``ToTensor`` + ``Normalize``, one view."""
    from torch.utils.data import DataLoader
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize((0.485, 0.456, 0.406),
                                                                                (0.229, 0.224, 0.225))])
    dataset = datasets.ImageFolder(str(Path(root) / "images"), transform=transform)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
                        **({"prefetch_factor": 2} if workers else {}))
    return {**_timed_batches(_endless(loader), batches, batch_size, workers),
            "loader": "torchvision ImageFolder one view", "source": "images/"}


def _endless(loader):
    while True:
        yield from loader


def benchmark_data_pipeline(photos_dir: str | Path, workers: tuple[int, ...] = (1, 2), num_images: int = 256,
                            batch_size: int = 32, batches: int = 8, image_size: int = 224, repeats: int = 3,
                            out_json: str | Path | None = None) -> dict:
    """Every source kind (folder, JSONL index, WebDataset shards) and the torchvision baseline at each worker count,
    on the same web-size photographs (made in ``photos_dir`` if it holds none), and the JSONL index once more with
    the float views made in this process (jitter and normalisation on the CPU, where no GPU does it). Each case
    runs ``repeats`` times, the cases interleaved round by round (so a change of the machine's speed hits all of
    them); a row is the median run, with every run's images/s per worker beside it."""
    photos_dir = Path(photos_dir)
    made = (make_web_photos(photos_dir, num_images) if not (photos_dir / "images.jsonl").is_file()
            else {"root": str(photos_dir), "num_images": sum(1 for _ in (photos_dir / "images.jsonl").open())})
    kinds = [("images", False), ("images.jsonl", False), ("shards/{00000..00001}.tar", False), ("images.jsonl", True),
             (None, False)]  # (source, views made in this process); None: the torchvision baseline
    cases = [(n, source, in_process) for n in workers for source, in_process in kinds]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs: dict[tuple, list[dict]] = {case: [] for case in cases}
        for _ in range(repeats):
            for n, source, in_process in cases:
                runs[(n, source, in_process)].append(
                    measure_torchvision_baseline(photos_dir, n, batch_size, batches, image_size) if source is None
                    else measure_pipeline(photos_dir, source, n, batch_size, batches, image_size, image_size,
                                          in_process))
    finally:
        torch.set_num_threads(threads)
    rows = []
    for case in cases:
        ordered = sorted(runs[case], key=lambda r: r["images_per_s"])
        rows.append({**ordered[len(ordered) // 2],
                     "runs_images_per_s_per_worker": [round(r["images_per_s_per_worker"], 1) for r in runs[case]]})
    result = {"photos": made, "image_size": image_size, "tokenizer_image_size": image_size, "batch_size": batch_size,
              "repeats": repeats, "cores": os.cpu_count(), "machine": platform.processor() or platform.machine(),
              "torch": torch.__version__, "results": rows}
    if out_json is not None:
        write_json(result, out_json)
    return result
