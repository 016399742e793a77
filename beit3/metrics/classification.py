"""Classification metrics: top-k accuracy (ImageNet) and plain accuracy (NLVR2), in percent."""
from __future__ import annotations

from typing import Sequence

import torch


def topk_accuracy(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1, 5)) -> list[float]:
    """Percentage of rows whose target class is among the ``k`` highest logits, for each ``k`` in ``topk``."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, C) and target (N,); got {tuple(logits.shape)} and {tuple(target.shape)}")
    if logits.shape[0] == 0:
        raise ValueError("topk_accuracy needs at least one example")
    if max(topk) > logits.shape[1]:
        raise ValueError(f"top-{max(topk)} accuracy needs at least {max(topk)} classes, got {logits.shape[1]}")
    ranked = logits.topk(max(topk), dim=1).indices
    hits = ranked == target.view(-1, 1)
    return [hits[:, :k].any(dim=1).float().mean().item() * 100.0 for k in topk]


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Percentage of argmax predictions equal to ``labels`` (NLVR2 dev/test-P accuracy)."""
    return topk_accuracy(logits, labels, topk=(1,))[0]
