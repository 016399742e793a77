"""Stopping on a signal without losing work: on one of ``train.preempt_signals`` (SIGTERM, SIGUSR1 by default: what
schedulers send before they kill a job) or a first Ctrl-C (SIGINT), the handler only records the signal; the
training loop finishes the optimizer step in progress, the ranks agree on it (the signal may reach only one of
them), a checkpoint is written and :class:`~beit3.errors.Preempted` is raised on every rank. A second Ctrl-C raises
``KeyboardInterrupt`` at once: the last complete checkpoint stays as it is (a save it cuts short is never
published)."""
from __future__ import annotations

import signal
import sys
import threading

import torch

from beit3.comm import all_reduce_, get_world_size

INTERRUPT = signal.SIGINT


def signal_number(name: str) -> int:
    """``"SIGTERM"`` -> 15; ValueError naming the key for an unknown name or one that cannot be caught."""
    try:
        number = signal.Signals[name.upper()]
    except KeyError:
        raise ValueError(f"train.preempt_signals: '{name}' is not a signal name (e.g. SIGTERM, SIGUSR1)") from None
    if number in (signal.SIGKILL, signal.SIGSTOP):
        raise ValueError(f"train.preempt_signals: {name} cannot be caught")
    return int(number)


class StopSignals:
    """Records the first stop signal of this process between :meth:`install` and :meth:`restore` (main thread only,
    a no-op elsewhere). ``received`` is the signal number or 0."""

    def __init__(self, names: list[str], announce: bool):
        self.numbers = sorted({signal_number(n) for n in names} | {int(INTERRUPT)})
        self.announce = announce
        self.received = 0
        self._interrupts = 0
        self._previous: dict[int, object] = {}

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            for number in self.numbers:
                self._previous[number] = signal.signal(number, self._handle)

    def restore(self) -> None:
        """The handlers from before :meth:`install`."""
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame) -> None:
        if number == INTERRUPT:
            self._interrupts += 1
            if self._interrupts > 1:
                raise KeyboardInterrupt
        if self.received:
            return
        self.received = number
        if self.announce:
            again = "; Ctrl-C again stops at once" if number == INTERRUPT else ""
            print(f"[beit3.engine] {signal.Signals(number).name} received: finishing this step and saving a "
                  f"checkpoint{again}", file=sys.stderr, flush=True)


def agreed_stop(local_callback_stop: bool, signals: StopSignals, device) -> tuple[bool, int]:
    """``(a callback on some rank asked to stop, the largest signal number any rank received or 0)``: one small
    all-reduce when there are several ranks."""
    if get_world_size() == 1:
        return local_callback_stop, signals.received
    flags = torch.tensor([float(local_callback_stop), float(signals.received)], device=device)
    all_reduce_(flags, "max")
    return flags[0].item() > 0, int(flags[1].item())


def signal_name(number: int) -> str:
    return signal.Signals(number).name
