"""One optimizer step, whole: :func:`train_step` runs the forward and backward of each micro batch, makes every rank
agree on whether the loss or a gradient was non-finite, and lets DeepSpeed clip and step (or skip) the optimizer.
The loop of :mod:`beit3.engine.loop` and the benchmark's DeepSpeed case both call it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
from torch import nn

from ..comm import all_reduce_

COUNTERS = ("num_samples", "num_tokens")


@dataclass
class StepResult:
    """What one optimizer step produced on this rank: per-micro-batch loss and metrics (device tensors or floats;
    no host sync), the counters summed over micro batches, whether the step was skipped and why, the grad norm."""

    values: dict[str, list] = field(default_factory=dict)
    counters: dict[str, float] = field(default_factory=lambda: {k: 0.0 for k in COUNTERS})
    loss_nonfinite: bool = False
    grad_nonfinite: bool = False
    grad_norm: Optional[float] = None

    @property
    def skipped(self) -> bool:
        return self.loss_nonfinite or self.grad_nonfinite

    def mean(self, key: str) -> float:
        return sum(metric_value(v) for v in self.values[key]) / len(self.values[key])


def train_step(engine, optimizer, micro_batches: Sequence, grad_check: Optional["GradFiniteCheck"] = None,
               float_dtype: Optional[torch.dtype] = None) -> StepResult:
    """Forward + backward of every micro batch, then DeepSpeed's step at the last one (gradient accumulation
    boundary: clipping to ``gradient_clipping``, the optimizer update, the lr scheduler).

    A non-finite loss or gradient on any rank skips the update on all ranks: one all-reduce of two flags per step,
    and ``optimizer.skip_next_step`` (see :func:`beit3.engine.optim.make_step_skippable`) drops the update."""
    result = StepResult()
    loss_bad = torch.zeros((), dtype=torch.bool, device=engine.device)
    for micro, batch in enumerate(micro_batches):
        out = engine(move_to_device(batch, engine.device, float_dtype))
        loss, metrics = out if isinstance(out, (tuple, list)) else (out, {})
        loss_bad |= ~torch.isfinite(loss.detach()).all()
        engine.backward(loss)
        _collect(result, loss, metrics)
        if micro == len(micro_batches) - 1:  # the boundary: decide before engine.step() updates
            grad_bad = grad_check.take() if grad_check is not None else torch.zeros_like(loss_bad)
            flags = all_reduce_(torch.stack([loss_bad, grad_bad]).float(), "max").cpu()
            result.loss_nonfinite, result.grad_nonfinite = bool(flags[0] > 0), bool(flags[1] > 0)
            optimizer.skip_next_step = result.skipped
            if engine.zero_optimization_stage() == 0 and not result.skipped:
                result.grad_norm = _local_grad_norm(engine.module)  # DeepSpeed reports none without ZeRO
        engine.step()
        optimizer.skip_next_step = False
    if result.grad_norm is None and not result.skipped:
        norm = engine.get_global_grad_norm()
        result.grad_norm = None if norm is None else metric_value(norm)
    return result


def _collect(result: StepResult, loss: torch.Tensor, metrics: Optional[dict]) -> None:
    result.values.setdefault("loss", []).append(loss.detach())
    for key, value in (metrics or {}).items():
        if key in COUNTERS:
            result.counters[key] += metric_value(value)
        elif value is not None:
            result.values.setdefault(key, []).append(value)


def _local_grad_norm(module: nn.Module) -> float:
    grads = [p.grad.detach().float().norm() for p in module.parameters() if p.grad is not None]
    return torch.stack(grads).norm().item() if grads else 0.0


def metric_value(value) -> float:
    return float(value.detach().float().mean()) if isinstance(value, torch.Tensor) else float(value)


class GradFiniteCheck:
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
