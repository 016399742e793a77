"""Image captioning as uni-directional masked language modelling (UniLM style): ``BEiT3ForCaptioning``, its
attention mask and its training loss. Decoding (beam search with a key/value cache, greedy) is in
:mod:`beit3.generation`.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..backbone import BEiT3Config
from ..input_embeddings import POSITION_OFFSET
from ..heads import check_batch
from ..task_model import BEiT3TaskModel
from ..registry import register_model, register_model_class


def unidirectional_mask(image_len: int, text_len: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """The official captioning mask over [image | text], True = blocked: image tokens see only the image, text
    tokens see the whole image and the text up to themselves (lower triangle incl. the diagonal)."""
    total = image_len + text_len
    allowed = torch.zeros(total, total, dtype=torch.bool, device=device)
    allowed[:image_len, :image_len] = True
    allowed[image_len:, :image_len] = True
    allowed[image_len:, image_len:] = torch.ones(text_len, text_len, dtype=torch.bool, device=device).tril()
    return ~allowed


@register_model_class
class BEiT3ForCaptioning(BEiT3TaskModel):
    """Captioner: the backbone under :func:`unidirectional_mask`, ``mlm_head`` Linear(D, vocab) (with bias, not tied
    to ``text_embed``) predicting the tokens at ``<mask>`` positions.

    ``forward(image, text_ids, padding_mask, language_masked_pos, text_len=None, incremental_state=None)`` returns
    ``(logits, incremental_state)``: logits (N_masked, V) in (batch, position) order when ``language_masked_pos`` is
    given, else (B, T, V). Incremental decoding: the first call passes the image and an empty dict; later calls pass
    ``image=None``, the new tokens (officially [previous word, ``<mask>``]) and ``text_len`` = the text length after
    them; only the last mask rows are used, ``padding_mask`` is ignored and text positions continue from the cache.
    """

    def __init__(self, config: BEiT3Config):
        super().__init__(config)
        self.mlm_head = nn.Linear(config.embed_dim, config.vocab_size)
        self.init_head(self.mlm_head)

    def forward(
        self,
        image: Optional[torch.Tensor],
        text_ids: torch.Tensor,
        padding_mask: Optional[torch.Tensor],
        language_masked_pos: Optional[torch.Tensor],
        text_len: Optional[int] = None,
        incremental_state: Optional[dict] = None,
        **kwargs,
    ) -> tuple[torch.Tensor, Optional[dict]]:
        check_batch("text_ids", text_ids, 2)
        new_tokens = text_ids.shape[1]
        text_len = new_tokens if text_len is None else int(text_len)
        image_len = self.beit3.vision_embed.num_position_embeddings()
        attn_mask = unidirectional_mask(image_len, text_len, text_ids.device)
        if incremental_state is not None:
            for idx in range(self.config.depth):
                incremental_state.setdefault(idx, {})
        positions = None
        if image is None:
            cached = incremental_state.get(0, {}).get("prev_key") if incremental_state is not None else None
            if cached is None:
                raise ValueError("BEiT3ForCaptioning without an image needs the incremental_state of a call with the image")
            if cached.shape[2] + new_tokens != image_len + text_len:
                raise ValueError(
                    f"text_len={text_len} does not fit the cache ({cached.shape[2]} keys = {image_len} image tokens + "
                    f"{cached.shape[2] - image_len} text tokens) plus the {new_tokens} new tokens"
                )
            attn_mask = attn_mask[-new_tokens:]
            padding_mask = None
            start = text_len - new_tokens + POSITION_OFFSET
            positions = torch.arange(start, start + new_tokens, device=text_ids.device).unsqueeze(0)
        else:
            check_batch("image", image, 4)
        outputs = self.beit3(
            textual_tokens=text_ids,
            visual_tokens=image,
            text_padding_position=padding_mask,
            attn_mask=attn_mask,
            incremental_state=incremental_state,
            positions=positions,
        )
        text_feats = outputs["encoder_out"] if image is None else outputs["encoder_out"][:, image_len:]
        if language_masked_pos is not None:
            text_feats = text_feats[language_masked_pos.bool()]
        return self.mlm_head(text_feats), incremental_state


def captioning_loss(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.1, drop_worst_ratio: float = 0.0
) -> torch.Tensor:
    """Official captioning loss: KL to the smoothed target (1 - eps on the target, eps / (V - 1) elsewhere) summed
    over the vocabulary; with ``drop_worst_ratio`` > 0 the largest token losses are dropped before the mean (the
    official recipe turns this on after step 12000)."""
    if logits.dim() != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(f"logits must be (N, V) and targets (N,); got {tuple(logits.shape)} and {tuple(targets.shape)}")
    num_classes = logits.shape[1]
    one_hot = torch.zeros_like(logits, dtype=torch.float).scatter_(1, targets.view(-1, 1), 1.0)
    smoothed = one_hot * (1 - label_smoothing) + (1 - one_hot) * label_smoothing / (num_classes - 1)
    loss = F.kl_div(F.log_softmax(logits.float(), dim=1), smoothed, reduction="none").sum(1)
    if drop_worst_ratio > 0:
        loss = loss.topk(int(loss.shape[0] * (1 - drop_worst_ratio)), largest=False).values
    return loss.mean()


for _size, _res in (("base", 224), ("base", 480), ("large", 480)):
    register_model(f"beit3_{_size}_patch16_{_res}_captioning", BEiT3ForCaptioning, _size, img_size=_res, patch_size=16, normalize_output=True)
register_model("beit3_tiny_patch8_32_captioning", BEiT3ForCaptioning, "tiny", img_size=32, patch_size=8, normalize_output=True)
