"""Data plumbing shared by the fine-tuning tasks: index files, seeded sample loading, the resumable training batch
stream and the rank-sharded evaluation batches.

Training batches follow the pretraining design (:mod:`beit3.data.pretrain`): sample ``slot`` of step ``t`` on rank
``r`` sits at global position ``p = (t * world_size + r) * batch + slot``; its index is
``permutation(seed, epoch = p // N)[p % N]`` and all its randomness (augmentation, masking, mixup) is seeded from
(seed, rank, step). A DataLoader item is a whole step, so the stream's state is the next step number and a resumed run
sees exactly the batches of an uninterrupted one, with any ``num_workers``.
"""
from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from beit3.data.pretrain import StepsFrom, derive_seed, ignore_stop_signals
from beit3.data.readers import load_image
from beit3.data.schedule import RankSchedule
from beit3.jsonl import read_jsonl

# Collate: list of per-sample dicts -> batch dict (tensors stacked, ints/floats to tensors, other values as lists).
Collate = Callable[[list[dict]], dict]


def read_index(root: str | Path, files: str | Sequence[str]) -> list[dict]:
    """The items of one or more JSONL index files under ``root`` (concatenated in order)."""
    names = [files] if isinstance(files, str) else list(files)
    items: list[dict] = []
    for name in names:
        items.extend(read_jsonl(Path(root) / name))
    if not items:
        raise ValueError(f"index file(s) {names} under '{root}' hold no items")
    return items


def require_keys(items: Sequence[dict], keys: Sequence[str], where: str) -> None:
    """Raise ValueError naming the index and the key when the first item lacks one of ``keys``."""
    missing = [k for k in keys if k not in items[0]]
    if missing:
        raise ValueError(f"{where}: items lack the key '{missing[0]}' (found {sorted(items[0])})")


def open_image(root: str | Path, relative: str):
    """RGB image ``root/relative``; a missing or corrupt file raises an error naming it."""
    return load_image(Path(root) / relative)


def default_collate(samples: list[dict]) -> dict:
    """Stack tensors, turn ints/floats into tensors and keep anything else as a list, key by key."""
    batch = {}
    for key in samples[0]:
        values = [s[key] for s in samples]
        if isinstance(values[0], torch.Tensor):
            batch[key] = torch.stack(values)
        elif isinstance(values[0], (bool, int)):
            batch[key] = torch.tensor(values, dtype=torch.long)
        elif isinstance(values[0], float):
            batch[key] = torch.tensor(values, dtype=torch.float)
        else:
            batch[key] = values
    return batch


@contextlib.contextmanager
def seeded(seed: int):
    """Run a block with torch, numpy and ``random`` seeded from ``seed``; the previous global states come back after
    (torchvision and timm augmentations draw from the global generators)."""
    np_state, py_state = np.random.get_state(), random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


class SampleDataset(Dataset):
    """A task's per-sample view of an index: ``load(item, rng)`` turns one index item into a sample dict
    (``rng`` is a ``random.Random`` for the task's own draws, e.g. caption masking)."""

    def __init__(self, items: list[dict], load: Callable[[dict, random.Random], dict]):
        self.items, self.load = items, load

    def __len__(self) -> int:
        return len(self.items)

    def sample(self, index: int, rng: random.Random) -> dict:
        return self.load(self.items[index], rng)


class _TrainSteps(Dataset):
    """Map-style view whose item ``step`` is this rank's collated batch of that step."""

    def __init__(self, samples: SampleDataset, batch_size: int, seed: int, rank: int, world_size: int,
                 collate: Collate, batch_transform: Callable[[dict], dict] | None, micro_batches: int):
        self.samples, self.batch_size, self.seed = samples, batch_size, seed
        self.rank, self.micro_batches = rank, micro_batches
        self.schedule = RankSchedule(rank, world_size)
        self.collate, self.batch_transform = collate, batch_transform
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def __len__(self) -> int:
        return 2**62

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.samples))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(derive_seed(self.seed, epoch)).permutation(len(self.samples))
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def __getitem__(self, step: int) -> dict:
        rank_batch = self.schedule.batch_index(step)
        first = rank_batch * self.batch_size
        with seeded(derive_seed(self.seed, self.rank, step)):
            rng = random.Random(derive_seed(self.seed, self.rank, step, 1))
            batch = self.collate([self.samples.sample(self.index_at(first + k), rng) for k in range(self.batch_size)])
            if self.batch_transform is not None:
                batch = self.batch_transform(batch)
        # the optimizer step of this batch: each step reads world_size x micro_batches rank batches
        batch["step"] = torch.tensor(rank_batch // (self.schedule.world_size * self.micro_batches), dtype=torch.long)
        return batch


class TrainBatches:
    """Endless, exactly resumable stream of this rank's training batches (``state_dict`` = the next item and the
    schedule's origin; :mod:`beit3.data.schedule`).

    Each batch also carries ``step`` (the 0-based optimizer-step index of the batch, per micro batch) for
    step-dependent losses. ``steps_per_epoch`` = ``len(samples) // (batch_size * world_size)`` as the official code.
    """

    def __init__(self, samples: SampleDataset, batch_size: int, *, seed: int, rank: int = 0, world_size: int = 1,
                 collate: Collate = default_collate, batch_transform: Callable[[dict], dict] | None = None,
                 num_workers: int = 0, micro_batches: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.steps = _TrainSteps(samples, batch_size, seed, rank, world_size, collate, batch_transform, micro_batches)
        self.num_workers = num_workers
        self.steps_per_epoch = max(1, len(samples) // (batch_size * world_size * micro_batches))
        self.next_item = 0

    def state_dict(self) -> dict:
        return {"next_item": self.next_item, "schedule": self.steps.schedule.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.next_item = int(state["next_item"])
        self.steps.schedule = self.steps.schedule.with_state(state.get("schedule"))

    def load_resharded_state_dict(self, states: list[dict]) -> None:
        """Continue the global order of a run saved on ``len(states)`` ranks (their states, in rank order)."""
        self.steps.schedule = self.steps.schedule.continued([s.get("schedule") for s in states],
                                                            [int(s["next_item"]) for s in states])
        self.next_item = self.steps.schedule.first_step

    def __iter__(self) -> Iterator[dict]:
        extra = {"prefetch_factor": 2, "persistent_workers": False} if self.num_workers > 0 else {}
        loader = DataLoader(self.steps, batch_size=None, sampler=StepsFrom(self.next_item),
                            num_workers=self.num_workers, worker_init_fn=ignore_stop_signals, **extra)
        for batch in loader:
            self.next_item += 1
            yield batch


class _EvalShard(Dataset):
    def __init__(self, samples: SampleDataset, indices: list[int], valid: list[bool]):
        self.samples, self.indices, self.valid = samples, indices, valid

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, k: int) -> dict:
        sample = self.samples.sample(self.indices[k], random.Random(0))
        sample["valid"] = self.valid[k]
        return sample


def eval_batches(samples: SampleDataset, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 collate: Collate = default_collate, num_workers: int = 0) -> Iterator[dict]:
    """This rank's evaluation batches in index order: items ``rank, rank + world_size, ...``, padded (with the last
    item, ``valid`` = 0) so every rank runs the same number of equally sized batches (ZeRO-3 needs lockstep)."""
    per_rank = -(-len(samples) // world_size)
    positions = [i * world_size + rank for i in range(per_rank)]
    shard = _EvalShard(samples, [min(p, len(samples) - 1) for p in positions], [p < len(samples) for p in positions])
    extra = {"prefetch_factor": 2} if num_workers > 0 else {}
    return iter(DataLoader(shard, batch_size=batch_size, collate_fn=collate, num_workers=num_workers, **extra))
