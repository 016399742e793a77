"""Same-run baselines of the benchmark (see :mod:`beit3.bench.run`): the official torchscale ``BEiT3`` holding our
weights, and a timm ``vit_base_patch16_224``-shaped ViT of the model's width and depth. Each is None when its
package is not importable."""
from __future__ import annotations

from typing import Callable, Optional

import torch

from beit3.models.backbone import BEiT3, BEiT3Config


def torchscale_twin(model: BEiT3) -> Optional[torch.nn.Module]:
    """The official torchscale ``BEiT3`` with the same config and weights as ``model`` (None if not importable)."""
    try:
        from torchscale.architecture.config import EncoderConfig
        from torchscale.model.BEiT3 import BEiT3 as TorchscaleBEiT3
    except Exception:  # noqa: BLE001 - optional baseline
        return None
    c = model.config
    args = EncoderConfig(
        img_size=c.img_size, patch_size=c.patch_size, in_chans=c.in_chans, vocab_size=c.vocab_size, multiway=True,
        layernorm_embedding=False, normalize_output=c.normalize_output, no_output_layer=True, drop_path_rate=0.0,
        encoder_embed_dim=c.embed_dim, encoder_attention_heads=c.num_heads, encoder_ffn_embed_dim=c.ffn_dim,
        encoder_layers=c.depth, max_source_positions=c.max_text_positions, layernorm_eps=c.layernorm_eps,
        checkpoint_activations=False,
    )
    twin = TorchscaleBEiT3(args)
    twin.load_state_dict(model.state_dict(), strict=True)
    return twin.to(next(model.parameters()).device)


def timm_vit(cfg: BEiT3Config) -> Optional[torch.nn.Module]:
    try:
        import timm
    except Exception:  # noqa: BLE001
        return None
    return timm.create_model(
        "vit_base_patch16_224", pretrained=False, num_classes=0, img_size=cfg.img_size, patch_size=cfg.patch_size,
        embed_dim=cfg.embed_dim, depth=cfg.depth, num_heads=cfg.num_heads, mlp_ratio=cfg.ffn_dim / cfg.embed_dim,
    )


def vit_step(vit: torch.nn.Module, images: torch.Tensor) -> Callable[[], None]:
    def step() -> None:
        vit.zero_grad(set_to_none=True)
        vit.forward_features(images).float().square().mean().backward()
    return step
