"""Visual question answering (VQAv2): ``BEiT3ForVisualQuestionAnswering`` and its soft-score BCE loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import BEiT3Config
from ..heads import Pooler, check_batch
from ..task_model import BEiT3TaskModel
from ..registry import register_model, register_model_class

VQAV2_NUM_ANSWERS = 3129


@register_model_class
class BEiT3ForVisualQuestionAnswering(BEiT3TaskModel):
    """Image + question encoded jointly; the ``pooler`` reads the *image* CLS (token 0) of the fused sequence and
    ``head`` = Linear(D, 2D) -> LayerNorm -> GELU -> Linear(2D, num_classes) scores the answer vocabulary.

    Keys ``pooler.norm``, ``pooler.dense``, ``head.0``, ``head.1``, ``head.3``; ``normalize_output=False``.
    """

    def __init__(self, config: BEiT3Config, num_classes: int = VQAV2_NUM_ANSWERS):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        super().__init__(config, num_classes=num_classes)
        dim, eps = config.embed_dim, config.layernorm_eps
        self.pooler = Pooler(dim, dim, eps)
        self.head = nn.Sequential(
            nn.Linear(dim, dim * 2), nn.LayerNorm(dim * 2, eps=eps), nn.GELU(), nn.Linear(dim * 2, num_classes)
        )
        self.init_head(self.pooler)
        self.init_head(self.head)

    def forward(self, image: torch.Tensor, question: torch.Tensor, padding_mask: torch.Tensor, **kwargs) -> torch.Tensor:
        check_batch("image", image, 4)
        check_batch("question", question, 2)
        outputs = self.beit3(textual_tokens=question, visual_tokens=image, text_padding_position=padding_mask)
        return self.head(self.pooler(outputs["encoder_out"]))


def vqa_loss(logits: torch.Tensor, target_scores: torch.Tensor) -> torch.Tensor:
    """Official VQA training loss: BCE-with-logits (mean) against the soft answer scores, times the number of
    answers (so it is the per-question sum)."""
    if logits.shape != target_scores.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target_scores {tuple(target_scores.shape)} must match")
    return F.binary_cross_entropy_with_logits(logits.float(), target_scores.float()) * target_scores.shape[1]


for _size, _resolutions in (("base", (384, 480)), ("large", (384, 480, 768))):
    for _res in _resolutions:
        register_model(
            f"beit3_{_size}_patch16_{_res}_vqav2", BEiT3ForVisualQuestionAnswering, _size,
            img_size=_res, patch_size=16, normalize_output=False,
        )
register_model(
    "beit3_tiny_patch8_32_vqav2", BEiT3ForVisualQuestionAnswering, "tiny",
    img_size=32, patch_size=8, normalize_output=False,
)
