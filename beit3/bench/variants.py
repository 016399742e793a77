"""Benchmark cases of the neighbours' efficiency options (see :mod:`beit3.bench.run`), each timed beside its own
baseline in one interleaved run:

- ``pretrain_pixels_visible`` / ``pretrain_pixels_full``: the image stream with MAE pixel targets (75% of the patches
  masked at random, the decoder of ``objective.pixel_decoder``), the encoder seeing only the visible patches or
  every patch (its mask token at the masked ones);
- ``contrastive_flip`` / ``contrastive_full``: the retrieval model's contrastive loss (image and text encoded apart)
  with 50% of each image's patches dropped before the encoder (FLIP) or none.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from beit3.bench.common import BenchConfig, configure_model, sequence_flops
from beit3.models.backbone import BEiT3Config
from beit3.models.pixel_decoder import PixelDecoderConfig

MAE_CASES = ("pretrain_pixels_visible", "pretrain_pixels_full")
FLIP_CASES = ("contrastive_flip", "contrastive_full")
MAE_MASK_RATIO = 0.75
FLIP_PATCH_DROP = 0.5


def decoder_for(cfg: BEiT3Config) -> PixelDecoderConfig:
    """MAE's decoder (512 wide, 8 blocks) for base-sized models and up; half the encoder's width, 1 block, below."""
    if cfg.embed_dim >= 768:
        return PixelDecoderConfig()
    return PixelDecoderConfig(width=max(16, cfg.embed_dim // 2), depth=1, num_heads=max(1, cfg.num_heads // 2))


def mae_flops(cfg: BEiT3Config, decoder: PixelDecoderConfig, batch: int, visible: int) -> float:
    """Training FLOPs of an MAE image step: the encoder on CLS + ``visible`` patches, the decoder on all of them."""
    seq = cfg.num_patches + 1
    w, depth = decoder.width, decoder.depth
    dec = 6.0 * depth * 12 * w * w * seq + 12.0 * depth * w * seq**2 + 6.0 * w * cfg.patch_size**2 * cfg.in_chans * seq
    return batch * (sequence_flops(cfg, 1 + visible) + dec)


def variant_cases(cfg: BEiT3Config, inputs: dict, bench: BenchConfig, device: torch.device
                  ) -> tuple[dict[str, Callable[[], None]], dict[str, float]]:
    """The requested MAE and FLIP step functions and their model FLOPs (each case pair on one model)."""
    fns: dict[str, Callable[[], None]] = {}
    flops: dict[str, float] = {}
    if any(c in bench.cases for c in MAE_CASES):
        _mae_cases(cfg, inputs, bench, device, fns, flops)
    if any(c in bench.cases for c in FLIP_CASES):
        _flip_cases(cfg, inputs, bench, device, fns, flops)
    return fns, flops


def _mae_cases(cfg, inputs, bench, device, fns, flops) -> None:
    from beit3.masked_data_modeling import MaskedDataModeling, ObjectiveConfig
    from beit3.masking import MaskingConfig, image_mask_generator
    from beit3.models.pretraining import BEiT3ForPretraining

    decoder = decoder_for(cfg)
    model = BEiT3ForPretraining(cfg, image_target="pixels", pixel_decoder=vars(decoder)).to(device)
    configure_model(model, bench)
    masks = image_mask_generator((cfg.img_size // cfg.patch_size,) * 2,
                                 MaskingConfig(image_mask_ratio=MAE_MASK_RATIO, image_mask_style="random"))
    mask = masks.batch(bench.batch, np.random.default_rng(bench.seed)).to(device)
    batch = {"image": {"image": inputs["images"], "image_mask": mask}}
    visible = cfg.num_patches - masks.num_masked
    for name, visible_only in (("pretrain_pixels_visible", True), ("pretrain_pixels_full", False)):
        if name not in bench.cases:
            continue
        objective = MaskedDataModeling(model, ObjectiveConfig(image_target="pixels", pixel_decoder=decoder,
                                                              visible_only=visible_only))
        fns[name] = _loss_step(objective, lambda o=objective: o(batch)[0])
        flops[name] = mae_flops(cfg, decoder, bench.batch, visible if visible_only else cfg.num_patches)


def _flip_cases(cfg, inputs, bench, device, fns, flops) -> None:
    from beit3.models.tasks.retrieval import BEiT3ForRetrieval

    model = BEiT3ForRetrieval(cfg).to(device).train()
    configure_model(model, bench)
    kept = cfg.num_patches - round(FLIP_PATCH_DROP * cfg.num_patches)
    text_len = inputs["tokens"].shape[1]
    for name, drop in (("contrastive_flip", FLIP_PATCH_DROP), ("contrastive_full", 0.0)):
        if name not in bench.cases:
            continue
        fns[name] = _loss_step(model, lambda d=drop: model(image=inputs["images"], text_description=inputs["tokens"],
                                                             padding_mask=inputs["padding"], patch_drop=d)[0])
        image_tokens = 1 + (kept if drop else cfg.num_patches)
        flops[name] = bench.batch * (sequence_flops(cfg, image_tokens) + sequence_flops(cfg, text_len))


def _loss_step(module: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def step() -> None:
        module.zero_grad(set_to_none=True)
        loss_fn().backward()
    return step
