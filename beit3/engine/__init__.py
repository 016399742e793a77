"""The generic DeepSpeed training engine (ZeRO 0/1/2/3, fp32/bf16) used by every training tool.

Contract for ``train(model, batches, train_cfg, optim_cfg, output_dir, config_snapshot=..., callbacks=...)``:

- ``model.forward(batch) -> (loss, metrics)``; ``metrics`` maps names to floats/tensors. The counters
  ``num_samples``/``num_tokens`` (per micro batch, per rank) give ``samples_per_s``/``tokens_per_s`` (global);
  every other metric is logged as its mean over micro batches, steps of the log interval and ranks.
- ``batches``: iterable of (nested dicts/lists of) tensors with ``state_dict()``/``load_state_dict()`` per rank.
  It is re-iterated when exhausted (epochs). Each optimizer step consumes ``train_cfg.micro_batches`` batches.
- Optional model hooks: ``no_weight_decay() -> set[str]``, ``get_layer_id(name) -> int`` +
  ``num_layers_for_lr_decay() -> int`` (layer decay), ``set_grad_checkpointing(bool)``.
- Outputs in ``output_dir``: ``log.jsonl`` (rank 0; one object per logged step: step, loss, metrics, lr, grad_norm,
  samples_per_s, tokens_per_s, time = seconds per step, timestamp; skipped non-finite steps get
  ``skipped: true``), ``tensorboard/``, ``checkpoints/{latest, stepXXXXXXXX/}``.
"""
from .checkpointing import export_consolidated_state_dict, read_latest, resolve_checkpoint
from .config import DEFAULT_DEEPSPEED_CONFIGS, OptimConfig, TrainConfig, build_deepspeed_config
from .dist import add_common_args, barrier, get_local_rank, get_rank, get_world_size, init_distributed, is_main_process
from .loop import Callback, NonFiniteLossError, move_to_device, train
from .optim import WarmupCosineSchedule, build_optimizer, lr_factor, param_groups

__all__ = [
    "Callback", "DEFAULT_DEEPSPEED_CONFIGS", "NonFiniteLossError", "OptimConfig", "TrainConfig", "WarmupCosineSchedule",
    "add_common_args", "barrier", "build_deepspeed_config", "build_optimizer", "export_consolidated_state_dict",
    "get_local_rank", "get_rank", "get_world_size", "init_distributed", "is_main_process", "lr_factor",
    "move_to_device", "param_groups", "read_latest", "resolve_checkpoint", "train",
]
