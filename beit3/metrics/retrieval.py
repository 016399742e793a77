"""Image-text retrieval recall, computed as the official BEiT-3 evaluation does (in percent)."""
from __future__ import annotations

from typing import Optional, Sequence

import torch


def retrieval_recall(
    scores: torch.Tensor,
    text_image_ids: torch.Tensor,
    image_ids: Optional[torch.Tensor] = None,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Recall@K both ways from a (N_images, N_texts) score matrix.

    ``text_image_ids[j]`` is the image of text j; ``image_ids[i]`` the id of row i (default ``0..N_images-1``).
    Image->text (``tr_r{k}``) hits when any of the image's texts is among its top-k texts; text->image (``ir_r{k}``)
    when the text's image is among its top-k images. ``average_score`` is the mean of all of them.
    """
    if scores.dim() != 2 or text_image_ids.shape != scores.shape[1:]:
        raise ValueError(
            f"scores must be (N_images, N_texts) and text_image_ids (N_texts,); got {tuple(scores.shape)} and "
            f"{tuple(text_image_ids.shape)}"
        )
    num_images, num_texts = scores.shape
    image_ids = torch.arange(num_images, device=scores.device) if image_ids is None else image_ids.to(scores.device)
    if image_ids.shape != (num_images,):
        raise ValueError(f"image_ids must be ({num_images},); got {tuple(image_ids.shape)}")
    text_image_ids = text_image_ids.to(scores.device)
    result = {}
    for k in ks:
        text_rank = scores.topk(min(k, num_texts), dim=1).indices
        result[f"tr_r{k}"] = (text_image_ids[text_rank] == image_ids[:, None]).any(dim=1).float().mean().item() * 100.0
    for k in ks:
        image_rank = scores.topk(min(k, num_images), dim=0).indices
        result[f"ir_r{k}"] = (image_ids[image_rank] == text_image_ids[None, :]).any(dim=0).float().mean().item() * 100.0
    result["average_score"] = sum(result.values()) / len(result)
    return result
