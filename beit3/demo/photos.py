"""A small image-text release of real photographs in the public COCO Karpathy raw format (``dataset_coco.json`` +
``train2014/`` / ``val2014/``), made from the photographs that scikit-image and scikit-learn ship (no download).

Every image shows random crops of one or two photographs (side by side) and has five captions naming them, e.g.
"a cat on the left and a rocket on the right". It is the real-image counterpart of the procedural demo data:
``tools/convert_dataset.py coco_karpathy`` turns it into a data root like any COCO release, and the same pretraining,
probe and fine-tuning configs run on it. Beside the release: ``captions.txt`` / ``words.txt`` (the train captions
and all caption words, for ``tools/train_text_tokenizer.py``) and ``probe_words.json`` (the object nouns).
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from .data import corpus_words


def _skimage(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        import skimage.data

        return skimage.data.stereo_motorcycle()[0] if name == "stereo_motorcycle" else getattr(skimage.data, name)()

    return load


def _sklearn(name: str) -> Callable[[], np.ndarray]:
    def load() -> np.ndarray:
        from sklearn.datasets import load_sample_image

        return load_sample_image(name)

    return load


# caption noun -> loader of the photograph (all ship inside the scikit-image / scikit-learn wheels)
PHOTOS: dict[str, Callable[[], np.ndarray]] = {
    "cat": _skimage("chelsea"), "coffee": _skimage("coffee"), "rocket": _skimage("rocket"),
    "astronaut": _skimage("astronaut"), "galaxy": _skimage("hubble_deep_field"), "retina": _skimage("retina"),
    "tissue": _skimage("immunohistochemistry"), "motorcycle": _skimage("stereo_motorcycle"),
    "flower": _sklearn("flower.jpg"), "temple": _sklearn("china.jpg"),
}
SPLITS = (("train", "train2014", 0.8), ("val", "val2014", 0.1), ("test", "val2014", 0.1))


def _article(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def random_crop(photo: Image.Image, width: int, height: int, rng: random.Random) -> Image.Image:
    """A random crop of ``photo`` with the aspect of ``width x height`` (35-100% of the largest such crop)."""
    aspect = width / height
    max_w = min(photo.width, photo.height * aspect)
    scale = rng.uniform(0.35, 1.0) ** 0.5
    w, h = max(8, int(max_w * scale)), max(8, int(max_w * scale / aspect))
    left, top = rng.randint(0, photo.width - w), rng.randint(0, photo.height - h)
    return photo.crop((left, top, left + w, top + h)).resize((width, height), Image.Resampling.BICUBIC)


def _captions(nouns: list[str], rng: random.Random) -> list[str]:
    a = [_article(n) for n in nouns]
    if len(a) == 1:
        options = [f"a photo of {a[0]}", a[0], f"a close-up photo of {a[0]}", f"an image showing {a[0]}",
                   f"a picture of {a[0]}"]
    else:
        options = [f"{a[0]} on the left and {a[1]} on the right", f"{a[1]} on the right and {a[0]} on the left",
                   f"{a[0]} next to {a[1]}", f"two photos : {a[0]} and {a[1]}", f"a picture of {a[0]} beside {a[1]}"]
    rng.shuffle(options)
    return options


def make_photo_release(out: str | Path, num_images: int = 600, image_size: int = 128, seed: int = 0) -> dict:
    """Write the release to ``out`` and return a summary; deterministic for a seed."""
    if num_images < 20:
        raise ValueError(f"num_images must be at least 20 (two images per val/test split), got {num_images}")
    out = Path(out)
    rng = random.Random(seed)
    photos = {noun: Image.fromarray(np.asarray(load())).convert("RGB") for noun, load in PHOTOS.items()}
    nouns = sorted(photos)
    bounds, start = [], 0
    for split, folder, share in SPLITS:
        count = int(round(share * num_images)) if split != "test" else num_images - start
        bounds.append((split, folder, start, start + count))
        start += count
    images, train_captions, all_captions = [], [], []
    for split, folder, first, last in bounds:
        (out / folder).mkdir(parents=True, exist_ok=True)
        for cocoid in range(first, last):
            shown = rng.sample(nouns, 1 if rng.random() < 1 / 3 else 2)
            canvas = Image.new("RGB", (image_size, image_size))
            width = image_size // len(shown)
            for k, noun in enumerate(shown):
                canvas.paste(random_crop(photos[noun], width, image_size, rng), (k * width, 0))
            name = f"COCO_{folder}_{cocoid:012d}.jpg"
            canvas.save(out / folder / name, format="JPEG", quality=90)
            caps = _captions(shown, rng)
            images.append({"filepath": folder, "filename": name, "cocoid": cocoid, "split": split,
                           "sentences": [{"raw": c, "tokens": c.split()} for c in caps]})
            all_captions += caps
            if split == "train":
                train_captions += caps
    (out / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    (out / "captions.txt").write_text("\n".join(train_captions) + "\n")
    (out / "words.txt").write_text("\n".join(corpus_words(all_captions)) + "\n")
    (out / "probe_words.json").write_text(json.dumps({"object": nouns}) + "\n")
    return {"images": len(images), "splits": {s: b - a for s, _, a, b in bounds}, "nouns": nouns}
