"""Rank-0 outputs: ``log.jsonl``, TensorBoard scalars and a tqdm progress bar."""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path


def _jsonable(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # "nan"/"inf": keep log.jsonl strict JSON
    return value


class Monitor:
    """Writes one JSON object per logged step to ``log.jsonl`` (appending across restarts) and TensorBoard scalars."""

    def __init__(self, output_dir: str | Path, *, enabled: bool, tensorboard: bool, progress: str, total_steps: int,
                 start_step: int):
        self.enabled = enabled
        self.log_path = Path(output_dir) / "log.jsonl"
        self.writer = None
        self.bar = None
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
