"""Run a loss on two gloo ranks (one process each) for the tests that compare a gathered loss with one process."""
import socket
from typing import Callable

import torch
from torch import nn


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
