"""The input layers of the BEiT-3 backbone: the patch embedding with its CLS and mask tokens, and the two learned
position tables (vision and text), under the official parameter names; with ``keep`` only a subset of the patches
enters the encoder (MAE's visible-only encoder, FLIP's patch dropping)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# fairseq legacy kept by the official code: positions count from 2, rows 0 and 1 are never used.
POSITION_OFFSET = 2


class VisionEmbedding(nn.Module):
    """Patch embedding (Conv2d), optional MIM mask token substitution, prepended CLS token."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, dim: int):
        super().__init__()
        self.img_size = img_size
        self.patch_size = patch_size
        self.num_patches = (img_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_chans, dim, kernel_size=patch_size, stride=patch_size)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))

    def num_position_embeddings(self) -> int:
        return self.num_patches + 1

    def forward(self, images: torch.Tensor, masked_position: Optional[torch.Tensor] = None,
                keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(B, 1 + N, D): CLS then the patches; with ``keep`` (B, K) patch indexes only those patches, in that order
        (MAE's visible-only encoder, FLIP's patch dropping)."""
        if images.dim() != 4 or images.shape[-2:] != (self.img_size, self.img_size):
            raise ValueError(
                f"visual_tokens must be images of shape (B, C, {self.img_size}, {self.img_size}) for this model "
                f"(img_size={self.img_size}); got {tuple(images.shape)}. Resize the images or build the model with "
                f"img_size={images.shape[-1]} (positions are interpolated on load)"
            )
        x = self.proj(images).flatten(2).transpose(1, 2)
        if masked_position is not None:
            if masked_position.shape != x.shape[:2]:
                raise ValueError(
                    f"vision_masked_position must have shape {tuple(x.shape[:2])} (batch, patches); "
                    f"got {tuple(masked_position.shape)}"
                )
            w = masked_position.unsqueeze(-1).to(x.dtype)
            x = x * (1 - w) + self.mask_token.to(x.dtype) * w
        if keep is not None:
            x = x.gather(1, check_keep(keep, x.shape[0], self.num_patches)[..., None].expand(-1, -1, x.shape[-1]))
        return torch.cat([self.cls_token.expand(x.shape[0], -1, -1).to(x.dtype), x], dim=1)


def check_keep(keep: torch.Tensor, batch: int, num_patches: int) -> torch.Tensor:
    """``keep`` (patch indexes kept per sample, (B, K) integers in [0, N)), or a ValueError naming what is wrong."""
    if keep.dim() != 2 or keep.shape[0] != batch or keep.shape[1] > num_patches or keep.dtype.is_floating_point:
        raise ValueError(f"vision_keep must be (batch={batch}, K <= {num_patches}) integer patch indexes; got "
                         f"{tuple(keep.shape)} {keep.dtype}")
    if keep.numel() and not torch.compiler.is_compiling() and keep.device.type == "cpu":
        if int(keep.min()) < 0 or int(keep.max()) >= num_patches:
            raise ValueError(f"vision_keep holds patch index {int(keep.max())}, outside [0, {num_patches})")
    return keep.long()


def keep_rows(keep: torch.Tensor) -> torch.Tensor:
    """Sequence rows (CLS at 0, patch i at 1 + i) of the vision tokens kept by ``keep`` (B, K): (B, 1 + K)."""
    return torch.cat([keep.new_zeros(keep.shape[0], 1), keep + 1], dim=1)


class MultiwayPositionEmbedding(nn.Module):
    """Two learned absolute position tables: ``A`` for image tokens (N+1 rows + 2), ``B`` for text (1024 rows).

    Each modality counts its own positions from 2, so text positions do not depend on the image length.
    """

    def __init__(self, vision_positions: int, text_positions: int, dim: int):
        super().__init__()
        self.A = nn.Embedding(vision_positions + POSITION_OFFSET, dim)
        self.B = nn.Embedding(text_positions, dim)

    def forward(self, vision_len: int, text_len: int, text_positions: Optional[torch.Tensor] = None,
                vision_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The position rows of a sequence of ``vision_len`` vision then ``text_len`` text tokens; with
        ``vision_keep`` (B, K) the vision rows are those of the CLS and the kept patches (``vision_len`` = 1 + K)."""
        parts = []
        if vision_keep is not None:
            parts.append(F.embedding(keep_rows(vision_keep) + POSITION_OFFSET, self.A.weight))
        elif vision_len:
            parts.append(self.A.weight[POSITION_OFFSET : POSITION_OFFSET + vision_len].unsqueeze(0))
        if text_len:
            if text_positions is None:
                max_len = self.B.num_embeddings - POSITION_OFFSET
                if text_len > max_len:
                    raise ValueError(
                        f"text of {text_len} tokens is longer than the text position table allows ({max_len} tokens, "
                        f"max_text_positions={self.B.num_embeddings}); truncate the text"
                    )
                parts.append(self.B.weight[POSITION_OFFSET : POSITION_OFFSET + text_len].unsqueeze(0))
            else:
                if text_positions.numel() and int(text_positions.max()) >= self.B.num_embeddings:
                    raise ValueError(
                        f"text position {int(text_positions.max())} is outside the text position table "
                        f"({self.B.num_embeddings} rows)"
                    )
                parts.append(F.embedding(text_positions, self.B.weight))
        if len(parts) == 1:
            return parts[0]
        batch = max(p.shape[0] for p in parts)
        return torch.cat([p.expand(batch, -1, -1) for p in parts], dim=1)
