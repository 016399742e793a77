"""Map-style pretraining sources: ``len(source)`` samples, ``source.load(i)`` -> ``{"image": PIL, "text_ids": [..]}``.

A source spec (a string relative to the data root) picks the reader:
- ``*.jsonl``: a BEiT-3 index file; images at ``image_path`` relative to the root, text from ``text_segment``;
- a folder with ``*.tar`` files, a brace pattern (``shards/{00000..00003}.tar``) or a glob: img2dataset shards
  (``key.jpg`` + ``key.txt``), read through :class:`TarShardIndex`;
- any other folder: an image-classification tree ``CLASS/*.jpg`` (images only);
- for text, plain text files (one sentence or document per line).
Every source has ``name`` and ``location`` (for messages). ``load`` raises :class:`SkipSample` for unusable samples; the mixer replaces and counts them.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from beit3.data.readers import (MAX_TEXT_BYTES, SkipSample, TarShardIndex, TextLines, decode_image, expand_shards, load_image)
from beit3.jsonl import read_jsonl
from beit3.text import TextTokenizer
from tokenizer.precomputed import list_images


def _is_shard_spec(spec: str, root: Path) -> bool:
    path = root / spec
    if spec.endswith(".tar") or "{" in spec:
        return True
    return path.is_dir() and any(path.glob("*.tar"))


def _text_ids(ids: list[int] | None, where: str) -> list[int]:
    if not ids:
        raise SkipSample("empty_text", where)
    return ids


class JsonlSource:
    """Samples of a BEiT-3 JSONL index (``image_path`` and/or ``text_segment``)."""

    def __init__(self, name: str, path: Path, root: Path, with_image: bool, with_text: bool):
        self.name, self.path, self.root, self.location = name, path, root, str(path)
        self.with_image, self.with_text = with_image, with_text
        self.items = read_jsonl(path)
        needed = [k for k, on in (("image_path", with_image), ("text_segment", with_text)) if on]
        for number, item in enumerate(self.items, 1):
            missing = [k for k in needed if k not in item]
            if missing:
                raise ValueError(f"{name} source '{path}' line {number}: missing key(s) {missing}")

    def __len__(self) -> int:
        return len(self.items)

    def load(self, index: int) -> dict:
        item = self.items[index]
        sample = {}
        if self.with_text:
            sample["text_ids"] = _text_ids(item["text_segment"], f"{self.path} item {index}")
        if self.with_image:
            sample["image"] = load_image(self.root / item["image_path"])
            sample["image_path"] = item["image_path"]
        return sample


class FolderSource:
    """Every image below a folder, at any depth: a flat folder of unlabeled images or a classification tree
    ``CLASS/*.jpg`` (pretraining reads no labels)."""

    def __init__(self, name: str, folder: Path):
        self.name, self.folder, self.location = name, folder, str(folder)
        self.samples = list_images(folder)

    def __len__(self) -> int:
        return len(self.samples)

    def load(self, index: int) -> dict:
        path = self.samples[index]
        return {"image": load_image(self.folder / path), "image_path": path}


class ShardSource:
    """Image-text samples of img2dataset tar shards; captions are tokenized on load."""

    def __init__(self, name: str, shards: Sequence[Path], tokenizer: TextTokenizer | None, with_text: bool):
        self.name, self.tokenizer, self.with_text = name, tokenizer, with_text
        self.location = ", ".join(str(s) for s in shards)
        self.index = TarShardIndex(shards, required=("jpg", "txt") if with_text else ("jpg",))

    def __len__(self) -> int:
        return len(self.index)

    def load(self, index: int) -> dict:
        return self.parse(self.index[index], self.index.describe(index))

    def parse(self, raw: dict, where: str) -> dict:
        """``{"text_ids", "image"}`` of a raw sample (``TarShardIndex`` item); SkipSample when unusable."""
        sample = {}
        if self.with_text:
            if len(raw["txt"]) > MAX_TEXT_BYTES:
                raise SkipSample("overlong_text", f"{where}.txt has {len(raw['txt'])} bytes")
            sample["text_ids"] = _text_ids(self.tokenizer.encode(raw["txt"].decode("utf-8", "replace")), where)
        sample["image"] = decode_image(raw["jpg"], where)
        return sample


class CorpusSource:
    """Sentences of plain text files, tokenized on load."""

    def __init__(self, name: str, files: Sequence[Path], tokenizer: TextTokenizer):
        self.name, self.tokenizer, self.location = name, tokenizer, ", ".join(str(f) for f in files)
        self.lines = TextLines(files)

    def __len__(self) -> int:
        return len(self.lines)

    def load(self, index: int) -> dict:
        return {"text_ids": _text_ids(self.tokenizer.encode(self.lines[index]), f"text line {index}")}


def open_image_source(spec: str, root: Path, tokenizer: TextTokenizer | None = None):
    """Image-only source from a JSONL index, shards or an image folder (flat or by class)."""
    if spec.endswith(".jsonl"):
        return JsonlSource("image", root / spec, root, with_image=True, with_text=False)
    if _is_shard_spec(spec, root):
        return ShardSource("image", expand_shards(spec, root), tokenizer, with_text=False)
    return FolderSource("image", root / spec)


def open_pair_source(spec: str, root: Path, tokenizer: TextTokenizer):
    """Image-text source from a retrieval-style JSONL index or img2dataset shards."""
    if spec.endswith(".jsonl"):
        return JsonlSource("pair", root / spec, root, with_image=True, with_text=True)
    if _is_shard_spec(spec, root):
        return ShardSource("pair", expand_shards(spec, root), tokenizer, with_text=True)
    raise ValueError(f"pair source '{spec}' under '{root}' is neither a .jsonl index nor tar shards")


def open_text_source(specs: Sequence[str], root: Path, tokenizer: TextTokenizer) -> CorpusSource:
    """Text source over plain text files."""
    return CorpusSource("text", [root / s for s in specs], tokenizer)
