"""ImageNet classification: mixup/cutmix + label smoothing (timm ``Mixup``) with ``SoftTargetCrossEntropy`` on
``BEiT3ForImageClassification``; evaluation by top-1/top-5 accuracy."""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from timm.data import Mixup
from timm.data.mixup import mixup_target
from timm.loss import SoftTargetCrossEntropy
from torch import nn

from .data import open_image
from .task import EvalResult, FinetuneTask, TaskContext


@dataclass
class ClassificationOptions:
    """Official recipe: mixup 0.8, cutmix 1.0 (switching with probability 0.5), label smoothing 0.1. Mixup/cutmix
    need an even per-rank batch; both 0 train on label-smoothed one-hot targets."""

    mixup: float = 0.8
    cutmix: float = 1.0
    mixup_prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    def __post_init__(self):
        for key in ("mixup", "cutmix", "mixup_prob", "switch_prob", "label_smoothing"):
            if getattr(self, key) < 0:
                raise ValueError(f"{key} must be >= 0, got {getattr(self, key)}")


class ImageNetTask(FinetuneTask):
    """Items ``{image_path, label}``; ``num_classes`` defaults to the largest train label + 1."""

    name = "imagenet"
    default_model = "beit3_base_patch16_224_imageclassification"
    metric = "acc1"
    indexes = {"train": ["imagenet.train.index.jsonl"], "val": "imagenet.val.index.jsonl",
               "test": "imagenet.val.index.jsonl"}
    required_keys = ("image_path", "label")
    options_type = ClassificationOptions

    def __init__(self):
        self.loss_fn = SoftTargetCrossEntropy()

    def model_kwargs(self, ctx: TaskContext, train_items: Sequence[dict]) -> dict:
        return {"num_classes": max(int(item["label"]) for item in train_items) + 1}

    def _sample(self, ctx: TaskContext, transform: Callable, item: dict) -> dict:
        return {"image": transform(open_image(ctx.root, item["image_path"])), "label": int(item["label"])}

    def train_sample(self, ctx: TaskContext, transform: Callable, item: dict, rng: random.Random) -> dict:
        return self._sample(ctx, transform, item)

    def eval_sample(self, ctx: TaskContext, transform: Callable, item: dict, rng: random.Random) -> dict:
        return self._sample(ctx, transform, item)

    def batch_transform(self, ctx: TaskContext, model: nn.Module) -> Optional[Callable[[dict], dict]]:
        opts: ClassificationOptions = ctx.options
        num_classes = model.init_kwargs["num_classes"]
        if opts.mixup > 0 or opts.cutmix > 0:
            mix = Mixup(mixup_alpha=opts.mixup, cutmix_alpha=opts.cutmix, prob=opts.mixup_prob,
                        switch_prob=opts.switch_prob, mode="batch", label_smoothing=opts.label_smoothing,
                        num_classes=num_classes)
        else:
            mix = None

        def apply(batch: dict) -> dict:
            if mix is not None:
                batch["image"], batch["target"] = mix(batch["image"], batch["label"])
            else:
                batch["target"] = mixup_target(batch["label"], num_classes, smoothing=opts.label_smoothing)
            return batch

        return apply

    def training_loss(self, model: nn.Module, batch: dict, ctx: TaskContext) -> tuple[torch.Tensor, dict]:
        logits = model(image=batch["image"])
        return self.loss_fn(logits.float(), batch["target"].float()), {"num_samples": logits.shape[0]}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict, ctx: TaskContext) -> list[dict]:
        """Top-5 class ids (top-k accuracy needs no more) and the label of each image."""
        logits = model(image=batch["image"]).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices.cpu()
        return [{"top": row.tolist(), "label": int(label)} for row, label in zip(top, batch["label"])]

    def score(self, model: nn.Module, records: list[dict], ctx: TaskContext, split: str) -> EvalResult:
        ks = (1, 5) if len(records[0]["top"]) >= 5 else (1,)
        metrics = {f"acc{k}": 100.0 * sum(r["label"] in r["top"][:k] for r in records) / len(records) for k in ks}
        metrics["num_examples"] = float(len(records))
        return EvalResult(metrics)
