"""BEiT-3 with its masked-data-modeling heads, named as in the official pretrained checkpoints
(``mim_head`` over the visual-token codebook, ``mlm_head`` over the text vocabulary), and optional VLMo/ALBEF heads
(``vision_head`` / ``language_head`` / ``logit_scale`` for image-text contrast, ``itm_head`` for matching) under the
names the retrieval model uses, so a retrieval fine-tune starts from them."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .backbone import BEiT3Config
from .checkpoint import CONFIG_FILE, CheckpointError, from_pretrained, load_checkpoint, read_state_dict
from .contrastive import ITMHead, add_contrastive_heads
from .task_model import BEiT3TaskModel
from .layers import init_linear_and_norm
from .pixel_decoder import PixelDecoder, PixelDecoderConfig, visible_patches
from .registry import model_config, register_model_class

Head = Literal["masked", "contrastive", "matching"]
ImageTarget = Literal["vqkd", "pixels"]


@register_model_class
class BEiT3ForPretraining(BEiT3TaskModel):
    """Backbone + MIM head (``codebook_size`` classes; or, with ``image_target="pixels"``, an MAE pixel decoder sized
    by ``pixel_decoder``) + MLM head (``vocab_size`` classes), optionally the contrastive heads (``contrastive=True``)
    and the matching head (``matching=True``).

    Only masked positions reach the heads, so the 64k-way MLM head spends no work on the unmasked majority; with
    ``masked_only_last_layer`` the last layer too computes only them past its keys and values
    (``BEiT3(output_positions=...)``). ``forward(head=...)`` selects the pass, so that every head runs inside this
    module's forward (ZeRO-3 gathers a module's own parameters, ``logit_scale``, around its forward).
    """

    def __init__(self, config: BEiT3Config, codebook_size: int = 8192, contrastive: bool = False,
                 matching: bool = False, image_target: ImageTarget = "vqkd", pixel_decoder: Optional[dict] = None):
        if image_target not in ("vqkd", "pixels"):
            raise ValueError(f"image_target must be 'vqkd' or 'pixels', got '{image_target}'")
        extra = {} if image_target == "vqkd" else {"image_target": image_target,
                                                    "pixel_decoder": dict(pixel_decoder or {})}
        super().__init__(config, codebook_size=codebook_size, contrastive=contrastive, matching=matching, **extra)
        self.mim_head = self.pixel_decoder = None
        if image_target == "vqkd":
            self.mim_head = nn.Linear(config.embed_dim, codebook_size)
            self.mim_head.apply(init_linear_and_norm)
        else:
            self.pixel_decoder = PixelDecoder(config.embed_dim, config.num_patches, config.patch_size, config.in_chans,
                                              PixelDecoderConfig(**(pixel_decoder or {})), config.layernorm_eps)
        self.mlm_head = nn.Linear(config.embed_dim, config.vocab_size)
        self.mlm_head.apply(init_linear_and_norm)
        if contrastive:
            add_contrastive_heads(self, config.embed_dim)
        self.itm_head = ITMHead(config.embed_dim, config.layernorm_eps) if matching else None
        if self.itm_head is not None:
            self.init_head(self.itm_head)

    @staticmethod
    def heads_of(state: dict) -> dict:
        """Constructor arguments that fit a state dict's heads: ``codebook_size``, ``contrastive``, ``matching``, and
        ``image_target="pixels"`` for a pixel decoder (whose ``pixel_decoder`` sizes the caller passes: the state
        does not say how many heads it has)."""
        heads = {"contrastive": "logit_scale" in state, "matching": "itm_head.classifier.weight" in state}
        if "mim_head.weight" in state:
            return {"codebook_size": state["mim_head.weight"].shape[0], **heads}
        return {**heads, "image_target": "pixels"}

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | ({"logit_scale"} if hasattr(self, "logit_scale") else set())

    def forward(
        self,
        images: Optional[torch.Tensor] = None,
        image_mask: Optional[torch.Tensor] = None,
        text_tokens: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
        text_mask: Optional[torch.Tensor] = None,
        masked_only_last_layer: bool = False,
        attn_mask: Optional[torch.Tensor] = None,
        head: Head = "masked",
        visible_only: bool = False,
        vision_keep: Optional[torch.Tensor] = None,
    ) -> dict[str, torch.Tensor]:
        """``head="masked"``: encode an image, text or image-text batch; return MIM logits of the masked patches
        (row-major, in batch order) and MLM logits of the masked text positions. ``masked_only_last_layer``: compute
        the last layer past its keys and values only at those positions (same logits up to rounding, fewer FLOPs).
        ``attn_mask``: the backbone's mask (non-zero = blocked), e.g. to cut one modality off the other.

        ``head="contrastive"``: images and texts encoded *separately*; returns L2-normalised ``image_features`` (vision
        CLS -> ``vision_head``), ``text_features`` (BOS -> ``language_head``) and ``logit_scale`` (exp, clamped at
        100 as CLIP). ``head="matching"``: the pairs encoded jointly; returns ``itm`` match logits (B,).
        ``vision_keep`` (B, K) patch indexes: the contrastive pass encodes only those patches (FLIP).

        With ``image_target="pixels"`` the masked pass returns ``pixels`` instead of ``mim``: the pixel decoder's
        predictions of the masked patches (row-major, (M, p * p * C)); ``visible_only`` encodes only the unmasked
        patches and lets the decoder fill in the others (MAE), else the encoder sees its mask token there."""
        if head == "contrastive":
            return self._contrastive(images, text_tokens, padding_mask, vision_keep)
        if head == "matching":
            if self.itm_head is None:
                raise RuntimeError("this BEiT3ForPretraining has no matching head; build it with matching=True")
            out = self.beit3(textual_tokens=text_tokens, visual_tokens=images, text_padding_position=padding_mask)
            return {"itm": self.itm_head(out["encoder_out"])}
        if head != "masked":
            raise ValueError(f"unknown head '{head}'; use 'masked', 'contrastive' or 'matching'")
        if self.pixel_decoder is not None and images is not None:
            if masked_only_last_layer:
                raise ValueError("masked_only_last_layer needs image_target 'vqkd': the pixel decoder reads every "
                                 "patch")
            return self._masked_pixels(images, image_mask, text_tokens, padding_mask, text_mask, attn_mask,
                                       visible_only)
        kwargs = dict(textual_tokens=text_tokens, visual_tokens=images, text_padding_position=padding_mask,
                      vision_masked_position=image_mask, attn_mask=attn_mask)
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

    def _masked_pixels(self, images, image_mask, text_tokens, padding_mask, text_mask, attn_mask,
                       visible_only: bool) -> dict[str, torch.Tensor]:
        keep = visible_patches(image_mask) if visible_only and image_mask is not None else None
        features = self.beit3(textual_tokens=text_tokens, visual_tokens=images, text_padding_position=padding_mask,
                              vision_masked_position=None if keep is not None else image_mask, attn_mask=attn_mask,
                              vision_keep=keep)["encoder_out"]
        vision_len = 1 + (keep.shape[1] if keep is not None else self.config.num_patches)
        logits = {}
        if image_mask is not None:
            logits["pixels"] = self.pixel_decoder(features[:, :vision_len], keep)[image_mask.bool()]
        if text_mask is not None:
            logits["mlm"] = self.mlm_head(features[:, vision_len:][text_mask.bool()])
        return logits

    def _contrastive(self, images, text_tokens, padding_mask, vision_keep=None) -> dict[str, torch.Tensor]:
        if not hasattr(self, "logit_scale"):
            raise RuntimeError("this BEiT3ForPretraining has no contrastive heads; build it with contrastive=True")
        vision = self.beit3(visual_tokens=images, vision_keep=vision_keep)["encoder_out"][:, 0]
        text = self.beit3(textual_tokens=text_tokens, text_padding_position=padding_mask)["encoder_out"][:, 0]
        return {"image_features": F.normalize(self.vision_head(vision), dim=-1),
                "text_features": F.normalize(self.language_head(text), dim=-1),
                "logit_scale": self.logit_scale.exp().clamp(max=100.0)}


def load_pretraining_model(path: str | Path, model_name: str = "") -> BEiT3ForPretraining:
    """A :class:`BEiT3ForPretraining` with its MIM and MLM heads from ``path``: a ``save_pretrained`` directory (our
    export; also when ``path`` is the ``beit3_pretrained.pth`` inside one), or a checkpoint file in the official
    layout (``{"model": {beit3.*, mlm_head.*, mim_head.*}}``, e.g. ``beit3_base_patch16_224.pth``), built as the
    registry model ``model_name`` with the vocabulary, codebook and image size of the file."""
    path = Path(path)
    directory = path if path.is_dir() else path.parent
    if (directory / CONFIG_FILE).is_file() and (path.is_dir() or not model_name):
        model = from_pretrained(directory)
        if not isinstance(model, BEiT3ForPretraining):
            raise CheckpointError(f"'{directory}' holds a {type(model).__name__}, not a pretraining model (no MLM/MIM heads)")
        return model
    if path.is_dir():
        raise CheckpointError(f"'{path}' has no {CONFIG_FILE}: pass a checkpoint file")
    state = read_state_dict(path)
    for head in ("mlm_head.weight", "mim_head.weight"):
        if head not in state:
            raise CheckpointError(f"'{path}' has no '{head}': not a pretrained BEiT-3 checkpoint with its heads")
    if not model_name:
        raise CheckpointError(f"'{path}' is a bare checkpoint: name its architecture (e.g. beit3_base_patch16_224)")
    positions = state["beit3.encoder.embed_positions.A.weight"].shape[0] if "beit3.encoder.embed_positions.A.weight" in state else None
    patch = state["beit3.vision_embed.proj.weight"].shape[-1] if "beit3.vision_embed.proj.weight" in state else None
    overrides = {"vocab_size": state["mlm_head.weight"].shape[0]}
    if positions and patch:  # N + 1 CLS + 2 unused rows
        overrides.update(patch_size=patch, img_size=round((positions - 3) ** 0.5) * patch)
    model = BEiT3ForPretraining(model_config(model_name, **overrides), **BEiT3ForPretraining.heads_of(state))
    load_checkpoint(model, state, strict=True)
    return model
