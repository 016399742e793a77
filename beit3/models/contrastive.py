"""Image-text contrastive (ITC) and matching (ITM) pieces shared by retrieval fine-tuning and VLMo/ALBEF-style
pretraining: the CLIP loss over features gathered across ranks, the ITM head, and hard-negative sampling from the
contrastive similarities."""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn
import torch.nn.functional as F
from torch import nn

from .heads import Pooler

INITIAL_LOGIT_SCALE = math.log(1 / 0.07)  # CLIP's temperature 0.07, learnable through its log


def gather_with_grad(features: torch.Tensor) -> tuple[torch.Tensor, int]:
    """All ranks' ``features`` concatenated along dim 0 (gradients flow back to every rank) and this rank's index;
    ``(features, 0)`` when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return features, 0
    return torch.cat(dist_nn.all_gather(features.contiguous())), dist.get_rank()


def random_keep(batch: int, num_patches: int, drop: float, device=None) -> Optional[torch.Tensor]:
    """FLIP's patch dropping: per sample ``num_patches - round(drop * num_patches)`` patch indexes drawn uniformly
    (global RNG; ascending), for ``BEiT3(vision_keep=...)``; None when ``drop`` is 0 (every patch encoded)."""
    if not drop:
        return None
    kept = max(1, num_patches - round(drop * num_patches))
    return torch.rand(batch, num_patches, device=device).argsort(dim=1)[:, :kept].sort(dim=1).values


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE of the official ``ClipLoss``: local features against the features of all ranks, the
    positive of local row i being global column ``i + rank * batch``."""
    if image_features.shape != text_features.shape:
        raise ValueError(f"image features {tuple(image_features.shape)} and text features {tuple(text_features.shape)} differ")
    all_images, rank = gather_with_grad(image_features)
    all_texts, _ = gather_with_grad(text_features)
    logits_per_image = logit_scale * image_features @ all_texts.T
    logits_per_text = logit_scale * text_features @ all_images.T
    batch = image_features.shape[0]
    labels = torch.arange(batch, device=image_features.device) + batch * rank
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def add_contrastive_heads(model: nn.Module, dim: int) -> None:
    """Give a task ``model`` the two projections of a dual encoder (official names ``vision_head`` /
    ``language_head``: Linear(D, D) without bias, the model's head init) and the learnable ``logit_scale``."""
    model.language_head = nn.Linear(dim, dim, bias=False)
    model.vision_head = nn.Linear(dim, dim, bias=False)
    model.init_head(model.language_head)
    model.init_head(model.vision_head)
    model.logit_scale = nn.Parameter(torch.tensor(INITIAL_LOGIT_SCALE))


class ITMHead(nn.Module):
    """Image-text matching head: :class:`Pooler` on the vision CLS of the fused image+text sequence, then one
    match logit (``classifier``). The owning model initialises it (``init_head``)."""

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.pooler = Pooler(dim, dim, eps)
        self.classifier = nn.Linear(dim, 1)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pooler(tokens)).squeeze(-1)


def sample_hard_negatives(similarity: torch.Tensor, same: torch.Tensor,
                          generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ALBEF hard negatives from an (images x texts) similarity matrix: for every image a text and for every text an
    image, drawn with probability softmax(similarity) over the pairs that are not positives (``same[i, j]``: image i
    and text j belong together, e.g. two captions of one image). Returns ``(text index per image, image index per
    text)``; never a positive."""
    if bool(same.all(dim=1).any()) or bool(same.all(dim=0).any()):
        raise ValueError("ITM hard negatives need every image to have a caption of another image in the batch")
    sim = similarity.detach().float()
    negative_text = torch.multinomial(sim.masked_fill(same, float("-inf")).softmax(dim=1), 1, generator=generator)
    negative_image = torch.multinomial(sim.T.masked_fill(same.T, float("-inf")).softmax(dim=1), 1, generator=generator)
    return negative_text.squeeze(1), negative_image.squeeze(1)


def matching_batch(image: torch.Tensor, text: torch.Tensor, padding_mask: Optional[torch.Tensor],
                   negative_text: torch.Tensor, negative_image: torch.Tensor, rows: slice = slice(None)):
    """The ITM inputs of the pairs ``rows`` (B of them) of a batch: B positives, B (image, hard negative text) and B
    (hard negative image, text) pairs, with labels 1/0/0: ``(images, texts, padding_mask, labels)``. The negatives
    index the whole batch."""
    image_rows, text_rows = image[rows], text[rows]
    batch = image_rows.shape[0]
    images = torch.cat([image_rows, image_rows, image[negative_image]])
    texts = torch.cat([text_rows, text[negative_text], text_rows])
    pads = None if padding_mask is None else torch.cat([padding_mask[rows], padding_mask[negative_text],
                                                         padding_mask[rows]])
    labels = torch.cat([image.new_ones(batch), image.new_zeros(2 * batch)]).float()
    return images, texts, pads, labels
