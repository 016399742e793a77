"""Zero-shot use of a retrieval-tuned (or ITC) dual encoder, without fine-tuning: image-text retrieval scores and
image classification from class-name prompts ("a photo of a {name}.") encoded by the language side."""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

from .retrieval import BEiT3ForRetrieval

DEFAULT_TEMPLATES = ("a photo of a {}.",)


def pad_token_ids(sequences: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad token id lists to a (B, T) tensor; returns ``(ids, padding_mask)`` with 1 at pads."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pad_token_ids needs at least one sequence and no empty sequence")
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.ones(len(sequences), length, dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 0
    return ids, mask


def _batches(count: int, batch_size: int):
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    return (slice(start, start + batch_size) for start in range(0, count, batch_size))


@torch.no_grad()
def retrieval_scores(
    model: BEiT3ForRetrieval,
    images: torch.Tensor,
    texts: torch.Tensor,
    padding_mask: torch.Tensor | None = None,
    batch_size: int = 64,
) -> torch.Tensor:
    """Cosine similarity (N_images, N_texts) of the dual encoder's embeddings, computed in batches."""
    image_feats = torch.cat([model.encode_image(images[s]) for s in _batches(images.shape[0], batch_size)])
    text_feats = torch.cat([
        model.encode_text(texts[s], None if padding_mask is None else padding_mask[s])
        for s in _batches(texts.shape[0], batch_size)
    ])
    return image_feats @ text_feats.T


@torch.no_grad()
def zero_shot_classifier(
    model: BEiT3ForRetrieval,
    class_names: Sequence[str],
    encode: Callable[[str], Sequence[int]],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    pad_id: int = 1,
) -> torch.Tensor:
    """Class embeddings (C, D): each template filled with the class name, encoded by ``encode`` (text -> full token
    ids incl. BOS/EOS, e.g. ``tokenizer.encode``) and the language side, averaged over templates, L2-normalised."""
    if not class_names or not templates:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    device = model.logit_scale.device
    weights = []
    for name in class_names:
        ids, mask = pad_token_ids([encode(t.format(name)) for t in templates], pad_id)
        weights.append(model.encode_text(ids.to(device), mask.to(device)).mean(dim=0))
    return F.normalize(torch.stack(weights), dim=-1)


@torch.no_grad()
def zero_shot_logits(model: BEiT3ForRetrieval, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Class logits (B, C): scaled cosine of the image embeddings against :func:`zero_shot_classifier`."""
    return model.logit_scale.exp() * model.encode_image(images) @ classifier.T
