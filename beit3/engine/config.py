"""Engine configuration: :class:`OptimConfig`, :class:`TrainConfig` and the DeepSpeed config they produce."""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from beit3.config import ConfigError

from .preemption import signal_number

# Built-in DeepSpeed defaults per ZeRO stage. ``configs/deepspeed/zero{1,2,3}.json`` hold the same content (a test
# checks they agree); they are used when ``TrainConfig.deepspeed_config`` is empty, so an installed package without the
# repository's ``configs/`` folder still works. Batch sizes, precision, clipping and the stage come from TrainConfig.
_COMMON = {
    "steps_per_print": 1_000_000_000,
    "wall_clock_breakdown": False,
    "checkpoint": {"tag_validation": "Warn", "load_universal": False},
}
DEFAULT_DEEPSPEED_CONFIGS: dict[int, dict] = {
    0: {"zero_optimization": {"stage": 0}, **_COMMON},
    1: {
        "zero_optimization": {
            "stage": 1,
            "reduce_bucket_size": 500_000_000,
            "allgather_bucket_size": 500_000_000,
            "overlap_comm": True,
            "contiguous_gradients": True,
        },
        **_COMMON,
    },
    2: {
        "zero_optimization": {
            "stage": 2,
            "reduce_scatter": True,
            "reduce_bucket_size": 500_000_000,
            "allgather_bucket_size": 500_000_000,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "ignore_unused_parameters": True,
        },
        **_COMMON,
    },
    3: {
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": True,
            "contiguous_gradients": True,
            "reduce_bucket_size": 50_000_000,
            "stage3_prefetch_bucket_size": 50_000_000,
            "stage3_param_persistence_threshold": 100_000,
            "stage3_max_live_parameters": 1_000_000_000,
            "stage3_max_reuse_distance": 1_000_000_000,
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        **_COMMON,
    },
}


@dataclass
class OptimConfig:
    """AdamW + linear warmup + cosine schedule (per optimizer step).

    ``lr``/``min_lr`` are scaled per parameter group by the layer-decay scale (``layer_decay`` < 1 needs
    ``model.get_layer_id(name)`` and ``model.num_layers_for_lr_decay()``). With ``layer_decay`` = 1,
    ``head_lr_weight`` multiplies the lr of the task-head parameters (official ``--task_head_lr_weight``).
    """

    lr: float = 2e-3
    min_lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-6
    layer_decay: float = 1.0
    head_lr_weight: float = 1.0
    fused: bool = False  # PyTorch's fused AdamW kernel (CPU and CUDA): faster, rounds differently from the default

    def __post_init__(self):
        if self.lr < 0:
            raise ConfigError(f"config key 'lr' must be >= 0, got {self.lr}")
        if self.min_lr < 0:
            raise ConfigError(f"config key 'min_lr' must be >= 0, got {self.min_lr}")
        if self.warmup_steps < 0:
            raise ConfigError(f"config key 'warmup_steps' must be >= 0, got {self.warmup_steps}")
        if self.weight_decay < 0:
            raise ConfigError(f"config key 'weight_decay' must be >= 0, got {self.weight_decay}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"config key 'betas' must be two numbers in [0, 1), got {self.betas}")
        if self.eps <= 0:
            raise ConfigError(f"config key 'eps' must be > 0, got {self.eps}")
        if not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"config key 'layer_decay' must be in (0, 1], got {self.layer_decay}")
        if self.head_lr_weight <= 0:
            raise ConfigError(f"config key 'head_lr_weight' must be > 0, got {self.head_lr_weight}")
        self.betas = tuple(float(b) for b in self.betas)


@dataclass
class TrainConfig:
    """The training loop: steps, accumulation, logging, checkpointing, precision and ZeRO stage."""

    steps: int = 1000  # optimizer steps in total
    micro_batches: int = 1  # gradient accumulation steps (batches per optimizer step per rank)
    log_every: int = 10
    save_every: int = 1000
    keep_last: int = 3
    seed: int = 0
    clip_grad: float = 3.0  # 0 disables clipping (always written explicitly into the DeepSpeed config)
    precision: Literal["fp32", "bf16"] = "fp32"
    zero_stage: int = 1
    deepspeed_config: str = ""  # JSON file (e.g. configs/deepspeed/zero2.json); empty = built-in defaults
    activation_checkpointing: bool = False
    auto_resume: bool = True
    tensorboard: bool = True
    progress: Literal["auto", "on", "off"] = "auto"
    max_nonfinite_steps: int = 10  # stop after this many consecutive steps with a non-finite loss or gradient
    check_nonfinite_grads: bool = True  # also skip steps whose loss is finite but a gradient is NaN/Inf
    # on these signals (and a first Ctrl-C) finish the step, save a checkpoint and exit 75 (130 for Ctrl-C)
    preempt_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])

    def __post_init__(self):
        positive = ("steps", "micro_batches", "log_every", "save_every", "keep_last", "max_nonfinite_steps")
        for key in positive:
            if getattr(self, key) < 1:
                raise ConfigError(f"config key '{key}' must be >= 1, got {getattr(self, key)}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"config key 'zero_stage' must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.clip_grad < 0:
            raise ConfigError(f"config key 'clip_grad' must be >= 0, got {self.clip_grad}")
        for name in self.preempt_signals:
            try:
                signal_number(name)
            except ValueError as err:
                raise ConfigError(str(err)) from None


def build_deepspeed_config(train_cfg: TrainConfig, micro_batch_size: int | None = None) -> dict:
    """The DeepSpeed config dict: the JSON file (or built-in stage defaults) with our keys written over it.

    Our keys: ``gradient_accumulation_steps``, ``train_micro_batch_size_per_gpu`` (nominal; DeepSpeed only uses it for
    its own sample counters), ``gradient_clipping`` (always explicit: DeepSpeed >= 0.19.3 defaults to 1.0),
    ``bf16``/``fp16`` and ``zero_optimization.stage``.
    """
    if train_cfg.deepspeed_config:
        path = Path(train_cfg.deepspeed_config)
        if not path.is_file():
            raise ConfigError(f"config key 'deepspeed_config': file '{path}' does not exist")
        try:
            ds = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f"config key 'deepspeed_config': '{path}' is not valid JSON: {err}") from err
        if not isinstance(ds, dict):
            raise ConfigError(f"config key 'deepspeed_config': '{path}' must hold a JSON object")
    else:
        ds = copy.deepcopy(DEFAULT_DEEPSPEED_CONFIGS[train_cfg.zero_stage])
    for key in ("train_batch_size", "fp16", "amp", "optimizer", "scheduler"):
        ds.pop(key, None)
    ds["train_micro_batch_size_per_gpu"] = int(micro_batch_size or ds.get("train_micro_batch_size_per_gpu") or 1)
    ds["gradient_accumulation_steps"] = train_cfg.micro_batches
    ds["gradient_clipping"] = float(train_cfg.clip_grad)
    ds["bf16"] = {**(ds.get("bf16") or {}), "enabled": train_cfg.precision == "bf16"}
    zero = dict(ds.get("zero_optimization") or {})
    zero["stage"] = train_cfg.zero_stage
    ds["zero_optimization"] = zero
    ds.setdefault("steps_per_print", 1_000_000_000)
    return ds
