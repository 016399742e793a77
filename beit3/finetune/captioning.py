"""COCO captioning as uni-directional masked language modelling on ``BEiT3ForCaptioning``: the official training-time
masking and smoothed loss, beam-search decoding and BLEU-4/CIDEr against the COCO-format ground truth, plus the COCO
caption results file ``[{"image_id", "caption"}]``."""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from beit3.generation import beam_search
from beit3.metrics import caption_scores
from beit3.models.tasks import captioning_loss

from .data import open_image
from .task import EvalResult, FinetuneTask, TaskContext

CAPTION_MAX_LEN = 32


@dataclass
class CaptioningOptions:
    """Official recipe: mask 0.7 of the caption, label smoothing 0.1, drop the worst 20% token losses after step
    12000 (``drop_worst_after`` < 0 never)."""

    mask_ratio: float = 0.7
    label_smoothing: float = 0.1
    drop_worst_ratio: float = 0.2
    drop_worst_after: int = 12000

    def __post_init__(self):
        if not 0 < self.mask_ratio <= 1:
            raise ValueError(f"mask_ratio must be in (0, 1], got {self.mask_ratio}")
        if not 0 <= self.label_smoothing < 1 or not 0 <= self.drop_worst_ratio < 1:
            raise ValueError("label_smoothing and drop_worst_ratio must be in [0, 1)")


def mask_caption(ids: Sequence[int], max_len: int, mask_ratio: float, mask_id: int, vocab_size: int,
                 pad_id: int, rng: random.Random, bos_id: int = 0, eos_id: int = 2) -> dict:
    """Official training input: text = [bos] + ids + [eos] (at most ``max_len``), n = its length; k = max(1,
    min(int(mask_ratio * n + 0.5), n - 1)) distinct positions from 1..n-1 (never bos; eos may be picked), each 80%
    ``<mask>``, 10% a random id in [3, vocab_size - 1], 10% kept. Returns ``text``, ``padding_mask``,
    ``masked_pos`` (bool) and ``targets`` (the original ids at masked positions, pad elsewhere), all length max_len."""
    tokens = [bos_id, *list(ids)[: max_len - 2], eos_id]
    n = len(tokens)
    k = max(1, min(int(mask_ratio * n + 0.5), n - 1))
    positions = rng.sample(range(1, n), k)
    text = list(tokens)
    for pos in positions:
        draw = rng.random()
        if draw < 0.8:
            text[pos] = mask_id
        elif draw < 0.9:
            text[pos] = rng.randint(3, vocab_size - 1)
    masked = torch.zeros(max_len, dtype=torch.bool)
    masked[positions] = True
    padded = torch.full((max_len,), pad_id, dtype=torch.long)
    padded[:n] = torch.tensor(text)
    targets = torch.full((max_len,), pad_id, dtype=torch.long)
    targets[:n] = torch.tensor(tokens)
    targets[~masked] = pad_id
    padding_mask = torch.ones(max_len, dtype=torch.bool)
    padding_mask[:n] = False
    return {"text": padded, "padding_mask": padding_mask, "masked_pos": masked, "targets": targets}


def read_references(path: str | Path) -> dict[int, list[str]]:
    """Reference captions by image id from a COCO-format annotation file (``annotations``: image_id, caption)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"caption reference file '{path}' does not exist")
    try:
        data = json.loads(path.read_text())
        refs: dict[int, list[str]] = {}
        for ann in data["annotations"]:
            refs.setdefault(int(ann["image_id"]), []).append(str(ann["caption"]))
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"'{path}' is not a COCO caption annotation file (annotations: image_id, caption): {err}") from err
    return refs


class CaptioningTask(FinetuneTask):
    """Train items ``{image_path, text_segment, image_id}`` (one per caption); val/test items one per image."""

    name = "coco_captioning"
    default_model = "beit3_base_patch16_480_captioning"
    metric = "CIDEr"
    indexes = {"train": ["coco_captioning.train.jsonl"], "val": "coco_captioning.val.jsonl",
               "test": "coco_captioning.test.jsonl"}
    references = {"val": "coco_karpathy_val_gt.json", "test": "coco_karpathy_test_gt.json"}
    max_text_len = CAPTION_MAX_LEN
    required_keys = ("image_path", "image_id")
    options_type = CaptioningOptions

    def train_sample(self, ctx: TaskContext, transform: Callable, item: dict, rng: random.Random) -> dict:
        if not item.get("text_segment"):
            raise ValueError(f"captioning train item for image_id={item['image_id']} has no text_segment")
        tok = ctx.tokenizer
        sample = mask_caption(item["text_segment"], ctx.max_text_len, ctx.options.mask_ratio, tok.mask_id,
                              tok.vocab_size, tok.pad_id, rng, tok.bos_id, tok.eos_id)
        sample["image"] = transform(open_image(ctx.root, item["image_path"]))
        return sample

    def eval_sample(self, ctx: TaskContext, transform: Callable, item: dict, rng: random.Random) -> dict:
        return {"image": transform(open_image(ctx.root, item["image_path"])), "image_id": int(item["image_id"])}

    def training_loss(self, model: nn.Module, batch: dict, ctx: TaskContext) -> tuple[torch.Tensor, dict]:
        masked = batch["masked_pos"]
        logits, _ = model(image=batch["image"], text_ids=batch["text"], padding_mask=batch["padding_mask"],
                          language_masked_pos=masked)
        targets = batch["targets"][masked]
        opts: CaptioningOptions = ctx.options
        drop = opts.drop_worst_ratio if 0 <= opts.drop_worst_after <= int(batch["step"]) else 0.0
        loss = captioning_loss(logits, targets, opts.label_smoothing, drop)
        accuracy = (logits.detach().argmax(dim=1) == targets).float().mean() * 100
        return loss, {"num_samples": masked.shape[0], "num_tokens": int(masked.sum()), "masked_token_accuracy": accuracy}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict, ctx: TaskContext) -> list[dict]:
        captions = beam_search(model, batch["image"], ctx.tokenizer, num_beams=ctx.num_beams,
                               max_len=ctx.max_caption_len, length_penalty=ctx.length_penalty)
        return [{"image_id": int(i), "caption": ctx.tokenizer.decode(c.token_ids)}
                for i, c in zip(batch["image_id"], captions)]

    def score(self, model: nn.Module, records: list[dict], ctx: TaskContext, split: str) -> EvalResult:
        results = list({r["image_id"]: r for r in records}.values())  # one caption per image
        metrics = {"num_images": float(len(results))}
        if split in ctx.references:
            refs = read_references(ctx.root / ctx.references[split])
            scores = caption_scores({r["image_id"]: r["caption"] for r in results}, refs, backend=ctx.caption_backend)
            metrics.update(scores)
        return EvalResult(metrics, [{"image_id": r["image_id"], "caption": r["caption"]} for r in results],
                          "caption_results")
