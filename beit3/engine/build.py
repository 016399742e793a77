"""The DeepSpeed engine of a training run: our optimizer (skippable AdamW with its param groups) and warmup-cosine
schedule under ``deepspeed.initialize``, with the start-up workarounds that needs."""
from __future__ import annotations

import contextlib
import logging
import os

import torch
from torch import nn

from .config import OptimConfig, TrainConfig, build_deepspeed_config
from .optim import WarmupCosineSchedule, build_optimizer, lr_factor, make_step_skippable
from .safe_load import install_safe_loader


def build_engine(model: nn.Module, train_cfg: TrainConfig, optim_cfg: OptimConfig):
    """DeepSpeed around ``model`` with our optimizer (skippable AdamW, param groups) and warmup-cosine schedule.
    Returns ``(engine, optimizer, scheduler, param_group_names, group_hypers)``."""
    import deepspeed

    optimizer = make_step_skippable(build_optimizer(model, optim_cfg))
    names_by_id = {id(p): n for n, p in model.named_parameters()}  # before DeepSpeed flattens the groups
    group_names = [[names_by_id[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    hyper_keys = ("weight_decay", "betas", "eps", "lr_scale", "initial_lr", "group_name")
    group_hypers = [{k: g[k] for k in hyper_keys if k in g} for g in optimizer.param_groups]
    scheduler = WarmupCosineSchedule(optimizer, lambda s: lr_factor(s, optim_cfg, train_cfg.steps))
    with _scalar_params_as_vectors(model):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=build_deepspeed_config(train_cfg), dist_init_required=False)
    install_safe_loader(engine)  # resume reads DeepSpeed files with torch.load(weights_only=True) + allow-list
    return engine, optimizer, scheduler, group_names, group_hypers


def quiet_deepspeed() -> None:
    """DeepSpeed's INFO lines off (``BEIT3_DEEPSPEED_VERBOSE=1`` keeps them)."""
    if os.environ.get("BEIT3_DEEPSPEED_VERBOSE"):
        return
    try:
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass


@contextlib.contextmanager
def _scalar_params_as_vectors(model: nn.Module):
    """While DeepSpeed initialises, give 0-dim parameters (e.g. CLIP's ``logit_scale``) shape (1,) where it
    broadcasts them: its start-up broadcast (and ZeRO-3's conversion of each parameter) views every parameter as
    bytes, which fails for 0-dim tensors. Shapes are back right after: ZeRO-3 records the 0-dim shape as the
    parameter's ``ds_shape``, so gathered parameters, gradients and checkpoints keep it."""
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.partition_parameters import Init

    scalars = [p for p in model.parameters() if p.dim() == 0]
    original_broadcast, original_zero_init = DeepSpeedEngine._broadcast_model, Init._zero_init_param

    def broadcast(engine_self):
        for p in scalars:
            p.data = p.data.reshape(1)
        try:
            original_broadcast(engine_self)
        finally:
            for p in scalars:
                p.data = p.data.reshape(())

    def zero_init(init_self, param):
        if param.dim() != 0:
            return original_zero_init(init_self, param)
        param.data = param.data.reshape(1)
        original_zero_init(init_self, param)
        param.ds_shape = torch.Size([])

    if scalars:
        DeepSpeedEngine._broadcast_model, Init._zero_init_param = broadcast, zero_init
    try:
        yield
    finally:
        DeepSpeedEngine._broadcast_model, Init._zero_init_param = original_broadcast, original_zero_init
