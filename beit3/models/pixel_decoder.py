"""MAE-style pixel targets for masked image modeling (He et al., 2022), an alternative to VQ-KD codes that needs no
visual tokenizer: each masked patch regresses its own pixels, normalised per patch (MAE's ``norm_pix_loss``).

:class:`PixelDecoder` is MAE's lightweight decoder: the encoder's vision outputs (CLS + the patches it saw) are
projected to the decoder width, a shared mask token fills the patches the encoder did not see, decoder positions are
added and a few Transformer blocks (timm's ViT ``Block``) predict every patch's pixels.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block
from torch import nn



@dataclass
class PixelDecoderConfig:
    """Width, depth and heads of the MAE decoder (MAE's defaults: 512 wide, 8 blocks, 16 heads)."""

    width: int = 512
    depth: int = 8
    num_heads: int = 16

    def __post_init__(self) -> None:
        if min(self.width, self.depth, self.num_heads) < 1 or self.width % self.num_heads:
            raise ValueError(f"objective.pixel_decoder: width ({self.width}), depth ({self.depth}) and num_heads "
                             f"({self.num_heads}) must be positive and width divisible by num_heads")


def patch_pixels(images: torch.Tensor, patch_size: int, normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p * p * C) patches in row-major order (MAE's ``patchify``), each normalised to zero mean
    and unit variance over its own values when ``normalize`` (MAE's per-patch normalised target)."""
    b, c, h, w = images.shape
    p = patch_size
    if h % p or w % p:
        raise ValueError(f"images of {h}x{w} px do not split into {p}x{p} patches")
    x = images.float().reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), -1)
    if normalize:
        x = (x - x.mean(dim=-1, keepdim=True)) / (x.var(dim=-1, keepdim=True) + eps).sqrt()
    return x


class PixelDecoder(nn.Module):
    """MAE decoder: encoder vision rows (B, 1 + K, D) of CLS + seen patches -> pixel predictions of every patch
    (B, N, p * p * C). ``keep`` (B, K) gives the seen patches' indexes when the encoder saw only those; without it the
    encoder saw all N patches (masked ones as its mask token) and its rows are used as they are."""

    def __init__(self, embed_dim: int, num_patches: int, patch_size: int, in_chans: int, cfg: PixelDecoderConfig,
                 eps: float = 1e-6):
        super().__init__()
        self.num_patches = num_patches
        self.embed = nn.Linear(embed_dim, cfg.width)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches + 1, cfg.width))
        self.blocks = nn.ModuleList(Block(cfg.width, cfg.num_heads, mlp_ratio=4.0, qkv_bias=True,
                                          norm_layer=nn.LayerNorm) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=eps)
        self.pred = nn.Linear(cfg.width, patch_size * patch_size * in_chans)
        self.apply(_xavier_linear)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, vision: torch.Tensor, keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.embed(vision)
        if keep is not None:
            b, _, width = x.shape
            grid = self.mask_token.to(x.dtype).expand(b, self.num_patches, width).clone()
            grid = grid.scatter(1, keep.long()[..., None].expand(-1, -1, width), x[:, 1:])
            x = torch.cat([x[:, :1], grid], dim=1)
        if x.shape[1] != self.num_patches + 1:
            raise ValueError(f"the pixel decoder takes CLS + {self.num_patches} patches, got {x.shape[1]} rows")
        x = x + self.pos_embed.to(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.pred(self.norm(x))[:, 1:]


def _xavier_linear(module: nn.Module) -> None:
    """MAE's decoder init: Linear xavier-uniform with zero bias (LayerNorms keep their default 1 / 0)."""
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        nn.init.zeros_(module.bias)


def pixel_loss(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """MAE's loss: mean squared error per patch, averaged over the patches given (the masked ones)."""
    return F.mse_loss(predictions.float(), targets.float())


def visible_patches(image_mask: torch.Tensor) -> torch.Tensor:
    """Indexes (B, K) of each sample's unmasked patches, ascending; every sample must mask as many as the others
    (the block and random mask generators mask an exact count)."""
    counts = (~image_mask.bool()).sum(dim=1)
    if counts.numel() and bool((counts != counts[0]).any()):
        raise ValueError("a visible-only encoder needs the same number of masked patches in every sample of a batch; "
                         f"got {sorted(set(counts.tolist()))} visible patches")
    order = image_mask.bool().float().argsort(dim=1, stable=True)  # unmasked (0) first, in patch order
    return order[:, : int(counts[0]) if counts.numel() else 0]
