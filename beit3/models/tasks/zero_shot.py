"""Zero-shot use of a retrieval-tuned (or ITC) dual encoder, without fine-tuning: image-text retrieval scores and
image classification from class-name prompts ("a photo of a {name}.") encoded by the language side."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ...errors import CheckpointError
from .retrieval import CONTRASTIVE_HEAD_KEYS, BEiT3ForRetrieval

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


def batch_slices(count: int, batch_size: int):
    """Slices of ``range(count)`` of ``batch_size`` items (the last may be shorter)."""
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
    image_feats = torch.cat([model.encode_image(images[s]) for s in batch_slices(images.shape[0], batch_size)])
    text_feats = torch.cat([
        model.encode_text(texts[s], None if padding_mask is None else padding_mask[s])
        for s in batch_slices(texts.shape[0], batch_size)
    ])
    return image_feats @ text_feats.T


@torch.no_grad()
def zero_shot_classifier(
    model: BEiT3ForRetrieval,
    class_names: Sequence[str],
    templates: Sequence[str] = DEFAULT_TEMPLATES,
    tokenizer=None,
) -> torch.Tensor:
    """Class embeddings (C, D): each template filled with the class name, tokenised as in training (``<s>`` + ids +
    ``</s>``: by ``tokenizer``, a :class:`~beit3.text.TextTokenizer`, or else ``model.processor``), encoded by the
    language side, averaged over templates, L2-normalised."""
    if not class_names or not templates:
        raise ValueError("zero_shot_classifier needs at least one class name and one template")
    if isinstance(templates, str):
        raise TypeError("templates must be a list of strings such as ['a photo of a {}.'], not one string")
    device = model.logit_scale.device
    weights = []
    for name in class_names:
        prompts = [t.format(name) for t in templates]
        if tokenizer is not None:
            ids, mask = tokenizer.encode_padded(prompts)
            weights.append(model.encode_text(ids.to(device), mask.to(device)).mean(dim=0))
        else:
            weights.append(model.encode_text(prompts).mean(dim=0))
    return F.normalize(torch.stack(weights), dim=-1)


@torch.no_grad()
def zero_shot_logits(model: BEiT3ForRetrieval, images: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Class logits (B, C): cosine of the image embeddings (tensors, or PIL images / paths through
    ``model.processor``) against :func:`zero_shot_classifier`, times ``logit_scale.exp()`` (the trained temperature:
    without it a softmax over cosines is nearly uniform)."""
    return model.logit_scale.exp() * model.encode_image(images) @ classifier.T


def require_contrastive_heads(model, report, source: str) -> None:
    """Refuse a retrieval model whose checkpoint (``report``: its :class:`~beit3.models.LoadReport`) did not hold the
    contrastive heads: their random projections give embeddings but no zero-shot meaning."""
    if not isinstance(model, BEiT3ForRetrieval):
        return
    missing = sorted(set(CONTRASTIVE_HEAD_KEYS) & set(report.missing))
    if missing:
        raise CheckpointError(
            f"'{source}' has no trained retrieval heads (missing: {', '.join(missing)}), so zero-shot retrieval or "
            "classification with it would use random projections. Use a retrieval fine-tuned model (tools/finetune.py "
            "--task coco_retrieval or flickr30k; its OUT/best folder), or a pretraining run with the contrastive "
            "objective (objective.itc_weight > 0) exported with tools/export_checkpoint.py; for backbone features of "
            "this checkpoint use beit3.create_model_and_transforms('beit3_..._patch16_224', pretrained=...) instead")

