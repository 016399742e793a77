"""Image classification (ImageNet-1k): ``BEiT3ForImageClassification`` as in the official fine-tuning code."""
from __future__ import annotations

import torch
from torch import nn

from ..backbone import BEiT3Config
from ..heads import check_batch
from ..task_model import BEiT3TaskModel
from ..registry import register_model, register_model_class


@register_model_class
class BEiT3ForImageClassification(BEiT3TaskModel):
    """Image-only BEiT-3 classifier: mean of the patch tokens (CLS excluded) -> ``fc_norm`` -> ``head``.

    The backbone runs without its final LayerNorm (``normalize_output=False``, set by the registered builders).
    ``head`` weight and bias start at 0.001 x the usual init; ``num_classes=0`` returns the pooled features.
    """

    def __init__(self, config: BEiT3Config, num_classes: int = 1000):
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        super().__init__(config, num_classes=num_classes)
        dim = config.embed_dim
        self.fc_norm = nn.LayerNorm(dim, eps=config.layernorm_eps)
        self.head = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_head(self.fc_norm)
        if num_classes > 0:
            self.init_head(self.head, self.head)

    def forward_features(self, image: torch.Tensor) -> torch.Tensor:
        """Pooled image features (B, D): LayerNorm of the mean patch token."""
        check_batch("image", image, 4)
        tokens = self.beit3(visual_tokens=image)["encoder_out"]
        return self.fc_norm(tokens[:, 1:].mean(dim=1))

    def forward(self, image: torch.Tensor, **kwargs) -> torch.Tensor:
        return self.head(self.forward_features(image))


for _size in ("base", "large"):
    register_model(
        f"beit3_{_size}_patch16_224_imageclassification", BEiT3ForImageClassification, _size,
        img_size=224, patch_size=16, normalize_output=False,
    )
register_model(
    "beit3_tiny_patch8_32_imageclassification", BEiT3ForImageClassification, "tiny",
    img_size=32, patch_size=8, normalize_output=False,
)
