"""Checkpoints: DeepSpeed tag directories + per-rank data/RNG state, atomic ``latest`` pointer, retention, export.

Layout under ``output_dir/checkpoints/``::

    latest                      the tag of the newest complete checkpoint (DeepSpeed's format: one line)
    step00000300/               engine.save_checkpoint(...) files (model/optimizer/scheduler, ZeRO partitions)
        rank0_state.pt          data-iterator state_dict + RNG states of rank 0 (torch.load(weights_only=True))
        rank1_state.pt          ...
    zero_to_fp32.py             copied there by DeepSpeed
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
    tags = [(step_of_tag(p.name), p.name) for p in ckpt_dir.iterdir() if p.is_dir()]
    return sorted((s, t) for s, t in tags if s is not None)


def save_checkpoint(engine, ckpt_dir: str | Path, step: int, client_state: dict, data_state, keep_last: int) -> Path:
    """Save on ALL ranks; returns the tag directory.

    Order: every rank writes its part into the tag directory, barrier, rank 0 points ``latest`` at it (temp file +
    os.replace), barrier, then rank 0 deletes the oldest tags beyond ``keep_last``. A crash at any point leaves
    ``latest`` on a complete checkpoint.
    """
    ckpt_dir = Path(ckpt_dir)
    rank = get_rank()
    tag = tag_for_step(step)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
    barrier()
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state, save_latest=False)
    tag_dir = ckpt_dir / tag
    tag_dir.mkdir(parents=True, exist_ok=True)
    rank_state = {"step": int(step), "rank": rank, "world_size": get_world_size(), "data": data_state,
                  "rng": capture_rng_state()}
    tmp = tag_dir / f".rank{rank}_state.pt.tmp"
    torch.save(rank_state, tmp)
    os.replace(tmp, tag_dir / f"rank{rank}_state.pt")
    barrier()
    if rank == 0:
        _write_latest(ckpt_dir, tag)
    barrier()
    if rank == 0:
        for old_step, old_tag in list_tags(ckpt_dir)[:-keep_last] if keep_last > 0 else []:
            if old_tag != tag:
                shutil.rmtree(ckpt_dir / old_tag, ignore_errors=True)
    return tag_dir


def remove_stale_tags(ckpt_dir: str | Path, latest_step: int) -> None:
    """Rank 0: delete tags newer than ``latest`` (left by a crash during a save)."""
    for step, tag in list_tags(ckpt_dir):
        if step > latest_step:
            shutil.rmtree(Path(ckpt_dir) / tag, ignore_errors=True)


def load_rank_state(tag_dir: str | Path, rank: int) -> dict:
    path = Path(tag_dir) / f"rank{rank}_state.pt"
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint '{tag_dir}' has no '{path.name}': it is incomplete or was saved with fewer ranks than the "
            f"current world size ({get_world_size()}); resume with the same number of ranks"
        )
    return torch.load(path, map_location="cpu", weights_only=True)


# -------------------------------------------------------------------------------------------------------------- export
def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints dir, tag) for an output dir, a checkpoints dir (with ``latest``) or a tag dir."""
    path = Path(path)
    if (path / "checkpoints" / "latest").is_file():
        path = path / "checkpoints"
    if (path / "latest").is_file():
        tag = read_latest(path)
        return path, tag
    if path.is_dir() and any(path.glob("*model_states.pt")):
        return path.parent, path.name
    raise FileNotFoundError(f"no checkpoint found at '{path}' (expected an output dir, a checkpoints dir with "
                            f"'latest', or a checkpoint tag dir)")


def export_consolidated_state_dict(path: str | Path, exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights (name -> tensor) of the latest checkpoint in ``path`` for ZeRO 0/1/2/3.

    ``path`` may be a training output dir, its ``checkpoints`` dir, or one tag dir. Runs in one process, without a
    process group (uses ``deepspeed.utils.zero_to_fp32``).
    """
    ckpt_dir, tag = resolve_checkpoint(path)
    tag_dir = ckpt_dir / tag
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag,
                                                         exclude_frozen_parameters=exclude_frozen_parameters)
        if not exclude_frozen_parameters:
            # DeepSpeed pitfall: ZeRO-1 (no gradient partitioning) does not record frozen parameters in
            # frozen_param_shapes, so zero_to_fp32 drops them; the saved module state dict has them in full.
            files = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))
            module = torch.load(files[0], map_location="cpu", weights_only=False).get("module") or {} if files else {}
            for name, tensor in module.items():
                if name not in state and isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
                    state[name] = tensor
    else:  # ZeRO stage 0: the module state dict is complete (fp32 unless bf16 weights were trained without ZeRO)
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"no model states in '{tag_dir}'")
        saved = torch.load(files[0], map_location="cpu", weights_only=False)
        state = dict(saved["module"])
        # bf16/fp16 without ZeRO: the module holds 16-bit weights; the fp32 masters are the optimizer's fp32_groups,
        # mapped to names with the per-group parameter names the engine stores in the client state.
        fp32_groups = (saved.get("optimizer") or {}).get("fp32_groups") if isinstance(saved.get("optimizer"),
                                                                                     dict) else None
        names = saved.get("param_group_names")
        if fp32_groups and names and [len(g) for g in fp32_groups] == [len(n) for n in names]:
            for group_names, tensors in zip(names, fp32_groups):
                state.update(zip(group_names, tensors))
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
            for k, v in state.items()}
