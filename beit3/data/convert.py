"""Converters from public raw dataset releases to a BEiT-3 data root (index files + linked image folders).

Each converter reads the layout of the public release under ``src`` and writes the official index files to
``out``; the image folders of ``src`` are symlinked into ``out`` so that every ``image_path`` resolves relative to
``out``, and the text tokenizer is copied to ``out/beit3.spm``. The result is used as ``data.root`` like the demo.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Callable

from beit3.data import indexes
from beit3.data.readers import list_image_folder
from beit3.text import TextTokenizer

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


def _read_json(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"expected raw file '{path}' does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"raw file '{path}' is not valid JSON: {err}") from err


def link_image_folders(src: Path, out: Path, names: list[str]) -> None:
    """Symlink ``src/NAME`` into ``out`` for each top-level image folder, so index paths resolve under ``out``."""
    if src.resolve() == out.resolve():
        return
    for name in sorted(set(names)):
        target, link = src / name, out / name
        if target.exists() and not link.exists():
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target.resolve(), target_is_directory=target.is_dir())


def _karpathy_images(src: Path, json_name: str) -> list[dict]:
    data = _read_json(src / json_name)
    if "images" not in data:
        raise ValueError(f"raw file '{src / json_name}' has no 'images' list")
    return data["images"]


def convert_coco_karpathy(src: Path, out: Path, tokenizer: TextTokenizer) -> dict[str, int]:
    """``dataset_coco.json`` (+ ``train2014/``, ``val2014/``) -> ``coco_retrieval.*`` and ``coco_captioning.*``."""
    images = _karpathy_images(src, "dataset_coco.json")
    counts = {}
    for split, raw_splits in KARPATHY_SPLITS.items():
        chosen = [im for im in images if im["split"] in raw_splits]
        entries = [(f"{im['filepath']}/{im['filename']}", im["cocoid"], [s["raw"].strip() for s in im["sentences"]])
                   for im in chosen]
        counts[f"coco_retrieval.{split}.jsonl"] = indexes.write_jsonl(
            out / f"coco_retrieval.{split}.jsonl", indexes.retrieval_items([(p, c) for p, _, c in entries], tokenizer))
        counts[f"coco_captioning.{split}.jsonl"] = indexes.write_jsonl(
            out / f"coco_captioning.{split}.jsonl", indexes.captioning_items(entries, split == "train", tokenizer))
        if split != "train":
            (out / f"coco_karpathy_{split}_gt.json").write_text(json.dumps(indexes.caption_ground_truth(entries)))
        counts.update(_write_caption_corpus(out, "coco_captions", split, [c for _, _, caps in entries for c in caps]))
    link_image_folders(src, out, [im["filepath"] for im in images])
    return counts


def _write_caption_corpus(out: Path, stem: str, split: str, captions: list[str]) -> dict[str, int]:
    """The captions of a split as a plain corpus, one per line (the pretraining text stream and its held-out
    counterpart): ``STEM.txt`` for train, ``STEM.val.txt`` for val."""
    if split not in ("train", "val"):
        return {}
    name = f"{stem}.txt" if split == "train" else f"{stem}.val.txt"
    (out / name).write_text("".join(c.replace("\n", " ") + "\n" for c in captions if c))
    return {name: len(captions)}


def convert_flickr30k_karpathy(src: Path, out: Path, tokenizer: TextTokenizer) -> dict[str, int]:
    """``dataset_flickr30k.json`` (+ ``flickr30k-images/``) -> ``flickr30k.{train,val,test}.jsonl``."""
    images = _karpathy_images(src, "dataset_flickr30k.json")
    counts = {}
    for split, raw_splits in KARPATHY_SPLITS.items():
        entries = [(f"flickr30k-images/{im['filename']}", [s["raw"].strip() for s in im["sentences"]])
                   for im in images if im["split"] in raw_splits]
        counts[f"flickr30k.{split}.jsonl"] = indexes.write_jsonl(
            out / f"flickr30k.{split}.jsonl", indexes.retrieval_items(entries, tokenizer))
        counts.update(_write_caption_corpus(out, "flickr30k_captions", split, [c for _, caps in entries for c in caps]))
    link_image_folders(src, out, ["flickr30k-images"])
    return counts


VQA_QUESTION_FILES = {"train": "train2014", "val": "val2014", "test": "test2015", "test-dev": "test-dev2015"}


def convert_vqav2(src: Path, out: Path, tokenizer: TextTokenizer, min_answer_count: int = 9,
                  rest_val_images: int = 1000, seed: int = 0) -> dict[str, int]:
    """VQAv2 questions/annotations -> ``vqa.{train,val,test,test-dev,trainable_val,rest_val}.jsonl`` +
    ``answer2label.txt`` (normalised ``multiple_choice_answer`` of train+val seen >= ``min_answer_count`` times).
    Val images are shuffled with ``seed``: ``rest_val_images`` of them form rest_val, the others trainable_val."""
    annotations = {}
    for split in ("train", "val"):
        data = _read_json(src / f"v2_mscoco_{VQA_QUESTION_FILES[split]}_annotations.json")
        annotations.update({a["question_id"]: a for a in data["annotations"]})
    answer2label = indexes.build_answer_vocab((a["multiple_choice_answer"] for a in annotations.values()),
                                              min_answer_count)
    indexes.write_answer2label(out / "answer2label.txt", answer2label)
    counts, per_split = {"answers": len(answer2label)}, {}
    for split, coco_name in VQA_QUESTION_FILES.items():
        path = src / f"v2_OpenEnded_mscoco_{coco_name}_questions.json"
        if split.startswith("test") and not path.is_file():
            continue
        image_folder = "test2015" if split.startswith("test") else coco_name
        items = []
        for q in _read_json(path)["questions"]:
            ann = annotations.get(q["question_id"]) if not split.startswith("test") else None
            answers = [a["answer"] for a in ann["answers"]] if ann else None
            image_path = f"{image_folder}/COCO_{image_folder}_{q['image_id']:012d}.jpg"
            item = indexes.vqa_item(image_path, q["question"], answers, q["question_id"], answer2label, tokenizer)
            if item is not None:
                items.append(item)
        per_split[split] = items
        counts[f"vqa.{split}.jsonl"] = indexes.write_jsonl(out / f"vqa.{split}.jsonl", items)
    val_images = sorted({it["image_path"] for it in per_split["val"]})
    random.Random(seed).shuffle(val_images)
    rest = set(val_images[:rest_val_images])
    for name, keep in (("rest_val", True), ("trainable_val", False)):
        counts[f"vqa.{name}.jsonl"] = indexes.write_jsonl(
            out / f"vqa.{name}.jsonl", (it for it in per_split["val"] if (it["image_path"] in rest) == keep))
    link_image_folders(src, out, ["train2014", "val2014", "test2015"])
    return counts


NLVR2_SPLITS = {"train": "train", "dev": "dev", "test1": "test-P"}


def convert_nlvr2(src: Path, out: Path, tokenizer: TextTokenizer) -> dict[str, int]:
    """NLVR2 ``{train,dev,test1}.json`` (JSON lines) -> ``nlvr2.{train,dev,test-P}.index.jsonl``.
    Images: ``images/train/{directory}/`` for train, ``dev/`` and ``test1/`` otherwise, as the public release."""
    counts = {}
    for raw_split, split in NLVR2_SPLITS.items():
        path = src / f"{raw_split}.json"
        if not path.is_file():
            raise FileNotFoundError(f"expected raw file '{path}' does not exist")
        items = []
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                folder = f"images/train/{row['directory']}" if raw_split == "train" else raw_split
                stem = "-".join(row["identifier"].split("-")[:-1])
                label = {"True": True, "False": False}[str(row["label"])]
                items.append(indexes.nlvr2_item(f"{folder}/{stem}-img0.png", f"{folder}/{stem}-img1.png",
                                                row["sentence"], label, row["identifier"], tokenizer))
            except (json.JSONDecodeError, KeyError) as err:
                raise ValueError(f"raw file '{path}' line {number}: bad NLVR2 record ({err!r})") from err
        counts[f"nlvr2.{split}.index.jsonl"] = indexes.write_jsonl(out / f"nlvr2.{split}.index.jsonl", items)
    link_image_folders(src, out, ["images", "dev", "test1"])
    return counts


def convert_imagenet(src: Path, out: Path, tokenizer: TextTokenizer | None = None) -> dict[str, int]:
    """ImageNet ``train/CLASS/*.JPEG`` and ``val/CLASS/*.JPEG`` -> ``imagenet.{train,val}.index.jsonl``
    (labels = sorted train class names) + ``imagenet.classes.txt``."""
    train, classes = list_image_folder(src / "train")
    val, val_classes = list_image_folder(src / "val")
    unknown = sorted(set(val_classes) - set(classes))
    if unknown:
        raise ValueError(f"'{src / 'val'}' has classes missing from train: {unknown[:5]}")
    label_of = {name: i for i, name in enumerate(classes)}
    counts = {}
    for split, samples, names in (("train", train, classes), ("val", val, val_classes)):
        items = [{"image_path": f"{split}/{path}", "label": label_of[names[label]]} for path, label in samples]
        counts[f"imagenet.{split}.index.jsonl"] = indexes.write_jsonl(out / f"imagenet.{split}.index.jsonl", items)
    (out / "imagenet.classes.txt").write_text("\n".join(classes) + "\n")
    link_image_folders(src, out, ["train", "val"])
    return counts


CONVERTERS: dict[str, Callable[..., dict[str, int]]] = {
    "coco_karpathy": convert_coco_karpathy,
    "flickr30k_karpathy": convert_flickr30k_karpathy,
    "vqav2": convert_vqav2,
    "nlvr2": convert_nlvr2,
    "imagenet": convert_imagenet,
}


def convert_dataset(name: str, src: str | Path, out: str | Path, tokenizer_path: str | Path | None,
                    **options) -> dict[str, int]:
    """Run converter ``name`` and copy the tokenizer to ``out/beit3.spm``; returns index line counts."""
    if name not in CONVERTERS:
        raise ValueError(f"unknown dataset '{name}', choose from {sorted(CONVERTERS)}")
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise FileNotFoundError(f"raw data folder '{src}' does not exist")
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = TextTokenizer.from_file(tokenizer_path) if tokenizer_path else None
    if tokenizer is None and name != "imagenet":
        raise ValueError(f"dataset '{name}' needs a text tokenizer (--tokenizer SPM_MODEL)")
    counts = CONVERTERS[name](src, out, tokenizer, **options)
    if tokenizer_path and not (out / "beit3.spm").exists():
        shutil.copyfile(tokenizer_path, out / "beit3.spm")
    return counts

