"""Helpers shared by the tests: free ports and the deepspeed launcher, logs, a weight-snapshot callback, an
environment for tool subprocesses, a loss run on two gloo ranks, and procedural shape images."""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch import nn

REPO = Path(__file__).resolve().parents[1]
_BIN = Path(sys.executable).parent
LAUNCHER = _BIN / "deepspeed" if (_BIN / "deepspeed").exists() else shutil.which("deepspeed")
LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tool_env(**extra: str) -> dict:
    """This process's environment for a tool subprocess: this Python's bin folder first on PATH (the deepspeed
    launcher spawns ``python`` from PATH), the repository on PYTHONPATH, one OpenMP thread (2 ranks on a small CPU
    box), and without the process-group variables an earlier test's one-rank group left in ``os.environ`` (a tool
    would take them for a launcher's and reuse a bound port); ``extra`` last."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARIABLES}
    env["PATH"] = f"{_BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def read_log(out) -> list[dict]:
    """The records of ``out/log.jsonl``, every line (a test's log must be whole)."""
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


class WeightSnapshot:
    """Engine callback: the toy model's ``patch.weight`` after every step (gathered under ZeRO-3)."""

    def __init__(self):
        self.weights = {}

    def on_step_end(self, ctx, step, metrics):
        import deepspeed

        weight = ctx.engine.module.patch.weight
        with deepspeed.zero.GatheredParameters([weight], enabled=hasattr(weight, "ds_id")):
            self.weights[step] = weight.detach().float().clone()


def _worker(rank: int, world: int, port: int, build_loss: Callable, out_path) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        loss, module = build_loss(rank)
        loss.backward()
        grads = torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])
        torch.distributed.all_reduce(grads)
        total = loss.detach().clone()
        torch.distributed.all_reduce(total)
        if rank == 0:
            torch.save((total / world, grads / world), out_path)
    finally:
        torch.distributed.destroy_process_group()


def loss_and_grads_on_two_ranks(build_loss: Callable[[int], tuple[torch.Tensor, nn.Module]], out_path):
    """Run ``build_loss(rank) -> (loss, module)`` on 2 ranks (a picklable callable: a module-level function or a
    ``functools.partial`` of one) and return the rank-averaged loss and gradients of ``module``'s parameters."""
    torch.multiprocessing.spawn(_worker, args=(2, free_port(), build_loss, out_path), nprocs=2, join=True)
    return torch.load(out_path)


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(c) for c in rng.integers(0, 256, 3))


def shape_image(rng: np.random.Generator, size: int) -> Image.Image:
    """One RGB image: a two-colour gradient background with 1-4 ellipses, rectangles, triangles or stripe bands."""
    big = size * 2  # draw at 2x and downsample for anti-aliased edges
    ramp = np.linspace(0.0, 1.0, big)[None, :, None]
    if rng.random() < 0.5:
        ramp = ramp.transpose(1, 0, 2)
    a, b = np.array(_colour(rng)), np.array(_colour(rng))
    background = (a * (1 - ramp) + b * ramp) * np.ones((big, big, 1))
    image = Image.fromarray(background.astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(rng.integers(1, 5)):
        x0, y0 = rng.integers(0, big - 8, 2)
        x1, y1 = x0 + rng.integers(8, big // 2 + 8), y0 + rng.integers(8, big // 2 + 8)
        kind = rng.integers(0, 4)
        if kind == 0:
            draw.ellipse([x0, y0, x1, y1], fill=_colour(rng))
        elif kind == 1:
            draw.rectangle([x0, y0, x1, y1], fill=_colour(rng))
        elif kind == 2:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=_colour(rng))
        else:
            step = int(rng.integers(3, 9))
            for offset in range(0, int(x1 - x0), 2 * step):
                draw.rectangle([x0 + offset, y0, x0 + offset + step, y1], fill=_colour(rng))
    return image.resize((size, size), Image.BILINEAR)


def shape_images(num: int, size: int, seed: int = 0) -> torch.Tensor:
    """``[num, 3, size, size]`` float images in [0, 1]."""
    rng = np.random.default_rng(seed)
    arrays = np.stack([np.asarray(shape_image(rng, size)) for _ in range(num)])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0
