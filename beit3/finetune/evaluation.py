"""Evaluation of a task model on one split (sharded over ranks, records gathered), writing of the predictions file,
and :class:`EvalCallback`, which evaluates during training and keeps the best checkpoint."""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from beit3.engine import Callback, gathered_parameters, get_rank, get_world_size, move_to_device
from beit3.models import save_pretrained

from .data import SampleDataset, eval_batches
from .task import EvalResult, FinetuneTask, TaskContext

BEST_DIR = "best"
BEST_METRICS_FILE = "best_metrics.json"
EVAL_LOG_FILE = "eval_log.jsonl"


def _gather(records: list[dict]) -> list[dict]:
    """All ranks' records, rank-interleaved back into index order (rank r holds items r, r + W, ...)."""
    world = get_world_size()
    if world == 1:
        return records
    parts: list = [None] * world
    dist.all_gather_object(parts, records)
    return [parts[r][i] for i in range(len(parts[0])) for r in range(world) if i < len(parts[r])]


def evaluate(task: FinetuneTask, model: nn.Module, samples: SampleDataset, ctx: TaskContext, split: str,
             batch_size: int, num_workers: int = 0, device: Optional[torch.device] = None,
             float_dtype: Optional[torch.dtype] = None) -> EvalResult:
    """Run ``model`` (eval mode, no grad) over ``samples`` on every rank and score the gathered records."""
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    records = []
    try:
        with torch.no_grad():
            for batch in eval_batches(samples, batch_size, rank=get_rank(), world_size=get_world_size(),
                                      collate=task.collate, num_workers=num_workers):
                valid = batch.pop("valid").tolist()
                outputs = task.predict(model, move_to_device(batch, device, float_dtype), ctx)
                records.extend({**r, "_valid": v} for r, v in zip(outputs, valid))
        records = [{k: v for k, v in r.items() if k != "_valid"} for r in _gather(records) if r["_valid"]]
        return task.score(model, records, ctx, split)
    finally:
        model.train(was_training)


def write_predictions(result: EvalResult, directory: str | Path, split: str) -> Optional[Path]:
    """Write ``result.predictions`` as ``<predictions_name>_<split>.json`` (rank 0 only); returns the path."""
    if result.predictions is None or get_rank() != 0:
        return None
    path = Path(directory) / f"{result.predictions_name}_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result.predictions))
    return path


class EvalCallback(Callback):
    """Evaluate every ``every_steps`` optimizer steps and after the last one; log each result to ``eval_log.jsonl``;
    when ``metric`` improves, save the task model as ``best/`` (``save_pretrained``) + ``best_metrics.json``.

    The best value is read back from ``best_metrics.json`` when a run resumes. ``last`` holds the latest result.
    """

    def __init__(self, task: FinetuneTask, samples: SampleDataset, ctx: TaskContext, split: str, batch_size: int,
                 every_steps: int, metric: str, num_workers: int = 0):
        self.task, self.samples, self.ctx, self.split = task, samples, ctx, split
        self.batch_size, self.every_steps, self.metric, self.num_workers = batch_size, every_steps, metric, num_workers
        self.best: Optional[float] = None
        self.last: Optional[dict] = None

    def on_train_start(self, ctx) -> None:
        path = Path(ctx.output_dir) / BEST_METRICS_FILE
        if path.is_file():
            self.best = json.loads(path.read_text())["metrics"][self.metric]

    def on_step_end(self, ctx, step: int, metrics: dict) -> None:
        if step % self.every_steps and step != ctx.train_cfg.steps:
            return
        start = time.time()
        float_dtype = torch.bfloat16 if ctx.train_cfg.precision == "bf16" else None
        task_model = ctx.engine.module.model
        with gathered_parameters(ctx.engine):
            result = evaluate(self.task, task_model, self.samples, self.ctx, self.split, self.batch_size,
                              self.num_workers, ctx.engine.device, float_dtype)
            if self.metric not in result.metrics:
                raise KeyError(f"evaluation on '{self.split}' gave no metric '{self.metric}' "
                               f"(got {sorted(result.metrics)}); set eval.metric")
            value = result.metrics[self.metric]
            improved = self.best is None or value > self.best
            out = Path(ctx.output_dir)
            if improved and ctx.rank == 0:
                save_pretrained(task_model, out / BEST_DIR, text_tokenizer=getattr(self.ctx.tokenizer, "spm_path", None))
                write_predictions(result, out / BEST_DIR, self.split)
                record = {"step": step, "split": self.split, "metric": self.metric, "metrics": result.metrics}
                (out / BEST_METRICS_FILE).write_text(json.dumps(record, indent=2) + "\n")
        if improved:
            self.best = value
        self.last = {"step": step, "split": self.split, "metrics": result.metrics,
                     "eval_seconds": time.time() - start, "best": self.best}
        if ctx.rank == 0:
            with (out / EVAL_LOG_FILE).open("a") as f:
                f.write(json.dumps(self.last) + "\n")
            shown = ", ".join(f"{k}={v:.2f}" for k, v in result.metrics.items())
            print(f"[beit3.finetune] step {step} eval {self.split}: {shown}", flush=True)
