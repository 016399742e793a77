"""NLVR2: cross-entropy on ``BEiT3ForVisualReasoning`` over (image pair, statement); evaluation by accuracy."""
from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from beit3.metrics import accuracy

from .data import open_image
from .task import EvalResult, FinetuneTask, TaskContext


class NLVR2Task(FinetuneTask):
    """Items ``{image_path, image2_path, text_segment, label, identifier}`` (label 1 = the statement is true)."""

    name = "nlvr2"
    default_model = "beit3_base_patch16_224_nlvr2"
    metric = "accuracy"
    indexes = {"train": ["nlvr2.train.index.jsonl"], "val": "nlvr2.dev.index.jsonl", "test": "nlvr2.test-P.index.jsonl"}
    required_keys = ("image_path", "image2_path", "text_segment", "label")

    def _sample(self, ctx: TaskContext, transform: Callable, item: dict) -> dict:
        tokens, mask = ctx.text(item["text_segment"])
        return {"image_a": transform(open_image(ctx.root, item["image_path"])),
                "image_b": transform(open_image(ctx.root, item["image2_path"])),
                "text": tokens, "padding_mask": mask, "label": int(item["label"])}

    def train_sample(self, ctx: TaskContext, transform: Callable, item: dict, rng: random.Random) -> dict:
        return self._sample(ctx, transform, item)

    def eval_sample(self, ctx: TaskContext, transform: Callable, item: dict, rng: random.Random) -> dict:
        return self._sample(ctx, transform, item)

    def _logits(self, model: nn.Module, batch: dict) -> torch.Tensor:
        return model(image_a=batch["image_a"], image_b=batch["image_b"], text_description=batch["text"],
                     padding_mask=batch["padding_mask"])

    def training_loss(self, model: nn.Module, batch: dict, ctx: TaskContext) -> tuple[torch.Tensor, dict]:
        logits = self._logits(model, batch)
        loss = F.cross_entropy(logits.float(), batch["label"])
        return loss, {"num_samples": logits.shape[0], "train_accuracy": accuracy(logits.detach(), batch["label"])}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict, ctx: TaskContext) -> list[dict]:
        logits = self._logits(model, batch).float().cpu()
        return [{"logits": row, "label": int(label)} for row, label in zip(logits, batch["label"])]

    def score(self, model: nn.Module, records: list[dict], ctx: TaskContext, split: str) -> EvalResult:
        logits = torch.stack([r["logits"] for r in records])
        labels = torch.tensor([r["label"] for r in records])
        return EvalResult({"accuracy": accuracy(logits, labels), "num_examples": float(len(records))})
