"""Builders for the official BEiT-3 JSONL index layouts, shared by the demo generator and the raw-format converters.

Layouts (one JSON object per line, image paths relative to the data root):
- retrieval ``{image_path, text_segment, image_id}`` one line per caption, ``image_id`` = running index of distinct
  images in the split (``coco_retrieval.*.jsonl``, ``flickr30k.*.jsonl``);
- captioning ``{image_path, text_segment, image_id}``: train one line per caption, val/test one line per image with
  ``text_segment: null`` (``coco_captioning.*.jsonl``);
- VQA ``{image_path, text_segment, labels, scores, qid}`` + ``answer2label.txt`` (lines ``{"answer", "label"}``);
- NLVR2 ``{image_path, image2_path, text_segment, label, identifier}``;
- classification ``{image_path, label}`` (``imagenet.*.index.jsonl``).
"""
from __future__ import annotations

import re
from collections import Counter
from pathlib import Path
from typing import Iterable, Sequence

from beit3.jsonl import write_jsonl  # noqa: F401  (used as indexes.write_jsonl)
from beit3.text import TextTokenizer




def retrieval_items(images: Sequence[tuple[str, Sequence[str]]], tokenizer: TextTokenizer) -> list[dict]:
    """One item per caption of ``images`` = [(image_path, captions)]; ``image_id`` counts distinct images."""
    return [
        {"image_path": path, "text_segment": tokenizer.encode(caption), "image_id": image_id}
        for image_id, (path, caps) in enumerate(images)
        for caption in caps
    ]


def captioning_items(images: Sequence[tuple[str, int, Sequence[str]]], train: bool, tokenizer: TextTokenizer) -> list[dict]:
    """Captioning items for ``images`` = [(image_path, image_id, captions)]; eval splits carry no text."""
    if train:
        return [{"image_path": p, "text_segment": tokenizer.encode(c), "image_id": i} for p, i, caps in images for c in caps]
    return [{"image_path": p, "text_segment": None, "image_id": i} for p, i, _ in images]


def caption_ground_truth(images: Sequence[tuple[str, int, Sequence[str]]]) -> dict:
    """COCO-format caption annotations (``images`` and ``annotations``) for BLEU/CIDEr evaluation."""
    annotations = [{"image_id": i, "id": k, "caption": c} for k, (_, i, c) in
                   enumerate((p, i, c) for p, i, caps in images for c in caps)]
    return {"images": [{"id": i, "file_name": p} for p, i, _ in images], "annotations": annotations}


_PUNCT = re.compile(r"[;/\[\]\"{}()=+\\_\-><@`,?!*#%^&$~|:']")
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_ARTICLES = {"a", "an", "the"}


def normalize_answer(answer: str) -> str:
    """VQA answer normalisation: lower case, punctuation out, number words to digits, articles dropped."""
    text = _PUNCT.sub(" ", answer.lower().replace("\n", " ").replace("\t", " "))
    text = re.sub(r"(?<!\d)\.(?!\d)", "", text)
    words = [_NUMBERS.get(w, w) for w in text.split() if w not in _ARTICLES]
    return " ".join(words)


def vqa_soft_score(count: int) -> float:
    """Soft VQA target for an answer given by ``count`` of the 10 annotators: 0, 0.3, 0.6, 0.9, then 1.0."""
    return (0.0, 0.3, 0.6, 0.9)[count] if count < 4 else 1.0


def build_answer_vocab(answers: Iterable[str], min_count: int) -> dict[str, int]:
    """``answer2label`` from normalised answers occurring at least ``min_count`` times (most frequent first)."""
    counts = Counter(normalize_answer(a) for a in answers)
    kept = sorted((a for a, c in counts.items() if c >= min_count and a), key=lambda a: (-counts[a], a))
    return {a: i for i, a in enumerate(kept)}


def write_answer2label(path: str | Path, answer2label: dict[str, int]) -> None:
    """``answer2label.txt`` as the official code reads it: one ``{"answer", "label"}`` object per line."""
    write_jsonl(path, ({"answer": a, "label": label} for a, label in answer2label.items()))


def vqa_item(image_path: str, question: str, answers: Sequence[str] | None, qid: int,
             answer2label: dict[str, int], tokenizer: TextTokenizer) -> dict | None:
    """VQA item with soft labels; None when annotated answers exist but none is in the vocabulary (dropped)."""
    labels: list[int] = []
    scores: list[float] = []
    if answers is not None:
        for answer, count in sorted(Counter(normalize_answer(a) for a in answers).items()):
            if answer in answer2label:
                labels.append(answer2label[answer])
                scores.append(vqa_soft_score(count))
        if not labels:
            return None
    return {"image_path": image_path, "text_segment": tokenizer.encode(question), "labels": labels,
            "scores": scores, "qid": qid}


def nlvr2_item(image_path: str, image2_path: str, sentence: str, label: bool, identifier: str,
               tokenizer: TextTokenizer) -> dict:
    """NLVR2 item: two images, one statement, label 1 (true) or 0 (false)."""
    return {"image_path": image_path, "image2_path": image2_path, "text_segment": tokenizer.encode(sentence),
            "label": int(label), "identifier": identifier}
