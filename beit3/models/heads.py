"""Head layers shared by the BEiT-3 task models: the official ``Pooler`` and ``TwoLayerMLP``, head initialisation,
the choice of the token that feeds a head and the batch checks of the task models' forwards. Parameter names are
the official fine-tuning code's, so released task checkpoints load as they are.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .layers import TEXT_ONLY, init_linear_and_norm

class Pooler(nn.Module):
    """Official pooler: LayerNorm of token 0 (the vision CLS), then Linear and tanh. Keys ``norm``, ``dense``."""

    def __init__(self, in_features: int, out_features: int, eps: float = 1e-5):
        super().__init__()
        self.norm = nn.LayerNorm(in_features, eps=eps)
        self.dense = nn.Linear(in_features, out_features)
        self.activation = nn.Tanh()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(self.norm(tokens[:, 0])))


class TwoLayerMLP(nn.Module):
    """Official two-layer head: ``dense2(GELU(norm2(dense1(norm1(x)))))``. Keys ``norm1``, ``dense1``, ``norm2``,
    ``dense2``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.LayerNorm(in_features, eps=eps)
        self.dense1 = nn.Linear(in_features, hidden_features)
        self.norm2 = nn.LayerNorm(hidden_features, eps=eps)
        self.act = nn.GELU()
        self.dense2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dense2(self.act(self.norm2(self.dense1(self.norm1(x)))))


def _xavier_linear_and_norm(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    else:
        init_linear_and_norm(module)


def init_head(module: nn.Module, *scaled: nn.Linear, scale: float = 0.001, scheme: str = "official") -> None:
    """Head init, then multiply weight and bias of the ``scaled`` Linear layers by ``scale`` (classification and
    NLVR2 heads). ``official``: trunc-normal(0.02) cut at ±1 std (actual std 0.011) Linear, unit LayerNorm;
    ``xavier``: xavier-uniform Linear weights, which keep the activations' scale through a head (``head_init``)."""
    module.apply(init_linear_and_norm if scheme == "official" else _xavier_linear_and_norm)
    with torch.no_grad():
        for linear in scaled:
            linear.weight.mul_(scale)
            if linear.bias is not None:
                linear.bias.mul_(scale)


def cls_features(outputs: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """``(vision CLS, first text token)`` of a backbone output: token 0 and the token at the split position.

    For a single-modality pass both are token 0 (the image CLS or the text BOS).
    """
    tokens = outputs["encoder_out"]
    split = outputs["multiway_split_position"]
    return tokens[:, 0], tokens[:, max(split, TEXT_ONLY)]


def check_batch(name: str, tensor: torch.Tensor, dims: int) -> None:
    """Raise a ValueError naming ``name`` unless ``tensor`` has ``dims`` dimensions."""
    if not isinstance(tensor, torch.Tensor) or tensor.dim() != dims:
        shape = tuple(tensor.shape) if isinstance(tensor, torch.Tensor) else type(tensor).__name__
        raise ValueError(f"'{name}' must be a {dims}-D tensor; got {shape}")
