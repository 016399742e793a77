"""Image-text retrieval (COCO, Flickr30k): CLIP loss on ``BEiT3ForRetrieval``; evaluation by recall@1/5/10 both ways
with image features deduplicated by ``image_id``, optionally re-ranked by the ITM head."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from beit3.metrics import retrieval_recall

from .data import default_collate, open_image
from .task import EvalResult, FinetuneTask, TaskContext


@dataclass
class RetrievalOptions:
    """``rerank_top_k`` > 0 re-ranks each query's contrastive top-k with the ITM head (the model needs
    ``model.overrides.itm: true``). ``patch_drop``: FLIP's patch dropping, this fraction of each training image's
    patches removed before the encoder of the contrastive loss; ``unmasked_tuning_steps``: FLIP's unmasked tuning,
    the last that many steps without dropping."""

    rerank_top_k: int = 0
    patch_drop: float = 0.0
    unmasked_tuning_steps: int = 0

    def __post_init__(self):
        if self.rerank_top_k < 0 or self.unmasked_tuning_steps < 0:
            raise ValueError(f"rerank_top_k and unmasked_tuning_steps must be >= 0, got {self.rerank_top_k} and "
                             f"{self.unmasked_tuning_steps}")
        if not 0.0 <= self.patch_drop < 1.0:
            raise ValueError(f"patch_drop must be in [0, 1), got {self.patch_drop}")

    def drop_at(self, step: int, train_steps: int) -> float:
        """The patch-drop fraction of 0-based training step ``step`` of ``train_steps``."""
        return 0.0 if step >= train_steps - self.unmasked_tuning_steps else self.patch_drop


def _collate(samples: list[dict]) -> dict:
    """Like :func:`default_collate`, except that ``image`` is stacked from the samples that carry one (evaluation
    loads each distinct image once) and ``has_image`` marks them."""
    images = [s.pop("image") for s in samples if "image" in s]
    batch = default_collate(samples)
    if images:
        batch["image"] = torch.stack(images)
    return batch


class RetrievalTask(FinetuneTask):
    """``coco_retrieval`` / ``flickr30k``: items ``{image_path, text_segment, image_id}``, one per caption."""

    default_model = "beit3_base_patch16_384_retrieval"
    metric = "average_score"
    required_keys = ("image_path", "text_segment", "image_id")
    options_type = RetrievalOptions
    collate = staticmethod(_collate)

    def __init__(self, name: str, prefix: str):
        self.name = name
        self.indexes = {"train": [f"{prefix}.train.jsonl"], "val": f"{prefix}.val.jsonl", "test": f"{prefix}.test.jsonl"}

    def train_sample(self, ctx: TaskContext, transform: Callable, item: dict, rng: random.Random) -> dict:
        tokens, mask = ctx.text(item["text_segment"])
        return {"image": transform(open_image(ctx.root, item["image_path"])), "text": tokens, "padding_mask": mask,
                "image_id": int(item["image_id"])}

    def eval_samples(self, ctx: TaskContext, items: list[dict]):
        seen: set = set()
        marked = []
        for item in items:  # the first caption of each image also carries the image
            marked.append({**item, "_first": item["image_id"] not in seen})
            seen.add(item["image_id"])
        return super().eval_samples(ctx, marked)

    def eval_sample(self, ctx: TaskContext, transform: Callable, item: dict, rng: random.Random) -> dict:
        tokens, mask = ctx.text(item["text_segment"])
        sample = {"text": tokens, "padding_mask": mask, "image_id": int(item["image_id"]), "has_image": item["_first"]}
        if item["_first"]:
            sample["image"] = transform(open_image(ctx.root, item["image_path"]))
        return sample

    def training_loss(self, model: nn.Module, batch: dict, ctx: TaskContext) -> tuple[torch.Tensor, dict]:
        drop = ctx.options.drop_at(ctx.step, ctx.train_steps) if ctx.options is not None else 0.0
        loss, _, _ = model(image=batch["image"], text_description=batch["text"], padding_mask=batch["padding_mask"],
                           image_id=batch["image_id"], patch_drop=drop)
        metrics = {"num_samples": batch["text"].shape[0], "logit_scale": model.logit_scale.detach().exp()}
        if ctx.options is not None and ctx.options.patch_drop:
            metrics["patch_drop"] = drop
        return loss, metrics

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict, ctx: TaskContext) -> list[dict]:
        text_feats = model.encode_text(batch["text"], batch["padding_mask"]).float().cpu()
        has_image = batch["has_image"].bool().tolist()
        image_feats = iter(model.encode_image(batch["image"]).float().cpu()) if any(has_image) else iter(())
        images = iter(batch["image"].cpu()) if any(has_image) else iter(())
        rerank = ctx.options is not None and ctx.options.rerank_top_k > 0
        records = []
        for row, first in enumerate(has_image):
            record = {"image_id": int(batch["image_id"][row]), "text_feat": text_feats[row]}
            if first:
                record["image_feat"] = next(image_feats)
                image = next(images)
                if rerank:
                    record["image"] = image
            if rerank:
                record["text"], record["padding_mask"] = batch["text"][row].cpu(), batch["padding_mask"][row].cpu()
            records.append(record)
        return records

    def score(self, model: nn.Module, records: list[dict], ctx: TaskContext, split: str) -> EvalResult:
        firsts = [r for r in records if "image_feat" in r]
        image_ids = torch.tensor([r["image_id"] for r in firsts])
        text_image_ids = torch.tensor([r["image_id"] for r in records])
        scores = torch.stack([r["image_feat"] for r in firsts]) @ torch.stack([r["text_feat"] for r in records]).T
        metrics = retrieval_recall(scores, text_image_ids, image_ids)
        if ctx.options is not None and ctx.options.rerank_top_k > 0:
            device = next(model.parameters()).device
            i2t, t2i = model.rerank(torch.stack([r["image"] for r in firsts]).to(device),
                                    torch.stack([r["text"] for r in records]).to(device),
                                    torch.stack([r["padding_mask"] for r in records]).to(device),
                                    scores.to(device), top_k=ctx.options.rerank_top_k)
            tr = retrieval_recall(i2t.cpu(), text_image_ids, image_ids)
            ir = retrieval_recall(t2i.cpu(), text_image_ids, image_ids)
            itm = {k: v for k, v in tr.items() if k.startswith("tr_")} | {k: v for k, v in ir.items() if k.startswith("ir_")}
            itm["average_score"] = sum(itm.values()) / len(itm)
            metrics = {**{f"itc_{k}": v for k, v in metrics.items()}, **itm}
        metrics["num_images"], metrics["num_texts"] = float(len(firsts)), float(len(records))
        return EvalResult(metrics)
