"""Process-group helpers that work under the ``deepspeed`` launcher, ``torchrun`` and plain ``python``."""
from __future__ import annotations

import argparse
import atexit
import contextlib
import gc
import logging
import os
import socket
import sys
from typing import NoReturn

import torch
import torch.distributed as dist

from ..comm import all_reduce_, barrier, get_rank, get_world_size  # noqa: F401  (this package's API)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_distributed() -> None:
    """Initialise the default process group once (gloo on CPU, nccl on GPU).

    Launchers (``deepspeed``, ``torchrun``) set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT; for a plain
    ``python script.py`` a one-rank group on a free local port is created.
    """
    if dist.is_available() and dist.is_initialized():
        return
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.setdefault("LOCAL_RANK", "0")
    import deepspeed

    _skip_cpu_shm_comm_build()
    deepspeed.init_distributed(verbose=False)
    atexit.register(_destroy_process_group)
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def _destroy_process_group() -> None:
    """Tear the process group down before interpreter exit: left to static destructors, gloo's worker threads are
    sometimes destroyed while joinable, and the process aborts ("terminate called without an active exception")
    after its work is done."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # local, no collective: a rank that failed alone still exits promptly


def exit_process(code: int) -> NoReturn:
    """End a tool's process with ``code`` (the ``if __name__ == "__main__"`` of tools/pretrain.py, finetune.py,
    train_tokenizer.py). After a process group was used, output is flushed and the interpreter's finalisation is
    skipped (``os._exit``): there gloo's threads sometimes abort a finished run ("terminate called without an
    active exception", exit 250; seen in 2 of 3 CI runs of the 2-rank ZeRO-3 tests on 2026-12-03, pytorch/pytorch
    #190489), even with the process group destroyed at exit. Every file the run writes is closed by then."""
    if not (dist.is_available() and dist.is_initialized()):
        sys.exit(code)
    gc.collect()  # finalises a finished DataLoader iterator: its workers are joined, not orphaned
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    logging.shutdown()
    os._exit(code)


def _skip_cpu_shm_comm_build() -> None:
    """On the CPU accelerator DeepSpeed JIT-compiles a shared-memory all-reduce op (``deepspeed_shm_comm``, ~1-2 min
    of g++ on first use, rebuilt whenever the torch-extension cache is invalidated) when the comm backend starts.
    It only speeds up CPU all-reduce; plain gloo is used without it. Set ``BEIT3_DS_SHM_COMM=1`` to keep it."""
    if os.environ.get("BEIT3_DS_SHM_COMM") == "1":
        return
    try:
        from deepspeed.accelerator import get_accelerator
        import deepspeed.ops

        if get_accelerator().device_name() == "cpu":
            deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    except Exception:  # an older/newer DeepSpeed without this switch: leave it alone
        pass






def get_local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main_process() -> bool:
    return get_rank() == 0






def gathered_parameters(engine):
    """Context in which ``engine.module`` holds its full parameters on every rank (gathered under ZeRO-3, nothing to
    do otherwise): for passes whose number of forward calls may differ between ranks (beam search) or that read
    weights directly."""
    if getattr(engine, "zero_optimization_partition_weights", lambda: False)():
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None)
    return contextlib.nullcontext()


class _SetAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        items = list(getattr(namespace, self.dest, None) or [])
        items.extend(values if isinstance(values, list) else [values])
        setattr(namespace, self.dest, items)


def add_common_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``--config PATH``, ``--set key=value`` (repeatable; ``--set a=1 b=2`` also works) and ``--local_rank``.

    ``--local_rank`` is accepted (the deepspeed launcher appends it) and ignored: use ``LOCAL_RANK`` from the env.
    """
    parser.add_argument("--config", default=None, help="YAML config file")
    parser.add_argument(
        "--set",
        dest="overrides",
        metavar="KEY=VALUE",
        nargs="+",
        action=_SetAction,
        default=[],
        help="override a config key, e.g. --set optim.lr=1e-4 train.steps=100 (repeatable)",
    )
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser
