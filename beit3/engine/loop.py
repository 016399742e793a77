"""``train()``: the DeepSpeed training loop shared by tokenizer training, BEiT-3 pretraining and fine-tuning: start-up
and auto-resume, then per step :func:`beit3.engine.step.train_step` with the non-finite guard, logging, callbacks
and checkpointing around it as small named pieces."""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Iterable

import torch
from torch import nn

from ..comm import all_reduce_, barrier, broadcast_object_from_rank0, get_rank, get_world_size
from ..config import config_differences
from ..errors import CheckpointError, DataFaultError, NonFiniteLossError, Preempted, TrainingStopped
from .checkpointing import (check_checkpoint_space, clean_after_resume, find_resume_tag, list_tags, read_latest,
                            restore_rng_state, save_checkpoint, seed_everything)
from .preemption import StopSignals, agreed_stop, signal_name
from .resharding import check_global_batch, load_on_new_world_size
from .tag_files import load_rank_state, saved_layout
from .build import build_engine, quiet_deepspeed
from .config import OptimConfig, TrainConfig
from .dist import init_distributed
from .monitor import Interval, Monitor, interval_record
from .step import GradFiniteCheck, StepResult, move_to_device, train_step

__all__ = ["Callback", "move_to_device", "train", "train_step"]


class Callback:
    """Optional hooks; every method runs on every rank. ``ctx`` has engine, model, optimizer, scheduler, train_cfg,
    optim_cfg, output_dir, checkpoint_dir, rank, world_size, step and monitor (``log(record)`` / ``message(text)``,
    active on rank 0)."""

    def on_train_start(self, ctx) -> None: ...

    def on_step_end(self, ctx, step: int, metrics: dict) -> bool | None:
        """After optimizer step ``step`` (1-based); ``metrics`` holds this rank's loss/metrics of the step (floats).
        Return True to stop training after this step (a checkpoint is saved first)."""

    def on_log(self, ctx, record: dict) -> None: ...

    def on_checkpoint(self, ctx, step: int, tag_dir: Path) -> None: ...

    def on_train_end(self, ctx, summary: dict) -> None: ...


class _StepData:
    """The micro batches of each step from ``batches`` (re-iterated per epoch), with the data-fault agreement across
    ranks and the skip counts of the data layer."""

    def __init__(self, batches: Iterable, micro_batches: int, device, rank: int, world: int, last_good):
        self.batches, self.micro_batches, self.device = batches, micro_batches, device
        self.rank, self.world, self.last_good = rank, world, last_good
        self.iterator = None

    def start(self) -> None:
        self.iterator = iter(self.batches)

    def _next(self):
        try:
            return next(self.iterator)
        except StopIteration:
            self.iterator = iter(self.batches)  # next epoch
            try:
                return next(self.iterator)
            except StopIteration:
                raise RuntimeError("the batches iterable yielded no batch") from None

    def for_step(self, step: int) -> list:
        """This step's micro batches. A data failure on any rank stops every rank at this step (one small
        all-reduce per step when world_size > 1) with DataFaultError; no collective of the step has started yet."""
        error, out = None, []
        try:
            for _ in range(self.micro_batches):
                out.append(self._next())
        except Exception as err:  # the data layer's own errors (skip limit, unusable source, I/O)
            error = err
        failed = error is not None
        if self.world > 1:
            failed = all_reduce_(torch.tensor([float(failed)], device=self.device), "max").item() > 0
        if failed:
            what = f"{type(error).__name__}: {error}" if error is not None else "a data error on another rank"
            raise DataFaultError(f"data fault at step {step + 1} on rank {self.rank}: {what}. Training stopped; "
                                 f"{self.last_good()}") from error
        return out

    def skips(self) -> dict | None:
        """Skipped samples by reason, summed over ranks (collective: all ranks call it at the same point)."""
        if not hasattr(self.batches, "skip_counts"):
            return None
        local = dict(self.batches.skip_counts())
        if self.world == 1:
            return dict(sorted((k, int(v)) for k, v in local.items()))
        import torch.distributed as dist

        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, local)
        total: dict = {}
        for counts in gathered:
            for key, value in (counts or {}).items():
                total[key] = total.get(key, 0) + int(value)
        return dict(sorted(total.items()))


class _NonFiniteGuard:
    """Counts skipped (non-finite) steps in a row; logs each and stops the run after ``max_nonfinite_steps``."""

    def __init__(self, limit: int, monitor: Monitor, last_good):
        self.limit, self.monitor, self.last_good = limit, monitor, last_good
        self.in_a_row = self.total = 0

    def check(self, step: int, result: StepResult, lr: float) -> None:
        if not result.skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        what = "loss" if result.loss_nonfinite else "gradient"
        loss = float("nan") if result.loss_nonfinite else result.mean("loss")
        self.monitor.log({"step": step, "loss": loss, "skipped": True, "nonfinite": what,
                          "nonfinite_in_a_row": self.in_a_row, "lr": lr, "timestamp": time.time()})
        self.monitor.message(f"[beit3.engine] step {step}: non-finite {what} on some rank; step skipped "
                             f"({self.in_a_row} in a row, limit {self.limit})")
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"the loss or its gradients were non-finite (NaN/Inf) for {self.in_a_row} consecutive steps "
                f"(steps {step - self.in_a_row + 1}..{step}); training stopped "
                f"(train.max_nonfinite_steps={self.limit}). {self.last_good()}. "
                f"Check the data and consider a lower optim.lr, more warmup or a smaller clip_grad."
            )


def _resume(engine, optimizer, group_hypers: list, data: _StepData, ckpt_dir: Path, train_cfg: TrainConfig,
            config_snapshot: dict) -> tuple[int, str | None]:
    """Auto-resume from the newest complete checkpoint that verifies (rank 0 checks sizes and SHA-256 and tells the
    others), after rank 0 cleaned up: model, optimizer, scheduler, data and RNG state; through a universal checkpoint
    when it was saved on another number of ranks. Starts the data iterator. Returns ``(start_step, resumed_from)``."""
    rank, world = data.rank, data.world
    choice = find_resume_tag(ckpt_dir) if train_cfg.auto_resume and rank == 0 else (None, [])
    latest, notes = broadcast_object_from_rank0(choice)
    if rank == 0 and train_cfg.auto_resume:
        for note in notes:
            print(f"[beit3.engine] {note}", file=sys.stderr)
        cleaned = clean_after_resume(ckpt_dir, latest)
        if cleaned:
            print(f"[beit3.engine] cleaned up incomplete, stale or corrupt checkpoint dirs: {', '.join(cleaned)}",
                  file=sys.stderr)
    barrier()
    if latest is None:
        if rank == 0 and notes:
            print(f"[beit3.engine] no usable checkpoint in '{ckpt_dir}': starting from scratch (step 0)", file=sys.stderr)
        data.start()
        barrier()
        return 0, None
    tag_dir = ckpt_dir / latest
    resumed_from = str(tag_dir)
    saved_world, saved_micro = saved_layout(tag_dir)
    resharded = saved_world != world and any(tag_dir.glob("*optim_states.pt"))  # ZeRO partitions: universal
    if saved_world != world:
        check_global_batch(saved_world, saved_micro, world, train_cfg.micro_batches, resumed_from)
    if resharded:
        load_path, client_state = load_on_new_world_size(engine, ckpt_dir, latest)
    else:
        load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=latest, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
    if load_path is None:
        raise CheckpointError(f"could not load checkpoint '{resumed_from}'")
    # loading an optimizer state also restores its groups' hyper-parameters: the current config wins
    for group, hypers in zip(optimizer.param_groups, group_hypers):
        group.update(hypers)
    old_cfg = client_state.get("config")
    if rank == 0 and old_cfg is not None and old_cfg != config_snapshot:
        changed = config_differences(old_cfg, config_snapshot)
        shown = ", ".join(changed[:8]) + (f" and {len(changed) - 8} more" if len(changed) > 8 else "")
        print(f"[beit3.engine] note: the config differs from the one saved in '{resumed_from}': {shown}")
    step = int(client_state["step"])
    if saved_world == world:
        rank_state = load_rank_state(tag_dir, rank)
        if rank_state["data"] is not None and hasattr(data.batches, "load_state_dict"):
            data.batches.load_state_dict(rank_state["data"])
        elif rank == 0:
            print("[beit3.engine] warning: no data state to restore; the data order after resume is not exact")
        data.start()  # before the RNG restore: creating an iterator may draw from the RNG
        restore_rng_state(rank_state["rng"])
    else:
        states = [load_rank_state(tag_dir, r)["data"] for r in range(saved_world)]
        if not hasattr(data.batches, "load_resharded_state_dict") or any(s is None for s in states):
            raise CheckpointError(f"'{resumed_from}' was saved on {saved_world} ranks and this run has {world}, but "
                                  "its data iterator cannot continue on another number of ranks (no "
                                  "load_resharded_state_dict): resume with the same number of ranks")
        data.batches.load_resharded_state_dict(states)
        data.start()
        seed_everything(train_cfg.seed + rank + 1_000_003 * step)  # fresh RNG streams, none of a saved rank's
        if rank == 0:
            how = "a DeepSpeed universal checkpoint" if resharded else "the full (ZeRO stage 0) states"
            print(f"[beit3.engine] world size changed: '{resumed_from}' was saved on {saved_world} ranks x "
                  f"{saved_micro} micro batches, this run has {world} x {train_cfg.micro_batches}; weights and "
                  f"optimizer state loaded through {how}, the data order continues where the {saved_world} ranks "
                  "stopped", file=sys.stderr)
    barrier()
    return step, resumed_from


def _callbacks_stop(callbacks: list, ctx, step: int, result: StepResult) -> bool:
    """Run ``on_step_end`` on this rank; True when one of its callbacks asked to stop."""
    if not any(hasattr(cb, "on_step_end") for cb in callbacks):
        return False
    metrics = {key: result.mean(key) for key in result.values}
    return any([bool(cb.on_step_end(ctx, step, metrics)) for cb in callbacks if hasattr(cb, "on_step_end")])


def _notify(callbacks: list, hook: str, *args) -> None:
    for cb in callbacks:
        if hasattr(cb, hook):
            getattr(cb, hook)(*args)


def train(model: nn.Module, batches: Iterable, train_cfg: TrainConfig, optim_cfg: OptimConfig,
          output_dir: str | os.PathLike, *, config_snapshot: dict, callbacks: list | None = None) -> dict:
    """Train ``model`` with DeepSpeed for ``train_cfg.steps`` optimizer steps; see the package docstring.

    Returns ``{"step", "resumed_from", "last_checkpoint", "last_log", "skipped_steps", "engine"}``.
    """
    init_distributed()
    quiet_deepspeed()
    rank, world = get_rank(), get_world_size()
    callbacks = list(callbacks or [])
    output_dir = Path(output_dir)
    ckpt_dir = output_dir / "checkpoints"
    check_checkpoint_space(model, output_dir)  # ConfigError before anything is written
    seed_everything(train_cfg.seed + rank)
    if hasattr(model, "set_grad_checkpointing"):
        model.set_grad_checkpointing(train_cfg.activation_checkpointing)
    elif train_cfg.activation_checkpointing and rank == 0:
        print("[beit3.engine] activation_checkpointing=true but the model has no set_grad_checkpointing(); ignored")

    engine, optimizer, scheduler, group_names, group_hypers = build_engine(model, train_cfg, optim_cfg)
    float_dtype = torch.bfloat16 if train_cfg.precision == "bf16" else None
    grad_check = GradFiniteCheck(engine.module, engine.device) if train_cfg.check_nonfinite_grads else None

    def last_good() -> str:
        tag = read_latest(ckpt_dir)
        if tag is None:
            return "no checkpoint has been saved yet"
        return f"the last good checkpoint is '{ckpt_dir / tag}' (auto-resume loads it when you rerun)"

    def checkpoint(step: int) -> Path:
        client_state = {"step": step, "config": config_snapshot, "world_size": world,
                        "micro_batches": train_cfg.micro_batches, "param_group_names": group_names}
        data_state = batches.state_dict() if hasattr(batches, "state_dict") else None
        tag_dir = save_checkpoint(engine, ckpt_dir, step, client_state, data_state, train_cfg.keep_last)
        _notify(callbacks, "on_checkpoint", ctx, step, tag_dir)
        return tag_dir

    data = _StepData(batches, train_cfg.micro_batches, engine.device, rank, world, last_good)
    start_step, resumed_from = _resume(engine, optimizer, group_hypers, data, ckpt_dir, train_cfg, config_snapshot)
    monitor = Monitor(output_dir, enabled=rank == 0, tensorboard=train_cfg.tensorboard, progress=train_cfg.progress,
                      total_steps=train_cfg.steps, start_step=start_step)
    if resumed_from is not None:
        monitor.message(f"[beit3.engine] resumed from {resumed_from} (step {start_step})")
    if start_step >= train_cfg.steps:
        monitor.message(f"[beit3.engine] nothing to train: the run is at step {start_step} and train.steps is "
                        f"{train_cfg.steps} (raise train.steps to continue it)")
    ctx = SimpleNamespace(engine=engine, model=model, optimizer=optimizer, scheduler=scheduler, train_cfg=train_cfg,
                          optim_cfg=optim_cfg, output_dir=output_dir, checkpoint_dir=ckpt_dir, rank=rank,
                          world_size=world, step=start_step, monitor=monitor)
    _notify(callbacks, "on_train_start", ctx)

    engine.train()
    step, last_record = start_step, None
    guard = _NonFiniteGuard(train_cfg.max_nonfinite_steps, monitor, last_good)
    interval = Interval()
    signals = StopSignals(train_cfg.preempt_signals, announce=rank == 0)
    try:
        signals.install()
        while step < train_cfg.steps:
            scheduler.set_step(step)
            lr = max(group["lr"] for group in optimizer.param_groups)
            result = train_step(engine, optimizer, data.for_step(step), grad_check, float_dtype)
            step = ctx.step = step + 1
            guard.check(step, result, lr)  # logs a skipped step; raises after max_nonfinite_steps in a row
            interval.add_step(result)
            monitor.advance()
            stop, signum = agreed_stop(_callbacks_stop(callbacks, ctx, step, result), signals, engine.device)
            stop = stop or bool(signum)
            # (an interval of skipped steps only has its own "skipped" lines; it is merged into the next one)
            if (step % train_cfg.log_every == 0 or step == train_cfg.steps or stop) and interval.steps > interval.skipped:
                last_record = interval_record(interval, step, lr, engine.device)
                skips = data.skips()
                if skips is not None:
                    last_record["data_skips"] = skips
                last_record["timestamp"] = time.time()
                monitor.log(last_record)
                _notify(callbacks, "on_log", ctx, last_record)
                interval = Interval()
            # no periodic save on a skipped step: "latest" stays on the last step with a finite loss
            if (step % train_cfg.save_every == 0 and not result.skipped) or step == train_cfg.steps or stop:
                tag_dir = checkpoint(step)
            if signum:
                raise Preempted(f"{signal_name(signum)}: stopped after step {step} of {train_cfg.steps} and saved "
                                f"checkpoint '{tag_dir}'; the same command resumes from it", signal_name(signum))
            if stop:
                monitor.message(f"[beit3.engine] stop requested by a callback after step {step}")
                break
    except TrainingStopped as err:
        monitor.message(f"[beit3.engine] training stopped at step {step}: {err}")
        raise
    except KeyboardInterrupt:
        monitor.message(f"[beit3.engine] interrupted during step {step + 1}; {last_good()}")
        raise
    finally:
        signals.restore()
        if grad_check is not None:
            grad_check.remove()
        monitor.close()

    skips = data.skips()
    if skips:
        monitor.message(f"[beit3.engine] data: {sum(skips.values())} samples skipped and replaced in this run "
                        f"and before it ({', '.join(f'{k}: {v}' for k, v in skips.items())})")
    latest = read_latest(ckpt_dir)
    monitor.message(f"[beit3.engine] done: step {step} of {train_cfg.steps} ({step - start_step} this run"
                    f"{f', {guard.total} skipped' if guard.total else ''}); last checkpoint "
                    f"{ckpt_dir / latest if latest else 'none'}; log {output_dir / 'log.jsonl'}")
    summary = {"step": step, "resumed_from": resumed_from, "last_checkpoint": str(ckpt_dir / latest) if latest else None,
               "last_log": last_record, "skipped_steps": guard.total, "data_skips": skips,
               "checkpoints": [str(ckpt_dir / t) for _, t in list_tags(ckpt_dir)], "engine": engine}
    _notify(callbacks, "on_train_end", ctx, summary)
    return summary
