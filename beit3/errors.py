"""Every exception type of the package, in one place (no heavy imports here): configuration, checkpoints, data
and the reasons a training run stops on purpose."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem; the message names the offending file, key or value."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is incomplete or does not fit the model; the message names the file."""


class CheckpointLayoutError(CheckpointError):
    """A checkpoint that is not a VQ-KD tokenizer in a layout we know."""


class TeacherWeightsError(ValueError):
    """A teacher weight file that cannot be read or does not match the named model."""


class SkipLimitError(RuntimeError):
    """The fraction of skipped samples passed ``data.max_skip_fraction``; the message has the counts by reason."""


class TrainingStopped(RuntimeError):
    """Training stopped on purpose before ``train.steps``; the message says why and names the last good checkpoint.
    Raised on every rank at the same step (the decision is all-reduced), so no rank is left waiting."""


class NonFiniteLossError(TrainingStopped):
    """Raised after ``max_nonfinite_steps`` consecutive optimizer steps with a non-finite loss or gradient."""


class DataFaultError(TrainingStopped):
    """The data layer failed on some rank (e.g. its skip rate passed ``data.max_skip_fraction``)."""


class Preempted(RuntimeError):
    """Training stopped on a signal (``train.preempt_signals``, or a first Ctrl-C) after every rank finished its
    step and a checkpoint was written; the message names it, and the same command resumes from it."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.signal_name = signal_name
