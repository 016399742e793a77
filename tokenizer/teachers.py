"""Frozen regression teachers for VQ-KD: per-patch target features ``[B,N,C]`` on the tokenizer's patch grid.

Every teacher takes ``[B,3,S,S]`` images in [0,1], runs without gradients and stays in eval mode.

* ``timm``: any timm model built by name (e.g. ``vit_base_patch16_clip_224.openai`` for the official CLIP target,
  ``vit_base_patch16_224.dino`` for DINO) with weights from a local file (``.safetensors`` or a torch pickle read
  with ``weights_only=True``); the patch tokens of a chosen block, optionally through the final norm and the head
  applied per token (CLIP's visual projection). Images are normalised with the model's mean/std.
* ``hog``: MaskFeat-style histograms of oriented gradients (Sobel gradients per RGB channel, unsigned orientation
  bins weighted by magnitude, average-pooled over cells, l2-normalised per cell and channel), one vector of
  ``3 * bins * cells_per_side**2`` values per patch. No weights needed. (MaskFeat's Gaussian window is omitted.)
  A positive ``hog_norm_floor`` divides each cell by ``max(norm, floor)`` instead, so nearly flat cells (weak
  gradients, quantisation noise) stay small instead of being blown up to unit length. Two further options, both off
  by default (plain MaskFeat HOG): ``hog_smooth_sigma`` blurs the image with a Gaussian before the Sobel gradients
  (suppresses pixel noise), ``hog_center`` subtracts each patch's mean from its feature vector (see ``HOGTeacher``);
  ``hog_colour_weight > 0`` appends the patch's mean colour (3 more values).
* ``pixels``: the patch's pixels normalised by the patch mean and standard deviation (MAE ``norm_pix_loss``).
"""
from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import timm
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.data import resolve_model_data_config
from torch import nn

from beit3.errors import ConfigError, TeacherWeightsError


@dataclass
class TeacherConfig:
    """Which teacher produces the regression targets, and its options."""

    kind: Literal["hog", "pixels", "timm"] = "hog"
    model_name: str = ""  # timm: model name, e.g. vit_base_patch16_clip_224.openai
    weights: str = ""  # timm: local weight file (required)
    model_kwargs: dict = field(default_factory=dict)  # timm: extra create_model arguments, e.g. {img_size: 224}
    layer: int = -1  # timm: block whose patch tokens are the target (negative counts from the end)
    final_norm: bool = True  # timm: apply the model's final norm to that block's tokens
    apply_head: bool = False  # timm: apply the model's head per token (CLIP's visual projection)
    hog_bins: int = 9
    hog_cells_per_side: int = 2  # hog: cells per patch side; the patch size must be divisible by it
    hog_norm_floor: float = 0.0  # hog: cell histograms are divided by max(norm, floor); 0 = MaskFeat's l2 norm
    hog_smooth_sigma: float = 0.0  # hog: Gaussian blur (pixels) of the image before the gradients; 0 = none
    hog_center: bool = False  # hog: subtract each patch's mean feature value (zero-mean targets for the cosine loss)
    hog_colour_weight: float = 0.0  # hog: > 0 appends the patch's mean colour (RGB - 0.5) times this weight


# HOG settings for small noisy images (the CPU demo's ``vqkd_demo``, 64 px, patch 8): centring removes the direction
# all HOG targets share (see HOGTeacher), blurring and the norm floor keep pixel noise and faint textures from
# dominating flat cells, and one cell per patch (27-d target) averages the remaining noise. Why and how it was
# measured: README, "Visual tokenizer on the demo data".
DEMO_HOG_TEACHER = TeacherConfig(kind="hog", hog_bins=9, hog_cells_per_side=1, hog_norm_floor=0.1,
                                 hog_smooth_sigma=2.0, hog_center=True)


class FrozenTeacher(nn.Module):
    """Base class: no gradients, always in eval mode, ``feature_dim`` output channels."""

    feature_dim: int

    def train(self, mode: bool = True) -> "FrozenTeacher":
        return super().train(False)

    def _check(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects [B, 3, H, W] images in [0, 1], got {tuple(images.shape)}")


def patchify(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``[B,C,H,W] -> [B, (H/p)*(W/p), C*p*p]`` in row-major patch order."""
    b, c, h, w = x.shape
    x = x.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(b, (h // patch) * (w // patch), c * patch * patch)


class HOGTeacher(FrozenTeacher):
    """MaskFeat-style HOG features per patch.

    Why ``center`` exists: HOG values are non-negative magnitudes, so all targets share one dominant direction, and
    pixel noise moves the rest. Under the cosine loss the decoder then learns the mean target first, the gradient
    reaching the codes is almost the same for every patch, and the encoder outputs collapse onto one point: codes
    carry no information about the image (true vs. shuffled codes give the same loss) however many of them the
    dead-code restart keeps "in use" (measured: README, "Visual tokenizer on the demo data").
    Subtracting the per-patch mean (as MAE's ``norm_pix_loss`` does for pixels) removes that shared direction, so
    only the orientation structure of the patch is left to predict; ``smooth_sigma`` keeps that structure from
    being pixel noise in flat regions.

    Why ``colour_weight`` exists: each channel's histogram is normalised on its own, so HOG says where the edges are
    but hardly what colour a patch is. A semantic teacher (CLIP) also encodes colour; where colour is what the text
    talks about (the demo scenes), ``colour_weight > 0`` appends the patch's mean colour, centred at grey, times the
    weight (after the HOG centring, so the colour keeps its sign).
    """

    def __init__(self, patch_size: int, bins: int = 9, cells_per_side: int = 2, norm_floor: float = 0.0,
                 smooth_sigma: float = 0.0, center: bool = False, colour_weight: float = 0.0):
        super().__init__()
        if (bins < 1 or cells_per_side < 1 or patch_size % cells_per_side or norm_floor < 0 or smooth_sigma < 0
                or colour_weight < 0):
            raise ConfigError(
                f"HOG teacher: patch_size {patch_size} must be divisible by hog_cells_per_side {cells_per_side}, "
                f"hog_bins ({bins}) must be >= 1, hog_norm_floor ({norm_floor}), hog_smooth_sigma "
                f"({smooth_sigma}) and hog_colour_weight ({colour_weight}) >= 0"
            )
        self.patch_size, self.bins, self.cells_per_side = patch_size, bins, cells_per_side
        self.norm_floor, self.smooth_sigma, self.center = norm_floor, smooth_sigma, center
        self.colour_weight = colour_weight
        self.feature_dim = 3 * bins * cells_per_side ** 2 + (3 if colour_weight > 0 else 0)
        sobel = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        self.register_buffer("sobel", torch.stack([sobel, sobel.t()])[:, None].repeat(3, 1, 1, 1), persistent=False)
        radius = math.ceil(3 * smooth_sigma)
        taps = torch.exp(-0.5 * (torch.arange(-radius, radius + 1.0) / max(smooth_sigma, 1e-12)) ** 2)
        self.register_buffer("gauss", (taps / taps.sum()).repeat(3, 1, 1, 1), persistent=False)  # [3,1,1,2r+1]

    def _smooth(self, x: torch.Tensor) -> torch.Tensor:
        """Separable Gaussian blur with reflect padding (identity when ``smooth_sigma`` is 0)."""
        radius = self.gauss.shape[-1] // 2
        if radius == 0:
            return x
        x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="reflect"), self.gauss.float(), groups=3)
        return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="reflect"), self.gauss.float().transpose(-1, -2),
                        groups=3)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        b, _, h, w = images.shape
        x = F.pad(self._smooth(images.float()), (1, 1, 1, 1), mode="reflect")
        grads = F.conv2d(x, self.sobel.float(), groups=3).view(b, 3, 2, h, w)
        gx, gy = grads.unbind(2)
        magnitude = torch.hypot(gx, gy)
        angle = torch.remainder(torch.atan2(gy, gx), math.pi)
        bin_index = (angle / math.pi * self.bins).long().clamp_(max=self.bins - 1)
        hist = torch.zeros(b, 3, self.bins, h, w, device=images.device)
        hist.scatter_(2, bin_index[:, :, None], magnitude[:, :, None])
        cell = self.patch_size // self.cells_per_side
        hist = F.avg_pool2d(hist.view(b, 3 * self.bins, h, w), cell)
        hist = hist.view(b, 3, self.bins, h // cell, w // cell)
        hist = hist / hist.norm(dim=2, keepdim=True).clamp(min=max(self.norm_floor, 1e-12))
        features = patchify(hist.view(b, 3 * self.bins, h // cell, w // cell), self.cells_per_side)
        if self.center:
            features = features - features.mean(-1, keepdim=True)
        if self.colour_weight > 0:
            colour = patchify(F.avg_pool2d(images.float(), self.patch_size), 1)  # [B, N, 3]
            features = torch.cat([features, self.colour_weight * (colour - 0.5)], dim=-1)
        return features


class PixelTeacher(FrozenTeacher):
    """Per-patch normalised pixels."""

    def __init__(self, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.feature_dim = 3 * patch_size ** 2

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        patches = patchify(images.float(), self.patch_size)
        mean, var = patches.mean(-1, keepdim=True), patches.var(-1, keepdim=True)
        return (patches - mean) / (var + 1e-6).sqrt()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a local weight file (safetensors, or a torch pickle loaded with ``weights_only=True``).

    A ``model`` / ``state_dict`` / ``module`` wrapper is unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise TeacherWeightsError(f"teacher weight file '{path}' does not exist")
    try:
        state = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(
            path, map_location="cpu", weights_only=True)
    except Exception as err:  # any reader failure is reported with the file name
        raise TeacherWeightsError(f"cannot read teacher weight file '{path}': {err}") from err
    for key in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise TeacherWeightsError(f"teacher weight file '{path}' does not hold a state dict of tensors")
    return state


def _mismatch_report(model: nn.Module, state: dict[str, torch.Tensor]) -> str:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} (file {tuple(state[k].shape)}, model {tuple(expected[k].shape)})"
              for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape]
    parts = [f"{name} ({len(keys)}): {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}"
             for name, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                ("shape mismatches", shapes)) if keys]
    return "; ".join(parts)


class TimmTeacher(FrozenTeacher):
    """Patch tokens of a chosen block of a timm model with local weights."""

    def __init__(self, model_name: str, weights: str, model_kwargs: dict | None = None, layer: int = -1,
                 final_norm: bool = True, apply_head: bool = False):
        super().__init__()
        if not model_name or not weights:
            raise ConfigError("timm teacher needs teacher.model_name and teacher.weights (a local weight file)")
        try:
            model = timm.create_model(model_name, pretrained=False, **(model_kwargs or {}))
        except RuntimeError as err:
            raise ConfigError(f"timm teacher: cannot build model '{model_name}': {err}") from err
        if not hasattr(model, "forward_intermediates"):
            raise ConfigError(f"timm teacher: model '{model_name}' has no forward_intermediates()")
        state = read_state_dict(weights)
        filter_fn = getattr(sys.modules[type(model).__module__], "checkpoint_filter_fn", None)
        if filter_fn is not None:  # timm's own converter for original (e.g. OpenAI CLIP, DINO) layouts
            try:
                state = filter_fn(state, model)
            except (RuntimeError, ValueError, KeyError) as err:
                raise TeacherWeightsError(f"teacher weight file '{weights}' cannot be converted for timm model "
                                          f"'{model_name}': {err}") from err
        report = _mismatch_report(model, state)
        if report:
            raise TeacherWeightsError(f"teacher weight file '{weights}' does not match timm model '{model_name}': "
                                      f"{report}")
        model.load_state_dict(state, strict=True)
        self.model = model.requires_grad_(False).eval()
        self.layer, self.final_norm, self.apply_head = layer, final_norm, apply_head
        data_cfg = resolve_model_data_config(model)
        self.register_buffer("mean", torch.tensor(data_cfg["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(data_cfg["std"]).view(1, 3, 1, 1), persistent=False)
        self.feature_dim = model.num_classes if apply_head else model.num_features
        self.num_patches = getattr(getattr(model, "patch_embed", None), "num_patches", None)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        self._check(images)
        x = (images.float().clamp(0, 1) - self.mean) / self.std
        x = x.to(next(self.model.parameters()).dtype)
        tokens = self.model.forward_intermediates(x, indices=[self.layer], norm=self.final_norm,
                                                  output_fmt="NLC", intermediates_only=True)[-1]
        return self.model.get_classifier()(tokens) if self.apply_head else tokens


def build_teacher(cfg: TeacherConfig, patch_size: int) -> FrozenTeacher:
    """Build the teacher described by ``cfg`` for a tokenizer with the given patch size."""
    if cfg.kind == "hog":
        return HOGTeacher(patch_size, cfg.hog_bins, cfg.hog_cells_per_side, cfg.hog_norm_floor, cfg.hog_smooth_sigma,
                          cfg.hog_center, cfg.hog_colour_weight)
    if cfg.kind == "pixels":
        return PixelTeacher(patch_size)
    if cfg.kind == "timm":
        return TimmTeacher(cfg.model_name, cfg.weights, cfg.model_kwargs, cfg.layer, cfg.final_norm, cfg.apply_head)
    raise ConfigError(f"unknown teacher.kind '{cfg.kind}' (known: hog, pixels, timm)")
