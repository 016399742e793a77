"""The generic DeepSpeed training engine (ZeRO 0/1/2/3, fp32/bf16) used by every training tool: one optimizer step
is :func:`train_step` (``step.py``), the loop around it :func:`train` (``loop.py``).

Contract for ``train(model, batches, train_cfg, optim_cfg, output_dir, config_snapshot=..., callbacks=...)``:

- ``model.forward(batch) -> (loss, metrics)``; ``metrics`` maps names to floats/tensors. The counters
  ``num_samples``/``num_tokens`` (per micro batch, per rank) give ``samples_per_s``/``tokens_per_s`` (global);
  every other metric is logged as its mean over micro batches, steps of the log interval and ranks.
- ``batches``: iterable of (nested dicts/lists of) tensors with ``state_dict()``/``load_state_dict()`` per rank.
  It is re-iterated when exhausted (epochs). Each optimizer step consumes ``train_cfg.micro_batches`` batches.
- Optional model hooks: ``no_weight_decay() -> set[str]``, ``get_layer_id(name) -> int`` +
  ``num_layers_for_lr_decay() -> int`` (layer decay), ``set_grad_checkpointing(bool)``.
- Precision: ``bf16`` runs the model in bf16 with fp32 master weights (DeepSpeed ``bf16.enabled``); floating-point
  tensors of each batch are cast to bf16 when moved to the device. ``gradient_clipping`` is always explicit.
- A step whose loss, or any gradient (``check_nonfinite_grads``, tensor hooks before DeepSpeed's reduction), is
  non-finite on any rank is skipped on all ranks (gradients dropped, no AdamW update, the lr schedule still advances
  with the step index); ``max_nonfinite_steps`` in a row raise :class:`NonFiniteLossError` naming the last good
  checkpoint. No periodic checkpoint is written on a skipped step.
- Data faults: an exception from ``batches`` on any rank (e.g. the skip rate passed ``data.max_skip_fraction``)
  stops every rank at the same step with :class:`DataFaultError` (a :class:`TrainingStopped`); the last checkpoint
  is untouched. With ``batches.skip_counts()`` every log line carries ``data_skips`` (summed over ranks), and the
  run ends with a summary message.
- Start-up: ``check_checkpoint_space`` raises ConfigError when the disk cannot hold one more checkpoint.
- Checkpoints are written under a temporary tag and renamed after every rank finished (see ``checkpointing``);
  resume picks the newest complete one and reads DeepSpeed files with ``torch.load(weights_only=True)``.
- Checkpoints every ``save_every`` steps and at the end (also when a callback asks to stop), the last ``keep_last``
  kept; auto-resume (default) reloads model/optimizer/scheduler, each rank's data state and RNG states: a resumed run
  reproduces the uninterrupted one exactly (fp32). On another number of ranks it resumes through a DeepSpeed
  universal checkpoint (``resharding``) when ``batches`` has ``load_resharded_state_dict(states)``.
- Outputs in ``output_dir``: ``log.jsonl`` (rank 0; one object per logged step: step, loss, metrics, lr, grad_norm,
  samples_per_s, tokens_per_s, time = seconds per step, timestamp; skipped non-finite steps get
  ``skipped: true``), ``tensorboard/``, ``checkpoints/{latest, stepXXXXXXXX/}``.

Typical tool::

    parser = add_common_args(argparse.ArgumentParser())
    args = parser.parse_args()
    cfg = load_config(MyToolConfig, args.config, args.overrides)   # has .train: TrainConfig, .optim: OptimConfig
    init_distributed()
    model, batches = build_model(cfg), build_batches(cfg, rank=get_rank(), world_size=get_world_size())
    summary = train(model, batches, cfg.train, cfg.optim, cfg.output_dir, config_snapshot=to_dict(cfg))
    if is_main_process():
        weights = export_consolidated_state_dict(cfg.output_dir)   # fp32 name -> tensor, any ZeRO stage
"""
from .checkpointing import check_checkpoint_space, estimate_checkpoint_bytes, find_resume_tag, read_latest
from .export import export_consolidated_state_dict, resolve_checkpoint
from .config import DEFAULT_DEEPSPEED_CONFIGS, OptimConfig, TrainConfig, build_deepspeed_config
from .dist import add_common_args, all_reduce_, barrier, gathered_parameters, get_local_rank, get_rank, get_world_size, init_distributed, is_main_process
from ..errors import DataFaultError, NonFiniteLossError, TrainingStopped
from .loop import Callback, train
from .optim import WarmupCosineSchedule, build_optimizer, lr_factor, param_groups
from .step import StepResult, move_to_device, train_step

__all__ = [
    "Callback", "DEFAULT_DEEPSPEED_CONFIGS", "DataFaultError", "NonFiniteLossError", "TrainingStopped",
    "check_checkpoint_space", "estimate_checkpoint_bytes", "find_resume_tag", "OptimConfig", "TrainConfig", "WarmupCosineSchedule",
    "add_common_args", "all_reduce_", "barrier", "gathered_parameters", "build_deepspeed_config", "build_optimizer", "export_consolidated_state_dict",
    "get_local_rank", "get_rank", "get_world_size", "init_distributed", "is_main_process", "lr_factor",
    "move_to_device", "param_groups", "read_latest", "resolve_checkpoint", "StepResult", "train", "train_step",
]
