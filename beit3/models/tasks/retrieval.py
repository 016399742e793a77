"""Image-text retrieval: the official dual encoder ``BEiT3ForRetrieval`` with the CLIP loss over features gathered
across ranks, plus an optional image-text matching (ITM) head that re-ranks the contrastive top-k (ALBEF/BLIP style).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ..backbone import BEiT3Config
from ..contrastive import (ITMHead, add_contrastive_heads, clip_loss, gather_with_grad, matching_batch, random_keep,
                           sample_hard_negatives)
from ..heads import check_batch
from ..task_model import BEiT3TaskModel
from ..registry import register_model, register_model_class

__all__ = ["CONTRASTIVE_HEAD_KEYS", "BEiT3ForRetrieval", "ITMHead", "clip_loss", "gather_with_grad"]

# the keys a checkpoint must hold for the dual encoder's embeddings to mean anything (zero-shot use)
CONTRASTIVE_HEAD_KEYS = ("vision_head.weight", "language_head.weight", "logit_scale")
PAD_ID = 1  # <pad> in the XLM-R id layout of every BEiT-3 text tokenizer

# ITM scores outside the re-ranked top-k keep their contrastive order, shifted below every re-ranked pair.
RERANK_OFFSET = 1e4


@register_model_class
class BEiT3ForRetrieval(BEiT3TaskModel):
    """Dual encoder: image-only pass -> token 0 -> ``vision_head`` -> L2-norm; text-only pass -> token 0 (BOS) ->
    ``language_head`` -> L2-norm (both Linear(D, D) without bias); ``logit_scale`` starts at ln(1/0.07).

    ``itm=True`` adds ``itm_head`` (:class:`ITMHead`) on a joint pass of the same backbone: training then adds the
    ITM loss with hard negatives drawn from the in-batch contrastive similarities, and :meth:`rerank` rescores the
    contrastive top-k at evaluation.
    """

    def __init__(self, config: BEiT3Config, itm: bool = False):
        super().__init__(config, itm=itm)
        add_contrastive_heads(self, config.embed_dim)
        self.itm_head = ITMHead(config.embed_dim, config.layernorm_eps) if itm else None
        if self.itm_head is not None:
            self.init_head(self.itm_head)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"logit_scale"}

    def encode_image(self, image, vision_keep: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalised image embeddings (B, D) of a (B, 3, S, S) tensor, or of PIL images / image paths through
        ``self.processor`` (set by ``beit3.create_model_and_transforms``). ``vision_keep`` (B, K): encode only those
        patches (FLIP)."""
        if not isinstance(image, torch.Tensor):
            image = self._processor().images(image).to(self.logit_scale.device)
        check_batch("image", image, 4)
        tokens = self.beit3(visual_tokens=image, vision_keep=vision_keep)["encoder_out"]
        return F.normalize(self.vision_head(tokens[:, 0]), dim=-1)

    def encode_text(self, text_description, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalised text embeddings (B, D) of token ids (B, T) (``<s>`` ... ``</s>``; without ``padding_mask``
        the ``<pad>`` ids are the padding), or of raw strings through ``self.processor``."""
        if isinstance(text_description, str) or (isinstance(text_description, (list, tuple)) and text_description
                                                 and isinstance(text_description[0], str)):
            text_description, padding_mask = self._processor().texts(text_description)
            text_description = text_description.to(self.logit_scale.device)
            padding_mask = padding_mask.to(self.logit_scale.device)
        check_batch("text_description", text_description, 2)
        if padding_mask is None and not torch.jit.is_tracing():
            padding_mask = text_description == PAD_ID
        tokens = self.beit3(textual_tokens=text_description, text_padding_position=padding_mask)["encoder_out"]
        return F.normalize(self.language_head(tokens[:, 0]), dim=-1)

    def _processor(self):
        processor = getattr(self, "processor", None)
        if processor is None:
            raise TypeError("raw images or strings need a processor: build the model with "
                            "beit3.create_model_and_transforms(...), or set model.processor = beit3.BEiT3Processor(...); "
                            "otherwise pass tensors")
        return processor

    def forward(
        self,
        image: Optional[torch.Tensor] = None,
        text_description: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        only_infer: bool = False,
        image_id: Optional[torch.Tensor] = None,
        patch_drop: float = 0.0,
        **kwargs,
    ):
        """``only_infer=True``: ``(vision_cls, language_cls)`` (None where the input is None); otherwise
        ``(loss, vision_cls, language_cls)``. ``image_id`` (optional) keeps captions of the same image from being
        drawn as ITM negatives. ``patch_drop`` (training only): FLIP, this fraction of the patches of each image
        dropped (uniformly drawn) before the encoder of the contrastive loss; the ITM pass sees whole images."""
        keep = None
        if image is not None and patch_drop and self.training:
            keep = random_keep(image.shape[0], self.config.num_patches, patch_drop, image.device)
        vision_cls = self.encode_image(image, keep) if image is not None else None
        language_cls = self.encode_text(text_description, padding_mask) if text_description is not None else None
        if only_infer:
            return vision_cls, language_cls
        if vision_cls is None or language_cls is None:
            raise ValueError("BEiT3ForRetrieval needs both image and text_description for the loss (or only_infer=True)")
        loss = clip_loss(vision_cls, language_cls, self.logit_scale.exp())
        if self.itm_head is not None:
            loss = loss + self.itm_loss(image, text_description, padding_mask, vision_cls, language_cls, image_id)
        return loss, vision_cls, language_cls

    # -- image-text matching --------------------------------------------------------------------------------------
    def _require_itm(self) -> ITMHead:
        if self.itm_head is None:
            raise RuntimeError("this BEiT3ForRetrieval has no ITM head; build it with itm=True")
        return self.itm_head

    def itm_score(self, image: torch.Tensor, text_description: torch.Tensor, padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Match logit (B,) of each (image, text) pair from a joint pass."""
        head = self._require_itm()
        outputs = self.beit3(textual_tokens=text_description, visual_tokens=image, text_padding_position=padding_mask)
        return head(outputs["encoder_out"])

    def itm_loss(
        self,
        image: torch.Tensor,
        text_description: torch.Tensor,
        padding_mask: Optional[torch.Tensor],
        vision_cls: torch.Tensor,
        language_cls: torch.Tensor,
        image_id: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """BCE over B positives, B (image, hard negative text) and B (hard negative image, text) pairs; negatives are
        sampled with probability softmax(contrastive similarity) over the other images/texts of the batch."""
        batch = image.shape[0]
        with torch.no_grad():
            ids = torch.arange(batch, device=image.device) if image_id is None else image_id.view(-1)
            sim = (vision_cls @ language_cls.T).float() * self.logit_scale.exp().float()
            negative_text, negative_image = sample_hard_negatives(sim, ids[:, None] == ids[None, :])
        images, texts, pads, labels = matching_batch(image, text_description, padding_mask, negative_text, negative_image)
        logits = self.itm_score(images, texts, pads)
        return F.binary_cross_entropy_with_logits(logits.float(), labels)

    @torch.no_grad()
    def rerank(
        self,
        images: torch.Tensor,
        texts: torch.Tensor,
        padding_mask: Optional[torch.Tensor],
        itc_scores: torch.Tensor,
        top_k: int = 16,
        batch_size: int = 64,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rescore the contrastive top-k with the ITM head (BLIP: ITM logit + contrastive score).

        ``itc_scores`` is (N_images, N_texts). Returns ``(i2t, t2i)`` score matrices of that shape: for i2t each
        image's top-k texts, for t2i each text's top-k images get the new score; all other entries keep their
        contrastive score minus a large offset, so they rank below the re-ranked ones in the same order as before.
        """
        num_images, num_texts = itc_scores.shape
        if images.shape[0] != num_images or texts.shape[0] != num_texts:
            raise ValueError(
                f"itc_scores is {tuple(itc_scores.shape)} but there are {images.shape[0]} images and {texts.shape[0]} texts"
            )
        if top_k <= 0:
            raise ValueError(f"top_k must be positive, got {top_k}")
        i2t_text = itc_scores.topk(min(top_k, num_texts), dim=1).indices
        t2i_image = itc_scores.topk(min(top_k, num_images), dim=0).indices
        i2t_pairs = torch.arange(num_images, device=itc_scores.device)[:, None] * num_texts + i2t_text
        t2i_pairs = t2i_image * num_texts + torch.arange(num_texts, device=itc_scores.device)[None, :]
        pairs = torch.cat([i2t_pairs.flatten(), t2i_pairs.flatten()]).unique()
        itm = torch.empty(pairs.shape[0], dtype=itc_scores.dtype, device=itc_scores.device)
        for start in range(0, pairs.shape[0], batch_size):
            chunk = pairs[start : start + batch_size]
            image_idx, text_idx = chunk // num_texts, chunk % num_texts
            pads = None if padding_mask is None else padding_mask[text_idx]
            itm[start : start + batch_size] = self.itm_score(images[image_idx], texts[text_idx], pads).to(itm.dtype)
        rescored = itc_scores.flatten().clone()
        rescored[pairs] += itm
        results = []
        for selected in (i2t_pairs.flatten(), t2i_pairs.flatten()):
            scores = (itc_scores - RERANK_OFFSET).flatten()
            scores[selected] = rescored[selected]
            results.append(scores.view_as(itc_scores))
        return results[0], results[1]


for _size, _res in (("base", 224), ("base", 384), ("large", 384)):
    register_model(f"beit3_{_size}_patch16_{_res}_retrieval", BEiT3ForRetrieval, _size, img_size=_res, patch_size=16, normalize_output=True)
register_model("beit3_tiny_patch8_32_retrieval", BEiT3ForRetrieval, "tiny", img_size=32, patch_size=8, normalize_output=True)
