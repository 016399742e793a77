"""``train()``: the DeepSpeed training loop shared by tokenizer training, BEiT-3 pretraining and fine-tuning."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterable

import torch
from torch import nn

from .checkpointing import (check_checkpoint_space, clean_after_resume, find_resume_tag, list_tags, load_rank_state,
                            read_latest, restore_rng_state, save_checkpoint, seed_everything)
from .config import OptimConfig, TrainConfig, build_deepspeed_config
from .dist import all_reduce_, barrier, get_rank, get_world_size, init_distributed
from .monitor import Monitor
from .optim import WarmupCosineSchedule, build_optimizer, lr_factor, make_step_skippable
from .safe_load import install_safe_loader

COUNTERS = ("num_samples", "num_tokens")


class TrainingStopped(RuntimeError):
    """Training stopped on purpose before ``train.steps``; the message says why and names the last good checkpoint.
    Raised on every rank at the same step (the decision is all-reduced), so no rank is left waiting."""


class NonFiniteLossError(TrainingStopped):
    """Raised after ``max_nonfinite_steps`` consecutive optimizer steps with a non-finite loss or gradient."""


class DataFaultError(TrainingStopped):
    """The data layer failed on some rank (e.g. its skip rate passed ``data.max_skip_fraction``)."""


class _GradFiniteCheck:
    """Tensor hooks that OR "this gradient has a NaN/Inf" into one device flag, per micro batch and parameter.

    Hooks see each parameter's gradient as autograd produces it, before DeepSpeed accumulates, reduces or partitions
    it, so the check is the same for ZeRO 0/1/2/3 and costs one small reduction per parameter (no host sync).
    """

    def __init__(self, model: nn.Module, device):
        self.flag = torch.zeros((), dtype=torch.bool, device=device)
        self.handles = [p.register_hook(self._hook) for p in model.parameters() if p.requires_grad]

    def _hook(self, grad: torch.Tensor):
        self.flag |= ~torch.isfinite(grad.detach().sum())  # NaN/Inf propagate through the sum
        return None

    def take(self) -> torch.Tensor:
        flag = self.flag.clone()
        self.flag.zero_()
        return flag

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


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


def move_to_device(obj: Any, device, float_dtype: torch.dtype | None = None) -> Any:
    """Recursively move tensors in dicts/lists/tuples to ``device`` (floating tensors cast to ``float_dtype``)."""
    if isinstance(obj, torch.Tensor):
        if float_dtype is not None and obj.is_floating_point():
            return obj.to(device=device, dtype=float_dtype, non_blocking=True)
        return obj.to(device=device, non_blocking=True)
    if isinstance(obj, dict):
        return type(obj)((k, move_to_device(v, device, float_dtype)) for k, v in obj.items())
    if isinstance(obj, tuple) and hasattr(obj, "_fields"):
        return type(obj)(*(move_to_device(v, device, float_dtype) for v in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(move_to_device(v, device, float_dtype) for v in obj)
    return obj


def _quiet_deepspeed() -> None:
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


class _Interval:
    """Sums of loss/metrics/counters since the last log line (this rank), reduced across ranks when logged."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, int] = {}
        self.counters = {k: 0.0 for k in COUNTERS}
        self.grad_norms: list[float] = []
        self.steps = 0
        self.skipped = 0
        self.start = time.time()

    def add(self, name: str, value) -> None:
        # tensors stay on their device (no host sync per step); moved to the host once per log line
        value = value.detach().double().mean() if isinstance(value, torch.Tensor) else float(value)
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1


def _metric_value(value) -> float:
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


def _reduce_interval(interval: _Interval, device) -> tuple[dict, dict]:
    """Mean of each metric over micro batches and ranks; global sums of the counters."""
    import torch.distributed as dist

    names = sorted(interval.sums)
    if get_world_size() > 1:  # ranks may report different metric names: use the union
        gathered: list = [None] * get_world_size()
        dist.all_gather_object(gathered, names)
        names = sorted(set().union(*map(set, gathered)))
    n = len(names)
    buf = torch.zeros(2 * n + len(COUNTERS), dtype=torch.float64, device=device)
    for i, name in enumerate(names):
        if name in interval.sums:
            buf[i] = interval.sums[name]
            buf[n + i] = interval.counts[name]
    for j, key in enumerate(COUNTERS):
        buf[2 * n + j] = interval.counters[key]
    all_reduce_(buf, "sum")
    buf = buf.cpu()
    means = {name: (buf[i] / buf[n + i]).item() for i, name in enumerate(names) if buf[n + i] > 0}
    counters = {key: buf[2 * n + j].item() for j, key in enumerate(COUNTERS)}
    return means, counters


def train(model: nn.Module, batches: Iterable, train_cfg: TrainConfig, optim_cfg: OptimConfig,
          output_dir: str | os.PathLike, *, config_snapshot: dict, callbacks: list | None = None) -> dict:
    """Train ``model`` with DeepSpeed for ``train_cfg.steps`` optimizer steps; see the package docstring.

    Returns ``{"step", "resumed_from", "last_checkpoint", "last_log", "skipped_steps", "engine"}``.
    """
    init_distributed()
    _quiet_deepspeed()
    import deepspeed

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

    optimizer = make_step_skippable(build_optimizer(model, optim_cfg))
    names_by_id = {id(p): n for n, p in model.named_parameters()}  # before DeepSpeed flattens the groups
    param_group_names = [[names_by_id[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    hyper_keys = ("weight_decay", "betas", "eps", "lr_scale", "initial_lr", "group_name")
    group_hypers = [{k: g[k] for k in hyper_keys if k in g} for g in optimizer.param_groups]
    scheduler = WarmupCosineSchedule(optimizer, lambda s: lr_factor(s, optim_cfg, train_cfg.steps))
    ds_config = build_deepspeed_config(train_cfg)
    with _scalar_params_as_vectors(model):
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=ds_config, dist_init_required=False)
    install_safe_loader(engine)  # resume reads DeepSpeed files with torch.load(weights_only=True) + allow-list
    float_dtype = torch.bfloat16 if train_cfg.precision == "bf16" else None
    grad_check = _GradFiniteCheck(engine.module, engine.device) if train_cfg.check_nonfinite_grads else None

    # ------------------------------------------------------------------------------------------------ auto-resume
    start_step = 0
    resumed_from = None
    latest, notes = find_resume_tag(ckpt_dir) if train_cfg.auto_resume else (None, [])
    barrier()  # every rank has chosen (same files, same answer) before rank 0 cleans up
    if rank == 0 and train_cfg.auto_resume:
        for note in notes:
            print(f"[beit3.engine] {note}", file=sys.stderr)
        removed = clean_after_resume(ckpt_dir, latest)
        if removed:
            print(f"[beit3.engine] removed incomplete or stale checkpoint dirs: {', '.join(removed)}", file=sys.stderr)
    barrier()
    rank_state = None
    if latest is not None:
        resumed_from = str(ckpt_dir / latest)
        rank_state = load_rank_state(ckpt_dir / latest, rank)  # checked first: clearer error on a world-size change
        if rank_state.get("world_size", world) != world:
            raise RuntimeError(f"checkpoint '{resumed_from}' was saved with {rank_state['world_size']} ranks, "
                               f"this run has {world}: resume with the same number of ranks (per-rank data and "
                               f"RNG state; ZeRO partitions need a DeepSpeed universal checkpoint otherwise)")
        load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=latest, load_optimizer_states=True,
                                                         load_lr_scheduler_states=True)
        if load_path is None:
            raise RuntimeError(f"could not load checkpoint '{resumed_from}'")
        start_step = int(client_state["step"])
        # loading an optimizer state also restores its groups' hyper-parameters: the current config wins
        for group, hypers in zip(optimizer.param_groups, group_hypers):
            group.update(hypers)
        old_cfg = client_state.get("config")
        if rank == 0 and old_cfg is not None and old_cfg != config_snapshot:
            print(f"[beit3.engine] note: the config differs from the one saved in '{resumed_from}'")
        if rank_state["data"] is not None and hasattr(batches, "load_state_dict"):
            batches.load_state_dict(rank_state["data"])
        elif rank == 0:
            print("[beit3.engine] warning: no data state to restore; the data order after resume is not exact")
    data_iter = iter(batches)  # before the RNG restore: creating an iterator may draw from the RNG
    if rank_state is not None:
        restore_rng_state(rank_state["rng"])
    barrier()

    monitor = Monitor(output_dir, enabled=rank == 0, tensorboard=train_cfg.tensorboard, progress=train_cfg.progress,
                      total_steps=train_cfg.steps, start_step=start_step)
    if resumed_from is not None:
        monitor.message(f"[beit3.engine] resumed from {resumed_from} (step {start_step})")
    ctx = SimpleNamespace(engine=engine, model=model, optimizer=optimizer, scheduler=scheduler, train_cfg=train_cfg,
                          optim_cfg=optim_cfg, output_dir=output_dir, checkpoint_dir=ckpt_dir, rank=rank,
                          world_size=world, step=start_step, monitor=monitor)
    for cb in callbacks:
        if hasattr(cb, "on_train_start"):
            cb.on_train_start(ctx)

    def next_batch():
        nonlocal data_iter
        try:
            return next(data_iter)
        except StopIteration:
            data_iter = iter(batches)  # next epoch
            try:
                return next(data_iter)
            except StopIteration:
                raise RuntimeError("the batches iterable yielded no batch") from None

    def step_batches(step: int) -> list:
        """This step's micro batches. A data failure on any rank stops every rank at this step (one small
        all-reduce per step when world_size > 1) with DataFaultError; no collective of the step has started yet."""
        error = None
        out = []
        try:
            for _ in range(n_micro):
                out.append(next_batch())
        except Exception as err:  # the data layer's own errors (skip limit, unusable source, I/O)
            error = err
        if world > 1:
            flag = torch.tensor([1.0 if error is not None else 0.0], device=engine.device)
            failed = all_reduce_(flag, "max").item() > 0
        else:
            failed = error is not None
        if failed:
            what = f"{type(error).__name__}: {error}" if error is not None else "a data error on another rank"
            raise DataFaultError(f"data fault at step {step + 1} on rank {rank}: {what}. Training stopped; "
                                 f"{last_good_checkpoint()}") from error
        return out

    def data_skips() -> dict | None:
        """Skipped samples by reason, summed over ranks (collective: all ranks call it at the same point)."""
        if not hasattr(batches, "skip_counts"):
            return None
        local = dict(batches.skip_counts())
        if world > 1:
            import torch.distributed as dist

            gathered: list = [None] * world
            dist.all_gather_object(gathered, local)
            total: dict = {}
            for counts in gathered:
                for key, value in (counts or {}).items():
                    total[key] = total.get(key, 0) + int(value)
            return dict(sorted(total.items()))
        return dict(sorted((k, int(v)) for k, v in local.items()))

    def checkpoint(step: int) -> Path:
        client_state = {"step": step, "config": config_snapshot, "world_size": world,
                        "param_group_names": param_group_names}
        data_state = batches.state_dict() if hasattr(batches, "state_dict") else None
        tag_dir = save_checkpoint(engine, ckpt_dir, step, client_state, data_state, train_cfg.keep_last)
        for cb in callbacks:
            if hasattr(cb, "on_checkpoint"):
                cb.on_checkpoint(ctx, step, tag_dir)
        return tag_dir

    def last_good_checkpoint() -> str:
        tag = read_latest(ckpt_dir)
        if tag is None:
            return "no checkpoint has been saved yet"
        return f"the last good checkpoint is '{ckpt_dir / tag}' (auto-resume loads it when you rerun)"

    engine.train()
    step = start_step
    last_record: dict | None = None
    skipped_total = 0
    consecutive_bad = 0
    interval = _Interval()
    zero_stage = train_cfg.zero_stage
    n_micro = train_cfg.micro_batches
    want_stop_sync = any(hasattr(cb, "on_step_end") for cb in callbacks)
    try:
        while step < train_cfg.steps:
            scheduler.set_step(step)
            lr = max(group["lr"] for group in optimizer.param_groups)
            local_bad = torch.zeros((), dtype=torch.bool, device=engine.device)
            step_values: dict[str, list] = {}
            counters = {k: 0.0 for k in COUNTERS}
            grad_norm = None
            micro_batches = step_batches(step)
            for micro in range(n_micro):
                batch = move_to_device(micro_batches[micro], engine.device, float_dtype)
                out = engine(batch)
                loss, metrics = out if isinstance(out, (tuple, list)) else (out, {})
                local_bad |= ~torch.isfinite(loss.detach()).all()
                engine.backward(loss)
                step_values.setdefault("loss", []).append(loss.detach())
                for key, value in (metrics or {}).items():
                    if key in COUNTERS:
                        counters[key] += _metric_value(value)
                    elif value is not None:
                        step_values.setdefault(key, []).append(value)
                if micro == n_micro - 1:
                    grad_bad = grad_check.take() if grad_check is not None else torch.zeros_like(local_bad)
                    flags = torch.stack([local_bad, grad_bad]).float()
                    flags = all_reduce_(flags, "max").cpu()  # all ranks agree on skipping (one sync per step)
                    loss_bad, grads_bad = bool(flags[0] > 0), bool(flags[1] > 0)
                    bad = loss_bad or grads_bad
                    bad_what = "loss" if loss_bad else "gradient"
                    optimizer.skip_next_step = bad
                    if zero_stage == 0 and not bad:
                        grads = [p.grad.detach().float().norm() for p in engine.module.parameters()
                                 if p.grad is not None]
                        grad_norm = torch.stack(grads).norm().item() if grads else 0.0
                engine.step()
                optimizer.skip_next_step = False
            step += 1
            ctx.step = step

            if bad:
                interval.skipped += 1
                skipped_total += 1
                consecutive_bad += 1
                step_loss = float(torch.stack([v.float().mean() for v in step_values["loss"]]).mean())
                record = {"step": step, "loss": step_loss if not loss_bad else float("nan"), "skipped": True,
                          "nonfinite": bad_what, "nonfinite_in_a_row": consecutive_bad, "lr": lr,
                          "timestamp": time.time()}
                monitor.log(record)
                monitor.message(f"[beit3.engine] step {step}: non-finite {bad_what} on some rank; step skipped "
                                f"({consecutive_bad} in a row, limit {train_cfg.max_nonfinite_steps})")
                if consecutive_bad >= train_cfg.max_nonfinite_steps:
                    raise NonFiniteLossError(
                        f"the loss or its gradients were non-finite (NaN/Inf) for {consecutive_bad} consecutive steps "
                        f"(steps {step - consecutive_bad + 1}..{step}); training stopped "
                        f"(train.max_nonfinite_steps={train_cfg.max_nonfinite_steps}). {last_good_checkpoint()}. "
                        f"Check the data and consider a lower optim.lr, more warmup or a smaller clip_grad."
                    )
            else:
                consecutive_bad = 0
                if grad_norm is None:
                    gn = engine.get_global_grad_norm()
                    grad_norm = None if gn is None else _metric_value(gn)
                for key, values in step_values.items():
                    for value in values:
                        interval.add(key, value)
                for key in COUNTERS:
                    interval.counters[key] += counters[key]
                if grad_norm is not None:
                    interval.grad_norms.append(grad_norm)
            interval.steps += 1
            monitor.advance()

            stop = False
            if want_stop_sync:
                step_metrics = {k: sum(_metric_value(v) for v in vs) / len(vs) for k, vs in step_values.items()}
                local_stop = False
                for cb in callbacks:
                    if hasattr(cb, "on_step_end") and cb.on_step_end(ctx, step, step_metrics):
                        local_stop = True
                flag = torch.tensor([1.0 if local_stop else 0.0], device=engine.device)
                stop = all_reduce_(flag, "max").item() > 0

            # (an interval of skipped steps only has its own "skipped" lines; it is merged into the next one)
            log_now = step % train_cfg.log_every == 0 or step == train_cfg.steps or stop
            if log_now and interval.steps > interval.skipped:
                means, totals = _reduce_interval(interval, engine.device)
                elapsed = max(time.time() - interval.start, 1e-9)
                record = {"step": step, "loss": means.pop("loss", float("nan"))}
                record.update(means)
                record["lr"] = lr
                record["grad_norm"] = (sum(interval.grad_norms) / len(interval.grad_norms)
                                       if interval.grad_norms else None)
                record["samples_per_s"] = totals["num_samples"] / elapsed if totals["num_samples"] else None
                record["tokens_per_s"] = totals["num_tokens"] / elapsed if totals["num_tokens"] else None
                record["time"] = elapsed / max(interval.steps, 1)  # seconds per optimizer step
                if interval.skipped:
                    record["skipped_steps"] = interval.skipped
                skips = data_skips()
                if skips is not None:
                    record["data_skips"] = skips
                record["timestamp"] = time.time()
                monitor.log(record)
                last_record = record
                for cb in callbacks:
                    if hasattr(cb, "on_log"):
                        cb.on_log(ctx, record)
                interval = _Interval()

            # no periodic save on a skipped step: "latest" stays on the last step with a finite loss
            if (step % train_cfg.save_every == 0 and not bad) or step == train_cfg.steps or stop:
                checkpoint(step)
            if stop:
                monitor.message(f"[beit3.engine] stop requested by a callback after step {step}")
                break
    except TrainingStopped as err:
        monitor.message(f"[beit3.engine] training stopped at step {step}: {err}")
        raise
    finally:
        if grad_check is not None:
            grad_check.remove()
        monitor.close()

    skips = data_skips()
    if skips:
        monitor.message(f"[beit3.engine] data: {sum(skips.values())} samples skipped and replaced in this run "
                        f"and before it ({', '.join(f'{k}: {v}' for k, v in skips.items())})")
    latest = read_latest(ckpt_dir)
    summary = {
        "step": step,
        "resumed_from": resumed_from,
        "last_checkpoint": str(ckpt_dir / latest) if latest else None,
        "last_log": last_record,
        "skipped_steps": skipped_total,
        "data_skips": skips,
        "checkpoints": [str(ckpt_dir / t) for _, t in list_tags(ckpt_dir)],
        "engine": engine,
    }
    for cb in callbacks:
        if hasattr(cb, "on_train_end"):
            cb.on_train_end(ctx, summary)
    return summary
