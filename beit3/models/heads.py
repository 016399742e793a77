"""Pieces shared by the BEiT-3 task models: the task-model base class, the official head layers (``Pooler``,
``TwoLayerMLP``), head initialisation and the choice of the token that feeds a head.

Key names follow the official fine-tuning code (``shared/reference/beit3.md`` §3) so released task checkpoints load
as-is: the backbone lives under ``beit3.``, the heads under their official names.
"""
from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from .backbone import BEiT3, BEiT3Config
from .layers import TEXT_ONLY, init_linear_and_norm

BACKBONE_ATTRIBUTE = "beit3"


class BEiT3TaskModel(nn.Module):
    """Base class of every task model: the shared :class:`BEiT3` backbone as ``self.beit3`` plus the hooks the
    training engine uses (weight-decay exemptions, layer-wise lr decay ids, gradient checkpointing).

    ``init_kwargs`` records the constructor arguments besides the config so ``save_pretrained`` /
    ``from_pretrained`` can rebuild the model.
    """

    def __init__(self, config: BEiT3Config, **init_kwargs):
        super().__init__()
        self.beit3 = BEiT3(config)
        self.init_kwargs = dict(init_kwargs)

    @property
    def config(self) -> BEiT3Config:
        return self.beit3.config

    def no_weight_decay(self) -> set[str]:
        """Full parameter names exempt from weight decay (besides 1-D tensors and biases)."""
        return {f"{BACKBONE_ATTRIBUTE}.{name}" for name in self.beit3.no_weight_decay()}

    def num_layers_for_lr_decay(self) -> int:
        return self.beit3.num_layers_for_lr_decay()

    def get_layer_id(self, name: str) -> int:
        """Layer-wise lr decay id: the backbone's rule for ``beit3.*``; heads sit on top (depth + 1)."""
        prefix = BACKBONE_ATTRIBUTE + "."
        if name.startswith(prefix):
            return self.beit3.get_layer_id(name[len(prefix) :])
        return self.num_layers_for_lr_decay() + 1

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.beit3.set_grad_checkpointing(enable)

    def init_head(self, module: nn.Module, *scaled: nn.Linear, scale: float = 0.001) -> None:
        """:func:`init_head` with this model's ``config.head_init`` scheme."""
        init_head(module, *scaled, scale=scale, scheme=self.config.head_init)


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
