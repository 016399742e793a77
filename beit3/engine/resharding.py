"""Resuming on another number of ranks: the global-batch check, DeepSpeed's universal checkpoints for the weights
and the (ZeRO-partitioned) optimizer state, and the hand-over of the data iterators' global order.

DeepSpeed cannot load a ZeRO checkpoint on another data-parallel world size directly; its own mechanism is the
universal checkpoint: ``deepspeed.checkpoint.ds_to_universal`` turns one tag into per-parameter fp32 weights and Adam
moments, and an engine with ``checkpoint.load_universal`` re-partitions them for its world size. Rank 0 converts the
tag into ``.tmp-universal-<tag>`` next to it (removed after loading), every rank loads it.
"""
from __future__ import annotations

import contextlib
import io
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch

from beit3.comm import all_reduce_, barrier, get_rank
from beit3.errors import CheckpointError, ConfigError

from .checkpointing import TMP_PREFIX
from .safe_load import safe_torch_load_everywhere


def check_global_batch(saved_world: int, saved_micro: int | None, world: int, micro: int, where: str) -> None:
    """ConfigError naming the value to set when ``world x micro`` rank batches per optimizer step differ from the
    saved run's (the per-rank batch is the data config's, compared with the rest of the config)."""
    if saved_micro is None or saved_world * saved_micro == world * micro:
        return
    total = saved_world * saved_micro
    if total % world == 0:
        hint = f"set train.micro_batches={total // world} to keep it"
    else:
        hint = f"no train.micro_batches keeps it on {world} ranks: use a number of ranks that divides {total}"
    raise ConfigError(f"'{where}' was saved with {saved_world} ranks x train.micro_batches={saved_micro} per "
                      f"optimizer step; this run has {world} x {micro}, which changes the global batch: {hint}")


@contextlib.contextmanager
def _cat_accepting_scalars():
    """DeepSpeed pitfall: ``ds_to_universal`` joins each parameter's ZeRO fragments with ``torch.cat``, which refuses
    the 0-dim fragments of a 0-dim parameter (CLIP's ``logit_scale``). While converting, 0-dim inputs are viewed as
    shape (1,) (the converter reshapes the result to the parameter's shape)."""
    original = torch.cat

    def cat(tensors, *args, **kwargs):
        tensors = [t.reshape(1) if isinstance(t, torch.Tensor) and t.dim() == 0 else t for t in tensors]
        return original(tensors, *args, **kwargs)

    torch.cat = cat
    try:
        yield
    finally:
        torch.cat = original


def _convert(tag_dir: Path, out_dir: Path) -> None:
    """``ds_to_universal`` on one tag, in this process (no worker pool), its output captured."""
    from deepspeed.checkpoint import ds_to_universal

    args = SimpleNamespace(input_folder=str(tag_dir), output_folder=str(out_dir), num_extract_workers=1,
                           num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured), \
                safe_torch_load_everywhere(), _cat_accepting_scalars():
            ds_to_universal.main(args)
    except Exception as err:
        tail = " | ".join(captured.getvalue().strip().splitlines()[-3:])
        raise CheckpointError(f"DeepSpeed could not convert '{tag_dir}' to a universal checkpoint "
                              f"({type(err).__name__}: {err}; {tail})") from err


def load_on_new_world_size(engine, ckpt_dir: Path, tag: str) -> tuple[str | None, dict]:
    """Load checkpoint ``tag`` (saved on another number of ranks) into ``engine`` through a universal checkpoint.
    Collective: every rank calls it. Returns ``engine.load_checkpoint``'s ``(load_path, client_state)``."""
    universal = ckpt_dir / f"{TMP_PREFIX}universal-{tag}"
    failure = None
    if get_rank() == 0:
        try:
            _convert(ckpt_dir / tag, universal)
        except CheckpointError as err:
            failure = err
    failed = all_reduce_(torch.tensor([float(failure is not None)], device=engine.device), "max").item() > 0
    if failed:
        raise failure or CheckpointError(f"rank 0 could not convert '{ckpt_dir / tag}' to a universal checkpoint")
    engine._config.load_universal_checkpoint = True  # DeepSpeed reads the flag at load time
    try:
        with safe_torch_load_everywhere():
            load_path, client_state = engine.load_checkpoint(str(ckpt_dir), tag=universal.name,
                                                             load_optimizer_states=True,
                                                             load_lr_scheduler_states=True)
    finally:
        engine._config.load_universal_checkpoint = False
    barrier()
    if get_rank() == 0:
        shutil.rmtree(universal, ignore_errors=True)
        (ckpt_dir / "latest_universal").unlink(missing_ok=True)
    return load_path, client_state
