"""Exception types shared by the model, tokenizer and engine code (no heavy imports here)."""
from __future__ import annotations


class CheckpointError(ValueError):
    """A checkpoint that cannot be read, is incomplete or does not fit the model; the message names the file."""
