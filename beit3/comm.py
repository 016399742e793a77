"""The torch.distributed collectives every room uses (engine, tokenizer, evaluation): rank and world size, in-place
all-reduce, broadcast from rank 0 and barrier; each is a no-op in a single process. No launcher logic here (that is
:mod:`beit3.engine.dist`), so model code can import it."""
from __future__ import annotations

import torch
import torch.distributed as dist


def get_rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if get_world_size() > 1:
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ('sum', 'max', 'mean') over all ranks; returns ``tensor``."""
    if op not in ("sum", "max", "mean"):
        raise ValueError(f"all_reduce_ op must be 'sum', 'max' or 'mean', got '{op}'")
    if get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            tensor /= get_world_size()
    return tensor


def broadcast_from_rank0(tensor: torch.Tensor) -> torch.Tensor:
    """Overwrite ``tensor`` in place with rank 0's value; returns ``tensor``."""
    if get_world_size() > 1:
        dist.broadcast(tensor, src=0)
    return tensor


def broadcast_object_from_rank0(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank."""
    if get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
