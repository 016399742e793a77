"""VQ-KD visual tokenizer (BEiT v2): ViT encoder -> fp32 projection -> l2-normalised EMA codebook -> ViT decoder.

The encoder and decoder are timm ``Beit`` models configured as the official ``VisionTransformer`` of BEiT v2
(LayerNorm eps 1e-6, absolute position embedding, q/v biases with a bias-free ``qkv``, no relative position bias,
no layer scale, ``fc_norm`` on the patch tokens), so the state-dict keys are exactly the official ones::

    encoder.{cls_token, pos_embed, patch_embed.proj.*, blocks.i.*, fc_norm.*}
    encode_task_layer.{0,2}.*          Linear(E,E) - Tanh - Linear(E,D), run in fp32
    quantize.{embedding.weight, embedding.cluster_size, embedding.embed_avg, embedding.initted, cluster_size}
    decoder.{...same as encoder, patch_embed.proj.weight [E,D,1,1]...}
    decode_task_layer.{0,2}.*          Linear(E,E) - Tanh - Linear(E,T)

Images enter as ``[B,3,S,S]`` tensors in [0,1] and are mapped to [-1,1] as the official ``pre_process``. Codes are
returned in row-major patch order.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from timm.layers import trunc_normal_
from timm.models.beit import Beit
from torch import nn

from beit3.config import ConfigError, to_dict
from tokenizer.quantizer import NormEMAQuantizer, l2norm

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class VQKDConfig:
    """Architecture and codebook hyper-parameters of a VQ-KD tokenizer (defaults: official base, 3x decoder, CLIP)."""

    img_size: int = 224
    patch_size: int = 16
    width: int = 768
    depth: int = 12
    num_heads: Optional[int] = None  # None: width // 64 as in every official model; 1 head when width < 64
    mlp_ratio: float = 4.0
    decoder_depth: int = 3
    codebook_size: int = 8192
    code_dim: int = 32
    target_dim: int = 512  # teacher feature dimension (CLIP ViT-B/16: 512, DINO ViT-B/16: 768)
    beta: float = 1.0  # commitment loss weight
    ema_decay: float = 0.99
    kmeans_init: bool = True
    kmeans_iters: int = 10
    restart_after_steps: int = 0  # dead-code restart; 0 = off (official behaviour)

    def __post_init__(self) -> None:
        for name in ("img_size", "patch_size", "width", "depth", "decoder_depth", "codebook_size", "code_dim",
                     "target_dim", "kmeans_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"VQKDConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.img_size % self.patch_size:
            raise ConfigError(f"VQKDConfig.img_size {self.img_size} is not a multiple of patch_size {self.patch_size}")
        if self.width % self.heads:
            raise ConfigError(f"VQKDConfig.width {self.width} is not divisible by num_heads {self.heads}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"VQKDConfig.ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.restart_after_steps < 0:
            raise ConfigError(f"VQKDConfig.restart_after_steps must be >= 0, got {self.restart_after_steps}")

    @property
    def heads(self) -> int:
        return self.num_heads or max(self.width // 64, 1)

    @property
    def grid_size(self) -> int:
        return self.img_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size ** 2


NAMED_CONFIGS: dict[str, VQKDConfig] = {
    # Unit tests: 32 px, 16 tokens, tiny codebook.
    "vqkd_tiny": VQKDConfig(img_size=32, patch_size=8, width=32, depth=1, decoder_depth=1, codebook_size=64,
                            code_dim=8, target_dim=16),
    # CPU demo: 64 px images, patch 8 (64 tokens), codebook 1024 x 32, dead-code restart on (without it the 1024
    # codes collapse to a handful on small synthetic data). Meant for the centred, smoothed HOG
    # teacher ``tokenizer.teachers.DEMO_HOG_TEACHER`` (27-d; the training objective takes target_dim from the
    # teacher, 108 = plain 2x2-cell HOG): with the plain MaskFeat HOG the codes are used but carry no information.
    "vqkd_demo": VQKDConfig(img_size=64, patch_size=8, width=128, depth=4, decoder_depth=1, codebook_size=1024,
                            code_dim=32, target_dim=108, restart_after_steps=10),
    "vqkd_base_decoder_1x768x12": VQKDConfig(decoder_depth=1, target_dim=512),
    "vqkd_base_decoder_3x768x12": VQKDConfig(decoder_depth=3, target_dim=512),
    "vqkd_base_decoder_1x768x12_dino": VQKDConfig(decoder_depth=1, target_dim=768),
}


def vqkd_config(name: str, **overrides) -> VQKDConfig:
    """A named configuration (see ``NAMED_CONFIGS``) with optional field overrides."""
    if name not in NAMED_CONFIGS:
        raise ConfigError(f"unknown VQ-KD config '{name}' (known: {', '.join(sorted(NAMED_CONFIGS))})")
    return dataclasses.replace(NAMED_CONFIGS[name], **overrides)


def build_vit(img_size: int, patch_size: int, in_chans: int, cfg: VQKDConfig, depth: int) -> Beit:
    """A timm ``Beit`` configured as the official BEiT v2 ``VisionTransformer`` used inside VQ-KD."""
    return Beit(
        img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=0, global_pool="avg",
        embed_dim=cfg.width, depth=depth, num_heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, qkv_bias=True,
        init_values=None, use_abs_pos_emb=True, use_rel_pos_bias=False, use_shared_rel_pos_bias=False,
    )


def vit_patch_features(vit: Beit, x: torch.Tensor) -> torch.Tensor:
    """``fc_norm`` of the patch tokens (CLS dropped), ``[B,N,E]``; the official VQ-KD encoder/decoder output."""
    x = x.to(vit.patch_embed.proj.weight.dtype)
    return vit.fc_norm(vit.forward_features(x)[:, vit.num_prefix_tokens:])


def task_layer(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    """Linear - Tanh - Linear with trunc-normal(0.02) weights and zero biases."""
    layers = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, out_dim))
    for linear in (layers[0], layers[2]):
        trunc_normal_(linear.weight, std=0.02)
        nn.init.zeros_(linear.bias)
    return layers


def run_fp32(layers: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """Apply a ``task_layer`` in fp32 whatever the autocast state or parameter dtype."""
    with torch.autocast(x.device.type, enabled=False):
        x = x.float()
        for layer in layers:
            x = F.linear(x, layer.weight.float(), layer.bias.float()) if isinstance(layer, nn.Linear) else layer(x)
    return x


class VQKDOutput(NamedTuple):
    """Result of a tokenizer forward pass."""

    reconstruction: torch.Tensor  # [B,N,target_dim], regression to the teacher's features
    quant_loss: torch.Tensor  # scalar commitment loss
    codes: torch.Tensor  # [B,N] long, row-major patch order


class VQKD(nn.Module):
    """VQ-KD tokenizer: encoder, fp32 projection, ``NormEMAQuantizer``, decoder and regression head."""

    def __init__(self, config: VQKDConfig):
        super().__init__()
        self.config = config
        self.encoder = build_vit(config.img_size, config.patch_size, 3, config, config.depth)
        self.encode_task_layer = task_layer(config.width, config.width, config.code_dim)
        self.quantize = NormEMAQuantizer(
            config.codebook_size, config.code_dim, beta=config.beta, decay=config.ema_decay,
            kmeans_init=config.kmeans_init, kmeans_iters=config.kmeans_iters,
            restart_after_steps=config.restart_after_steps,
        )
        self.decoder = build_vit(config.grid_size, 1, config.code_dim, config, config.decoder_depth)
        self.decode_task_layer = task_layer(config.width, config.width, config.target_dim)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Check ``images [B,3,S,S]`` and map them to [-1,1] (x255 first when the batch max is <= 1, as official)."""
        size = self.config.img_size
        if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
            shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
            raise ValueError(f"VQ-KD expects images as a [B, 3, {size}, {size}] tensor in [0, 1], got {shape}")
        if images.shape[-2:] != (size, size):
            raise ValueError(
                f"VQ-KD was built for {size}x{size} images but got {images.shape[-2]}x{images.shape[-1]}; "
                f"resize/crop to {size}x{size} first"
            )
        images = images.float()
        if images.max() <= 1.0:
            images = images * 255.0
        return images / 127.5 - 1.0

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Projected (not yet normalised) encoder features ``[B,N,code_dim]`` in fp32."""
        return run_fp32(self.encode_task_layer, vit_patch_features(self.encoder, self.preprocess(images)))

    def decode(self, z_q: torch.Tensor) -> torch.Tensor:
        """Regress teacher features ``[B,N,target_dim]`` from quantized codes ``[B,N,code_dim]``."""
        grid = self.config.grid_size
        z_q = z_q.transpose(1, 2).reshape(z_q.shape[0], self.config.code_dim, grid, grid)
        return self.decode_task_layer(vit_patch_features(self.decoder, z_q))

    def forward(self, images: torch.Tensor) -> VQKDOutput:
        z_q, quant_loss, codes = self.quantize(self.encode(images))
        return VQKDOutput(self.decode(z_q), quant_loss, codes)

    @torch.no_grad()
    def get_codebook_indices(self, images: torch.Tensor) -> torch.Tensor:
        """Code ids ``[B,N]`` (long, row-major) of [0,1] images; fp32 nearest-code search; never changes state."""
        z = l2norm(self.encode(images))
        return self.quantize.nearest_codes(z)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` and ``model.safetensors`` to ``directory``; returns the directory."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_FILE).write_text(json.dumps({"model_type": "vqkd", **to_dict(self.config)}, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        return directory
