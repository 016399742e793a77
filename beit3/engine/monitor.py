"""Rank-0 outputs: ``log.jsonl``, TensorBoard scalars, and on the console a tqdm progress bar (a terminal) or one
plain line per logged step (output to a file or pipe: schedulers, nohup); and the log interval whose sums become
one record (reduced over ranks)."""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from ..comm import all_reduce_, get_world_size
from .step import COUNTERS, StepResult


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan"/"inf": keep log.jsonl strict JSON
    return value


def progress_line(record: dict, total_steps: int) -> str:
    """One console line of a log record: step, loss and its parts, lr, samples/s and the time left."""
    step = record["step"]
    parts = [f"step {step}/{total_steps}", f"loss {record['loss']:.4g}" if isinstance(record.get("loss"), float) else ""]
    streams = {k[len("loss_"):]: v for k, v in record.items() if k.startswith("loss_") and isinstance(v, float)}
    if streams:
        parts[-1] += " (" + ", ".join(f"{k} {v:.4g}" for k, v in sorted(streams.items())) + ")"
    if isinstance(record.get("lr"), float):
        parts.append(f"lr {record['lr']:.3g}")
    if record.get("samples_per_s"):
        parts.append(f"{record['samples_per_s']:.1f} samples/s")
    if record.get("time"):
        parts.append(f"ETA {datetime.timedelta(seconds=round(record['time'] * max(total_steps - step, 0)))}")
    if record.get("skipped"):
        parts.append(f"skipped (non-finite {record.get('nonfinite', '')})")
    return "[beit3] " + "  ".join(p for p in parts if p)


class Monitor:
    """Writes one JSON object per logged step to ``log.jsonl`` (appending across restarts) and TensorBoard scalars;
    ``progress``: ``auto`` = a bar on a terminal, else a plain line per logged step; ``on`` = the bar; ``off`` =
    neither (messages still print)."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, tensorboard: bool, progress: str, total_steps: int,
                 start_step: int):
        self.enabled = enabled
        self.log_path = Path(output_dir) / "log.jsonl"
        self.writer = None
        self.bar = None
        self.total_steps = total_steps
        self.lines = False
        if not enabled:
            return
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self._truncate_after(start_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"), purge_step=start_step + 1)
            except Exception as err:  # tensorboard not installed or unusable: the JSON log still works
                print(f"[beit3.engine] TensorBoard disabled: {err}", file=sys.stderr)
        show = progress == "on" or (progress == "auto" and sys.stdout.isatty())
        self.lines = progress == "auto" and not show
        if show:
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, desc="train")
            except ImportError:
                self.bar = None

    def _truncate_after(self, step: int) -> None:
        """Drop lines for steps after ``step`` (written by a run that crashed after its last checkpoint)."""
        if not self.log_path.is_file():
            return
        lines = self.log_path.read_text().splitlines()
        kept = []
        for line in lines:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a torn last line
            if isinstance(record, dict) and int(record.get("step", 0)) <= step:
                kept.append(line)
        if len(kept) != len(lines):
            tmp = self.log_path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(line + "\n" for line in kept))
            os.replace(tmp, self.log_path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.log_path.open("a") as handle:
            handle.write(json.dumps({k: _jsonable(v) for k, v in record.items()}) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key, value in record.items():
                if key in ("step", "timestamp") or not isinstance(value, (int, float)) or isinstance(value, bool):
                    continue
                if not math.isfinite(value):
                    continue
                tag = f"eval/{key[len('eval_'):]}" if key.startswith("eval_") else f"train/{key}"
                self.writer.add_scalar(tag, value, step)
            self.writer.flush()
        if self.bar is not None:
            shown = {k: record[k] for k in ("loss", "lr") if isinstance(record.get(k), float)}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
        elif self.lines and "loss" in record:  # training rows (held-out eval rows have eval_* keys only)
            print(progress_line(record, self.total_steps), flush=True)

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Interval:
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

    def add_step(self, result: StepResult) -> None:
        """Count a step; a skipped step's values stay out of the means."""
        self.steps += 1
        if result.skipped:
            self.skipped += 1
            return
        for key, values in result.values.items():
            for value in values:
                self.add(key, value)
        for key in COUNTERS:
            self.counters[key] += result.counters[key]
        if result.grad_norm is not None:
            self.grad_norms.append(result.grad_norm)


def _reduce_interval(interval: Interval, device) -> tuple[dict, dict]:
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


def interval_record(interval: Interval, step: int, lr: float, device) -> dict:
    """The log line of an interval (collective: every rank calls it at the same step)."""
    means, totals = _reduce_interval(interval, device)
    elapsed = max(time.time() - interval.start, 1e-9)
    record = {"step": step, "loss": means.pop("loss", float("nan"))}
    record.update(means)
    record["lr"] = lr
    record["grad_norm"] = sum(interval.grad_norms) / len(interval.grad_norms) if interval.grad_norms else None
    record["samples_per_s"] = totals["num_samples"] / elapsed if totals["num_samples"] else None
    record["tokens_per_s"] = totals["num_tokens"] / elapsed if totals["num_tokens"] else None
    record["time"] = elapsed / max(interval.steps, 1)  # seconds per optimizer step
    record["world_size"] = get_world_size()  # says in the log where a resumed run changed its number of ranks
    if interval.skipped:
        record["skipped_steps"] = interval.skipped
    return record
