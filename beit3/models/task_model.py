"""The base class of every BEiT-3 model with heads (pretraining and each task): the shared backbone as ``beit3``
and the hooks the training engine calls.

Key names follow the official fine-tuning code (unilm ``beit3/modeling_finetune.py``) so released task checkpoints load
as-is: the backbone lives under ``beit3.``, the heads under their official names.
"""
from __future__ import annotations

from torch import nn

from .backbone import BEiT3, BEiT3Config
from .heads import init_head

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
