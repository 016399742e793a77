"""Visual reasoning over an image pair (NLVR2): ``BEiT3ForVisualReasoning``."""
from __future__ import annotations

import torch

from ..backbone import BEiT3Config
from ..heads import TwoLayerMLP, check_batch, cls_features
from ..task_model import BEiT3TaskModel
from ..registry import register_model, register_model_class


@register_model_class
class BEiT3ForVisualReasoning(BEiT3TaskModel):
    """Both (image, sentence) pairs run through the backbone in one batch (``image_a`` rows first); each pass gives
    [vision CLS ; first text token], the pair [v_a, l_a, v_b, l_b] (4D) feeds ``head`` (a :class:`TwoLayerMLP`
    with ``dense1``/``dense2`` scaled by 0.001 at init)."""

    def __init__(self, config: BEiT3Config, num_classes: int = 2):
        if num_classes <= 0:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        super().__init__(config, num_classes=num_classes)
        dim = config.embed_dim
        self.head = TwoLayerMLP(dim * 4, dim * 2, num_classes, config.layernorm_eps)
        self.init_head(self.head, self.head.dense1, self.head.dense2)

    def forward(
        self, image_a: torch.Tensor, image_b: torch.Tensor, text_description: torch.Tensor, padding_mask: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        check_batch("image_a", image_a, 4)
        check_batch("image_b", image_b, 4)
        check_batch("text_description", text_description, 2)
        if image_a.shape != image_b.shape:
            raise ValueError(f"image_a {tuple(image_a.shape)} and image_b {tuple(image_b.shape)} must have the same shape")
        batch = text_description.shape[0]
        outputs = self.beit3(
            textual_tokens=torch.cat([text_description, text_description]),
            visual_tokens=torch.cat([image_a, image_b]),
            text_padding_position=None if padding_mask is None else torch.cat([padding_mask, padding_mask]),
        )
        pair = torch.cat(cls_features(outputs), dim=-1)
        return self.head(torch.cat(pair.split(batch), dim=-1))


for _size in ("base", "large"):
    register_model(f"beit3_{_size}_patch16_224_nlvr2", BEiT3ForVisualReasoning, _size, img_size=224, patch_size=16, normalize_output=True)
register_model("beit3_tiny_patch8_32_nlvr2", BEiT3ForVisualReasoning, "tiny", img_size=32, patch_size=8, normalize_output=True)
