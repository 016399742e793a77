"""The BEiT-3 backbone: embeddings + a Multiway Transformer encoder, computing exactly what the official
torchscale ``BEiT3`` computes (``torchscale/model/BEiT3.py``, tested against it), with the official parameter names so the
released checkpoints load unchanged.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import partial
from typing import Optional

import torch
from timm.layers import DropPath
from torch import nn
from torch.utils.checkpoint import checkpoint

from .input_embeddings import POSITION_OFFSET, MultiwayPositionEmbedding, VisionEmbedding
from .layers import (
    IMAGE_ONLY,
    TEXT_ONLY,
    FeedForward,
    MultiwayAttention,
    RowSelection,
    SequenceParts,
    attention_bias,
    drop_path_rates,
    init_linear_and_norm,
    join_parts,
    routed,
    split_parts,
)

@dataclass
class BEiT3Config:
    """Hyper-parameters of a BEiT-3 backbone. Defaults are BEiT-3 base at 224 px."""

    embed_dim: int = 768
    depth: int = 12
    num_heads: int = 12
    ffn_dim: int = 3072
    img_size: int = 224
    patch_size: int = 16
    in_chans: int = 3
    vocab_size: int = 64010
    max_text_positions: int = 1024
    normalize_output: bool = True
    drop_path_rate: float = 0.0
    layernorm_eps: float = 1e-5
    checkpoint_activations: bool = False
    share_attention: bool = False  # paper/VLMo variant: one attention for both modalities
    vl_expert_layers: int = 0  # paper variant: vision-language FFN experts in the top K layers
    # Initialisation only (a loaded checkpoint replaces it). Official: every Linear trunc-normal(0.02) cut at ±1 std
    # (actual std 0.011) and both position tables N(0, 1) (nn.Embedding's default), which outweigh the text
    # embeddings (std embed_dim^-0.5) 11x at width 128 and 28x at 768. README "Grounding".
    init_truncation: float = 1.0
    position_init_std: float = 1.0
    head_init: str = "official"  # task and pretraining heads: "official" or "xavier" (see heads.init_head)

    def __post_init__(self) -> None:
        positive = ("embed_dim", "depth", "num_heads", "ffn_dim", "img_size", "patch_size", "in_chans", "vocab_size")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ValueError(f"model config '{name}' must be positive, got {getattr(self, name)}")
        if self.embed_dim % self.num_heads:
            raise ValueError(f"model config 'embed_dim' ({self.embed_dim}) must be divisible by 'num_heads' ({self.num_heads})")
        if self.img_size % self.patch_size:
            raise ValueError(f"model config 'img_size' ({self.img_size}) must be a multiple of 'patch_size' ({self.patch_size})")
        if self.max_text_positions <= POSITION_OFFSET:
            raise ValueError(f"model config 'max_text_positions' must exceed {POSITION_OFFSET}, got {self.max_text_positions}")
        if not 0 <= self.vl_expert_layers <= self.depth:
            raise ValueError(f"model config 'vl_expert_layers' must be in [0, depth={self.depth}], got {self.vl_expert_layers}")
        if self.head_init not in ("official", "xavier"):
            raise ValueError(f"model config 'head_init' must be 'official' or 'xavier', got '{self.head_init}'")
        if self.init_truncation <= 0 or self.position_init_std <= 0:
            raise ValueError("model config 'init_truncation' and 'position_init_std' must be positive")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ValueError(f"model config 'drop_path_rate' must be in [0, 1), got {self.drop_path_rate}")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2

    def replace(self, **changes) -> "BEiT3Config":
        return dataclasses.replace(self, **changes)


class EncoderLayer(SequenceParts):
    """Pre-LN Multiway block: ``x + DropPath(Attn(LN(x)))`` then ``x + DropPath(FFN(LN(x)))``."""

    def __init__(self, cfg: BEiT3Config, drop_path: float, vl_expert: bool):
        super().__init__()
        dim, eps = cfg.embed_dim, cfg.layernorm_eps
        self.self_attn = MultiwayAttention(dim, cfg.num_heads, eps, shared=cfg.share_attention)
        self.self_attn_layer_norm = routed(nn.LayerNorm(dim, eps=eps), shared=cfg.share_attention)
        self.ffn = routed(FeedForward(dim, cfg.ffn_dim, eps), with_vl_expert=vl_expert)
        self.final_layer_norm = routed(nn.LayerNorm(dim, eps=eps), with_vl_expert=vl_expert)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward_parts(
        self,
        parts: list[torch.Tensor],
        split: int,
        attn_bias: Optional[torch.Tensor] = None,
        incremental_state: Optional[dict] = None,
        selection: Optional[RowSelection] = None,
    ) -> list[torch.Tensor]:
        """The block on the sequence kept as its per-modality parts (see ``layers.split_parts``).

        With ``selection`` only the selected positions are computed past the keys and values, and the parts come back
        as their selected rows (see ``layers.RowSelection``): the last layer of a masked-prediction step needs no more.
        """
        keep = self._drop_path_scale(parts[0])
        normed = self.self_attn_layer_norm.forward_parts(parts, split)
        if selection is None:
            h = self.self_attn.forward_parts(normed, split, attn_bias, incremental_state)
        else:
            h = self.self_attn.forward_selected(normed, split, attn_bias, selection)
            parts = selection.rows(parts)
        parts = self._residual(parts, h, keep, selection)
        h = self.ffn.forward_parts(self.final_layer_norm.forward_parts(parts, split), split)
        return self._residual(parts, h, self._drop_path_scale(parts[0], selection), selection)

    def _drop_path_scale(self, x: torch.Tensor, selection: Optional[RowSelection] = None) -> Optional[torch.Tensor]:
        """Per-sample stochastic-depth factor shared by all parts (drawn as ``timm.layers.DropPath`` draws it)."""
        if not isinstance(self.drop_path, DropPath) or not self.training or self.drop_path.drop_prob == 0.0:
            return None
        batch = x.shape[0] if selection is None else selection.batch
        keep_prob = 1.0 - self.drop_path.drop_prob
        return x.new_empty((batch, 1, 1)).bernoulli_(keep_prob).div_(keep_prob)

    @staticmethod
    def _residual(
        parts: list[torch.Tensor], h: list[torch.Tensor], keep: Optional[torch.Tensor], selection: Optional[RowSelection]
    ) -> list[torch.Tensor]:
        if keep is None:
            return [x + y for x, y in zip(parts, h)]
        if selection is None:
            return [x + y * keep for x, y in zip(parts, h)]
        return [x + y * keep[s, 0] for x, y, s in zip(parts, h, selection.samples)]


class Encoder(nn.Module):
    """Position embeddings, the stack of Multiway layers and the optional final (Multiway) LayerNorm."""

    def __init__(self, cfg: BEiT3Config):
        super().__init__()
        self.embed_positions = MultiwayPositionEmbedding(cfg.num_patches + 1, cfg.max_text_positions, cfg.embed_dim)
        rates = drop_path_rates(cfg.drop_path_rate, cfg.depth)
        first_vl = cfg.depth - cfg.vl_expert_layers
        self.layers = nn.ModuleList(EncoderLayer(cfg, rates[i], vl_expert=i >= first_vl) for i in range(cfg.depth))
        self.layer_norm = routed(nn.LayerNorm(cfg.embed_dim, eps=cfg.layernorm_eps)) if cfg.normalize_output else None
        self.grad_checkpointing = cfg.checkpoint_activations
        self.checkpoint_every = 1  # with grad_checkpointing: checkpoint layers 0, k, 2k, ...

    def checkpointed(self, idx: int) -> bool:
        return bool(self.grad_checkpointing) and idx % max(1, self.checkpoint_every) == 0

    def forward(
        self,
        x: torch.Tensor,
        split: int,
        attn_bias: Optional[torch.Tensor] = None,
        incremental_state: Optional[dict] = None,
        return_all_hiddens: bool = False,
        selection: Optional[RowSelection] = None,
    ) -> tuple[torch.Tensor, Optional[list[torch.Tensor]]]:
        """Run every layer; ``incremental_state`` maps layer index -> {prev_key, prev_value} for decoding.

        The sequence is split into its modality parts once and joined again after the last layer, so routing inside
        the layers never slices or concatenates the residual stream. With ``selection`` the last layer computes only
        the selected positions and the result is their rows, (N, D).
        """
        states = [x] if return_all_hiddens else None
        use_checkpoint = self.training and torch.is_grad_enabled()
        parts = split_parts(x, split)
        last = len(self.layers) - 1
        for idx, layer in enumerate(self.layers):
            layer_state = None if incremental_state is None else incremental_state.setdefault(idx, {})
            layer_selection = selection if idx == last else None
            if use_checkpoint and layer_state is None and self.checkpointed(idx):
                parts = checkpoint(_run_layer, layer, split, attn_bias, layer_selection, *parts, use_reentrant=False)
            else:
                parts = layer.forward_parts(parts, split, attn_bias, layer_state, layer_selection)
            if states is not None:
                states.append(join_parts(parts))
        if self.layer_norm is not None:
            parts = self.layer_norm.forward_parts(parts, split)
        return join_parts(parts), states


def _run_layer(
    layer: "EncoderLayer", split: int, attn_bias: Optional[torch.Tensor], selection: Optional[RowSelection], *parts
) -> list:
    return layer.forward_parts(list(parts), split, attn_bias, None, selection)


class BEiT3(nn.Module):
    """The BEiT-3 backbone shared by pretraining and every task head.

    ``forward`` takes the official keywords and returns a dict with ``encoder_out`` (B, L, D), ``encoder_embedding``,
    ``encoder_padding_mask`` (B, L), ``multiway_split_position`` (-1 image only, 0 text only, else the number of
    vision tokens) and, with ``return_all_hiddens=True``, ``encoder_states`` (the input of layer 0 and the output of
    every layer, before the final LayerNorm).

    ``vision_keep`` (B, K) patch indexes encodes only those patches (with their own positions) after the CLS: the
    vision part is then 1 + K tokens long (MAE's visible-only encoder, FLIP's patch dropping).

    ``output_positions`` (bool (B, L), True where an output is needed) makes the last layer compute only those
    positions past its keys and values; ``encoder_out`` is then their rows, (N, D): the vision part's selected rows
    row-major, then the text part's (= ``cat([out[:, :k][m[:, :k]], out[:, k:][m[:, k:]]])`` of the full output with
    ``k`` the split position). Masked-prediction training needs only the masked positions.
    """

    def __init__(self, config: BEiT3Config):
        super().__init__()
        self.config = config
        self.text_embed = nn.Embedding(config.vocab_size, config.embed_dim)
        self.vision_embed = VisionEmbedding(config.img_size, config.patch_size, config.in_chans, config.embed_dim)
        self.encoder = Encoder(config)
        self.apply(partial(init_linear_and_norm, cut=config.init_truncation))
        nn.init.normal_(self.text_embed.weight, mean=0.0, std=config.embed_dim**-0.5)
        if config.position_init_std != 1.0:  # else keep nn.Embedding's own N(0, 1) draw (official init, same RNG use)
            for table in (self.encoder.embed_positions.A, self.encoder.embed_positions.B):
                nn.init.normal_(table.weight, mean=0.0, std=config.position_init_std)

    # -- helpers used by training code -------------------------------------------------------------------------
    def set_grad_checkpointing(self, enable: bool = True, every: int = 1) -> None:
        """Activation checkpointing of the encoder layers: off, every layer (``every=1``) or every k-th layer."""
        if every < 1:
            raise ValueError(f"checkpointing 'every' must be >= 1, got {every}")
        self.encoder.grad_checkpointing = bool(enable)
        self.encoder.checkpoint_every = every

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay besides 1-D tensors and biases (official optimizer rule)."""
        return {"encoder.embed_positions.A.weight", "vision_embed.cls_token"}

    def num_layers_for_lr_decay(self) -> int:
        """L of the engine's layer decay ``decay ** (L + 1 - layer_id)``: the depth (official ``get_num_layers``), so
        the top id ``depth + 1`` gets scale 1."""
        return self.config.depth

    def get_layer_id(self, name: str) -> int:
        """Layer-wise lr decay id: 0 for embeddings, i+1 for ``layers.i.``, depth+1 for everything else."""
        if "embed" in name:
            return 0
        if "layers." in name:
            return int(name.split("layers.")[1].split(".")[0]) + 1
        return self.config.depth + 1

    # -- forward --------------------------------------------------------------------------------------------------
    def forward(
        self,
        textual_tokens: Optional[torch.Tensor] = None,
        visual_tokens: Optional[torch.Tensor] = None,
        text_padding_position: Optional[torch.Tensor] = None,
        attn_mask: Optional[torch.Tensor] = None,
        vision_masked_position: Optional[torch.Tensor] = None,
        incremental_state: Optional[dict] = None,
        positions: Optional[torch.Tensor] = None,
        return_all_hiddens: bool = False,
        output_positions: Optional[torch.Tensor] = None,
        vision_keep: Optional[torch.Tensor] = None,
    ) -> dict:
        if textual_tokens is None and visual_tokens is None:
            raise ValueError("BEiT3.forward needs textual_tokens, visual_tokens or both")
        parts = []
        vision_len = text_len = 0
        if visual_tokens is not None:
            parts.append(self.vision_embed(visual_tokens, vision_masked_position, vision_keep))
            vision_len = parts[-1].shape[1]
        if textual_tokens is not None:
            if textual_tokens.dim() != 2:
                raise ValueError(f"textual_tokens must be (batch, length) token ids; got shape {tuple(textual_tokens.shape)}")
            # a bare IndexError (or a CUDA device assert) otherwise; skipped in GPU training, where it would sync
            checked = not self.training or textual_tokens.device.type == "cpu"
            if checked and textual_tokens.numel() and not torch.compiler.is_compiling() and not torch.jit.is_tracing():
                low, high = int(textual_tokens.min()), int(textual_tokens.max())
                if low < 0 or high >= self.config.vocab_size:
                    raise ValueError(
                        f"textual_tokens hold id {high if high >= self.config.vocab_size else low}, outside this model's "
                        f"vocabulary [0, {self.config.vocab_size}): use the text tokenizer the model was trained with "
                        "(beit3.get_tokenizer) or build the model with its vocab_size")
            parts.append(self.text_embed(textual_tokens))
            text_len = textual_tokens.shape[1]
        if len(parts) == 2 and parts[0].shape[0] != parts[1].shape[0]:
            raise ValueError(f"image batch ({parts[0].shape[0]}) and text batch ({parts[1].shape[0]}) differ in size")
        split = IMAGE_ONLY if textual_tokens is None else TEXT_ONLY if visual_tokens is None else vision_len
        embedding = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        batch = embedding.shape[0]

        padding_mask = torch.zeros(batch, vision_len + text_len, dtype=torch.bool, device=embedding.device)
        if text_padding_position is not None and textual_tokens is not None:
            if text_padding_position.shape != textual_tokens.shape:
                raise ValueError(
                    f"text_padding_position has shape {tuple(text_padding_position.shape)}, "
                    f"textual_tokens {tuple(textual_tokens.shape)}; they must match"
                )
            padding_mask[:, vision_len:] = text_padding_position.bool()

        if vision_keep is not None and visual_tokens is None:
            raise ValueError("vision_keep selects image patches: pass visual_tokens too")
        x = embedding + self.encoder.embed_positions(vision_len, text_len, positions, vision_keep)
        x = x * (1 - padding_mask.unsqueeze(-1).to(x.dtype))

        key_len = x.shape[1]
        if incremental_state is not None and 0 in incremental_state and "prev_key" in incremental_state[0]:
            key_len += incremental_state[0]["prev_key"].shape[2]
        attn_bias = attention_bias(
            x.shape[1],
            key_len,
            padding_mask if incremental_state is None else None,
            attn_mask,
            x.dtype,
            x.device,
        )
        selection = None
        if output_positions is not None:
            selection = self._output_selection(output_positions, split, padding_mask.shape, incremental_state, return_all_hiddens)
        x, states = self.encoder(x, split, attn_bias, incremental_state, return_all_hiddens, selection)
        out = {
            "encoder_out": x,
            "encoder_embedding": embedding,
            "encoder_padding_mask": padding_mask,
            "multiway_split_position": split,
        }
        if states is not None:
            out["encoder_states"] = states
        return out

    @staticmethod
    def _output_selection(
        output_positions: torch.Tensor, split: int, shape: torch.Size, incremental_state, return_all_hiddens: bool
    ) -> RowSelection:
        if tuple(output_positions.shape) != tuple(shape):
            raise ValueError(
                f"output_positions has shape {tuple(output_positions.shape)}; it must be (batch, sequence length) = "
                f"{tuple(shape)}, vision tokens (CLS first) then text tokens"
            )
        if incremental_state is not None or return_all_hiddens:
            raise ValueError("output_positions cannot be combined with incremental_state or return_all_hiddens")
        return RowSelection.from_masks(split_parts(output_positions.to(torch.bool), split))
