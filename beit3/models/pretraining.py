"""BEiT-3 with its masked-data-modeling heads, named as in the official pretrained checkpoints
(``mim_head`` over the visual-token codebook, ``mlm_head`` over the text vocabulary)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .backbone import BEiT3, BEiT3Config
from .layers import init_linear_and_norm
from .registry import register_model_class


@register_model_class
class BEiT3ForPretraining(nn.Module):
    """Backbone + MIM head (``codebook_size`` classes) + MLM head (``vocab_size`` classes).

    Only masked positions reach the heads, so the 64k-way MLM head spends no work on the unmasked majority; with
    ``masked_only_last_layer`` the last layer too computes only them past its keys and values
    (``BEiT3(output_positions=...)``).
    """

    def __init__(self, config: BEiT3Config, codebook_size: int = 8192):
        super().__init__()
        self.beit3 = BEiT3(config)
        self.mim_head = nn.Linear(config.embed_dim, codebook_size)
        self.mlm_head = nn.Linear(config.embed_dim, config.vocab_size)
        self.mim_head.apply(init_linear_and_norm)
        self.mlm_head.apply(init_linear_and_norm)
        self.init_kwargs = {"codebook_size": codebook_size}

    @property
    def config(self) -> BEiT3Config:
        return self.beit3.config

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.beit3.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"beit3.{name}" for name in self.beit3.no_weight_decay()}

    def forward(
        self,
        images: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        text_tokens: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        text_mask: Optional[torch.Tensor] = None,
        masked_only_last_layer: bool = False,
    ) -> dict[str, torch.Tensor]:
        """Encode an image, text or image-text batch; return MIM logits of the masked patches (row-major, in batch
        order) and MLM logits of the masked text positions. ``masked_only_last_layer``: compute the last layer past its
        keys and values only at those positions (same logits up to rounding, fewer FLOPs)."""
        kwargs = dict(textual_tokens=text_tokens, visual_tokens=images, text_padding_position=padding_mask,
                      vision_masked_position=image_mask)
        if masked_only_last_layer:
            read = []  # positions a head reads: masked patches (never the CLS), masked text tokens
            if images is not None:
                patches = image_mask if image_mask is not None else images.new_zeros(images.shape[0], self.config.num_patches)
                read += [patches.new_zeros(images.shape[0], 1).bool(), patches.bool()]
            if text_tokens is not None:
                read.append(text_mask.bool() if text_mask is not None else torch.zeros_like(text_tokens, dtype=torch.bool))
            rows = self.beit3(**kwargs, output_positions=torch.cat(read, dim=1))["encoder_out"]
            num_mim = 0 if image_mask is None else int(image_mask.sum())
            vision_rows, text_rows = rows[:num_mim], rows[num_mim:]
        else:
            features = self.beit3(**kwargs)["encoder_out"]
            vision_len = 0 if images is None else self.beit3.vision_embed.num_position_embeddings()
            vision_rows = None if image_mask is None else features[:, 1:vision_len][image_mask.bool()]
            text_rows = None if text_mask is None else features[:, vision_len:][text_mask.bool()]
        logits = {}
        if image_mask is not None:
            logits["mim"] = self.mim_head(vision_rows)
        if text_mask is not None:
            logits["mlm"] = self.mlm_head(text_rows)
        return logits
