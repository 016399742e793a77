"""Checkpoints: DeepSpeed tag directories + per-rank data/RNG state, atomic publication, retention, resume choice.

Layout under ``output_dir/checkpoints/``::

    latest                      the tag of the newest complete checkpoint (DeepSpeed's format: one line)
    step00000300/               a complete checkpoint (only ever created by renaming a finished temporary dir)
        *model_states.pt, *optim_states.pt   engine.save_checkpoint(...) files (model/optimizer/scheduler, ZeRO)
        rank0_state.pt          data-iterator state_dict + RNG states of rank 0 (torch.load(weights_only=True))
        rank1_state.pt          ...
        complete.json           manifest written last: step, world size, micro batches, every file with its size
                                and SHA-256 (``tag_files``)
    .tmp-step00000400/          a save in progress (or left by a crash during a save; removed on resume)
    step00000500.corrupt/       a newer checkpoint that failed verification, moved aside at resume
    zero_to_fp32.py             copied there by DeepSpeed

A save is written under ``.tmp-<tag>``; after every rank finished (barrier) rank 0 writes the manifest, renames the
directory to ``<tag>`` (atomic on POSIX), points ``latest`` at it (temp file + ``os.replace``) and only then prunes
old tags. A kill at any moment leaves ``latest`` on a complete checkpoint; resume verifies the manifest (sizes and
checksums) and falls back to the newest tag that verifies if ``latest`` is missing or broken (:func:`find_resume_tag`).
Export is in ``export``.

Test hook (used by the kill-during-save test only): with ``BEIT3_TEST_CRASH_IN_SAVE=RANK:STEP`` in the environment,
rank RANK calls ``os._exit(17)`` in the middle of the save of step STEP (after writing its files, before the barrier
that publishes the checkpoint), as a SIGKILL would leave it.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import tempfile
from pathlib import Path

import numpy as np
import torch

from .dist import barrier, get_rank, get_world_size
from .tag_files import MANIFEST, checkpoint_problem, write_manifest

TAG_RE = re.compile(r"^step(\d{8,})$")


def tag_for_step(step: int) -> str:
    return f"step{step:08d}"


def step_of_tag(tag: str) -> int | None:
    match = TAG_RE.match(tag)
    return int(match.group(1)) if match else None


# ----------------------------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """Python, numpy, torch (and CUDA) RNG states as plain ints/lists/tensors (weights_only-loadable)."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "numpy": {
            "name": str(np_name),
            "keys": torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "gauss": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))
    npst = state["numpy"]
    np.random.set_state(
        (npst["name"], npst["keys"].numpy().astype(np.uint32), npst["pos"], npst["has_gauss"], npst["gauss"])
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


# ------------------------------------------------------------------------------------------------------ save / rotate
def read_latest(ckpt_dir: str | Path) -> str | None:
    path = Path(ckpt_dir) / "latest"
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag or None


def _write_latest(ckpt_dir: Path, tag: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".latest.", dir=ckpt_dir)
    with os.fdopen(fd, "w") as handle:
        handle.write(tag)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, ckpt_dir / "latest")


def list_tags(ckpt_dir: str | Path) -> list[tuple[int, str]]:
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    tags = [(step_of_tag(p.name), p.name) for p in ckpt_dir.iterdir() if p.is_dir()]  # .tmp-* dirs: step None
    return sorted((s, t) for s, t in tags if s is not None)


TMP_PREFIX = ".tmp-"
CORRUPT_SUFFIX = ".corrupt"
CRASH_HOOK_ENV = "BEIT3_TEST_CRASH_IN_SAVE"


def _crash_hook(rank: int, step: int) -> None:
    """Test hook (see the module docstring): die like a SIGKILL in the middle of a save."""
    spec = os.environ.get(CRASH_HOOK_ENV)
    if spec and spec == f"{rank}:{step}":
        print(f"[beit3.engine] {CRASH_HOOK_ENV}={spec}: rank {rank} exits in the middle of the save of step {step}",
              flush=True)
        os._exit(17)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def find_resume_tag(ckpt_dir: str | Path) -> tuple[str | None, list[str]]:
    """(tag to resume from, notes). ``latest`` when it names a complete checkpoint, else the newest complete tag.

    Complete = sizes and SHA-256 as the manifest says (:func:`~beit3.engine.tag_files.checkpoint_problem`). Pure
    reading; in a training run rank 0 calls it and broadcasts the answer, and cleaning up is
    :func:`clean_after_resume` (rank 0).
    """
    ckpt_dir = Path(ckpt_dir)
    notes = []
    latest = read_latest(ckpt_dir)
    if latest is not None:
        problem = checkpoint_problem(ckpt_dir / latest)
        if problem is None:
            return latest, notes
        notes.append(f"'latest' names '{latest}', which is not a complete checkpoint ({problem})")
    for step, tag in reversed(list_tags(ckpt_dir)):
        problem = checkpoint_problem(ckpt_dir / tag)
        if problem is None:
            if latest is not None or notes:
                notes.append(f"resuming from the newest complete checkpoint '{tag}' instead")
            return tag, notes
        notes.append(f"skipping '{tag}': {problem}")
    return None, notes


def clean_after_resume(ckpt_dir: str | Path, tag: str | None) -> list[str]:
    """Rank 0: remove temporary save dirs and complete tags newer than the resumed one (they will be written
    again); a newer tag whose save finished (it has a manifest) but that fails verification is moved aside to
    ``<tag>.corrupt`` (kept for inspection, out of resume and rotation). Published tags are never touched when no
    checkpoint is usable. Returns what was done, one entry per directory."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    removed = []
    resume_step = step_of_tag(tag) if tag else None
    for path in ckpt_dir.iterdir():
        if not path.is_dir():
            continue
        step = step_of_tag(path.name)
        stale = path.name.startswith(TMP_PREFIX)
        if step is not None and resume_step is not None:
            stale = step > resume_step
        if stale and step is not None and (path / MANIFEST).is_file() and checkpoint_problem(path) is not None:
            aside = path.with_name(path.name + CORRUPT_SUFFIX)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            removed.append(f"{path.name} (moved aside to {aside.name})")
        elif stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    if tag is not None and read_latest(ckpt_dir) != tag:
        _write_latest(ckpt_dir, tag)
    return sorted(removed)


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, client_state: dict, data_state, keep_last: int) -> Path:
    """Save on ALL ranks; returns the published tag directory.

    Every rank writes its part into ``.tmp-<tag>``, barrier, rank 0 writes the manifest, renames the directory to
    ``<tag>``, points ``latest`` at it, then deletes complete tags beyond the newest ``keep_last`` (never the new
    one) and leftover temporary dirs; barrier. A crash at any point leaves ``latest`` on a complete checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    rank = get_rank()
    tag = tag_for_step(step)
    tmp_tag = TMP_PREFIX + tag
    tmp_dir, tag_dir = ckpt_dir / tmp_tag, ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp_dir, ignore_errors=True)  # left by an earlier crash at this step
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tmp_tag, client_state=client_state, save_latest=False)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    micro_batches = int(client_state.get("micro_batches", 1))
    rank_state = {"step": int(step), "rank": rank, "world_size": get_world_size(), "micro_batches": micro_batches,
                  "data": data_state, "rng": capture_rng_state()}
    tmp = tmp_dir / f".rank{rank}_state.pt.tmp"
    torch.save(rank_state, tmp)
    os.replace(tmp, tmp_dir / f"rank{rank}_state.pt")
    _crash_hook(rank, step)
    barrier()
    if rank == 0:
        write_manifest(tmp_dir, step, get_world_size(), micro_batches)
        if tag_dir.exists():  # a stale copy of this step (never the one `latest` names: steps only grow)
            old = ckpt_dir / (TMP_PREFIX + "old-" + tag)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(tag_dir, old)
        os.replace(tmp_dir, tag_dir)
        _fsync_dir(ckpt_dir)
        _write_latest(ckpt_dir, tag)
        _fsync_dir(ckpt_dir)
        complete = [t for _, t in list_tags(ckpt_dir) if checkpoint_problem(ckpt_dir / t, verify=False) is None]
        for old_tag in complete[:-keep_last] if keep_last > 0 else []:
            if old_tag != tag:
                shutil.rmtree(ckpt_dir / old_tag, ignore_errors=True)
        for path in ckpt_dir.iterdir():
            if path.is_dir() and path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)
    barrier()
    return tag_dir


# ---------------------------------------------------------------------------------------------------- disk space
BYTES_PER_TRAINABLE_PARAM = 16  # fp32 weights (module states) + fp32 master copy + AdamW exp_avg + exp_avg_sq
BYTES_PER_FROZEN_PARAM = 4  # fp32 weights only


def estimate_checkpoint_bytes(model: torch.nn.Module) -> int:
    """Upper estimate of one checkpoint's size: parameter count x bytes (weights + optimizer states), +5% + 1 MiB
    for buffers, client state and per-rank files."""
    trainable = frozen = 0
    for param in model.parameters():
        numel = int(getattr(param, "ds_numel", param.numel()))
        if param.requires_grad:
            trainable += numel
        else:
            frozen += numel
    raw = trainable * BYTES_PER_TRAINABLE_PARAM + frozen * BYTES_PER_FROZEN_PARAM
    return int(raw * 1.05) + (1 << 20)


def free_bytes(path: str | Path) -> int:
    """Free bytes on the file system holding ``path`` (or its nearest existing parent); ``shutil.disk_usage``."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def check_checkpoint_space(model: torch.nn.Module, output_dir: str | Path) -> None:
    """Raise ConfigError (naming output_dir) when the disk cannot hold one more checkpoint: a new checkpoint is
    written next to the previous one, which is deleted only after the new one is complete."""
    from beit3.config import ConfigError

    need = estimate_checkpoint_bytes(model)
    free = free_bytes(output_dir)
    if free < need:
        raise ConfigError(
            f"output_dir '{output_dir}': not enough free disk space for a checkpoint: about {need / 2**20:.1f} MiB "
            f"needed (parameters x {BYTES_PER_TRAINABLE_PARAM} bytes: fp32 weights + master copy + AdamW states), "
            f"{free / 2**20:.1f} MiB free"
        )
