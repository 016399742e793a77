"""Which part of a stream's global order each rank reads, and how that continues on another number of ranks.

A stream is read in whole per-rank batches ("rank batches") in one global order: data step ``t`` of rank ``r`` in a
world of ``W`` ranks is rank batch ``first_batch + (t - first_step) * W + r``. A run starts with
``first_step = first_batch = 0``. Resumed on ``W'`` ranks after data step ``T``, it continues with
``first_step = T`` and ``first_batch`` = the rank batches all ``W`` ranks read before ``T``: no sample is repeated
or skipped, and the per-rank batch (with ``train.micro_batches`` keeping the global batch) stays as it was.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RankSchedule:
    """The rank batches of one rank (see the module docstring)."""

    rank: int
    world_size: int
    first_step: int = 0
    first_batch: int = 0

    def batch_index(self, step: int) -> int:
        return self.first_batch + (step - self.first_step) * self.world_size + self.rank

    def state_dict(self) -> dict:
        return {"first_step": self.first_step, "first_batch": self.first_batch}

    def with_state(self, state: dict | None) -> "RankSchedule":
        """This rank's schedule with a saved origin (states saved before schedules existed have none: 0, 0)."""
        state = state or {}
        return RankSchedule(self.rank, self.world_size, int(state.get("first_step", 0)),
                            int(state.get("first_batch", 0)))

    def continued(self, saved: list[dict | None], next_steps: list[int]) -> "RankSchedule":
        """This rank's schedule after a run saved on ``len(saved)`` ranks (their schedule states, in rank order),
        each at data step ``next_steps[r]``; raises ValueError when the saved ranks were not in step."""
        if len(set(next_steps)) != 1:
            raise ValueError(f"the saved ranks are at different data steps {next_steps}; cannot continue them "
                             "on another number of ranks")
        old = RankSchedule(0, len(saved)).with_state(saved[0])
        step = next_steps[0]
        return RankSchedule(self.rank, self.world_size, step, old.batch_index(step))
