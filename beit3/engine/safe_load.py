"""Safe deserialisation of DeepSpeed checkpoint files: ``torch.load(weights_only=True)`` plus a short allow-list.

DeepSpeed 0.19's ``TorchCheckpointEngine.load`` (used by ``engine.load_checkpoint`` for model, optimizer and ZeRO
partition files) and ``deepspeed.utils.zero_to_fp32`` call ``torch.load(..., weights_only=False)``: a crafted file
in a checkpoint directory could run arbitrary code on resume or export. The files DeepSpeed writes for our engine
(ZeRO 0/1/2/3, fp32/bf16) hold tensors, plain containers, strings/numbers and exactly these non-tensor classes:

- ``deepspeed.runtime.fp16.loss_scaler.LossScaler`` / ``DynamicLossScaler`` (ZeRO-1/2 optimizer state),
- ``deepspeed.runtime.zero.config.ZeroStageEnum`` (ZeRO-3 optimizer state),
- ``deepspeed.utils.tensor_fragment.fragment_address`` (ZeRO-1/2 ``param_slice_mappings``),

all plain data holders (their construction runs no user code). :func:`safe_torch_load` allows only those, so a pickle
that references any other global (``os.system``, ``builtins.eval``, ...) is refused with :class:`CheckpointError`.
:func:`install_safe_loader` routes an engine's checkpoint loads through it; :func:`safe_torch_load_everywhere` does
the same for every ``torch.load`` of the process while ``zero_to_fp32`` exports, or DeepSpeed converts and loads a
universal checkpoint (resume on another number of ranks).
"""
from __future__ import annotations

import contextlib
import pickle
import re
import types

import torch

from beit3.errors import CheckpointError

_torch_load = torch.load  # the real one, also while safe_torch_load_everywhere() is active


def deepspeed_safe_globals() -> list:
    """The non-tensor classes DeepSpeed stores in its checkpoint files (see the module docstring)."""
    found = []
    for module, name in (("deepspeed.runtime.fp16.loss_scaler", "LossScaler"),
                         ("deepspeed.runtime.fp16.loss_scaler", "DynamicLossScaler"),
                         ("deepspeed.runtime.zero.config", "ZeroStageEnum"),
                         ("deepspeed.utils.tensor_fragment", "fragment_address")):
        try:
            found.append(getattr(__import__(module, fromlist=[name]), name))
        except (ImportError, AttributeError):  # another DeepSpeed version: fewer types, the load then names the gap
            pass
    return found


def safe_torch_load(path, map_location=None, **kwargs):
    """``torch.load(path, weights_only=True)`` with DeepSpeed's data classes allowed; any other pickled global
    (code) raises :class:`CheckpointError` naming the file and the global."""
    kwargs.pop("weights_only", None)
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return _torch_load(path, map_location=map_location, weights_only=True, **kwargs)
    except pickle.UnpicklingError as err:
        found = re.search(r"(?:Unsupported global|unsupported GLOBAL|GLOBAL) (\S+)", str(err))
        what = found.group(1) if found else str(err).strip().splitlines()[0][:200]
        raise CheckpointError(
            f"checkpoint file '{path}' holds a pickled object that is not plain data ({what}) and is refused: "
            "checkpoints are only read with torch.load(weights_only=True), so no code in a file can run"
        ) from err
    except Exception as err:  # torch's unpickler raises many types on corrupt data (EOFError, IndexError, ...)
        raise CheckpointError(f"checkpoint file '{path}' is unreadable (truncated or not a torch file?): "
                              f"{type(err).__name__}: {err}") from err


def install_safe_loader(engine) -> bool:
    """Make ``engine.load_checkpoint`` read every file through :func:`safe_torch_load`.

    DeepSpeed loads model, optimizer and ZeRO files through ``engine.checkpoint_engine.load(path, map_location)``;
    for the default ``TorchCheckpointEngine`` that method is replaced on the instance. Returns False (and leaves the
    engine alone) for other checkpoint engines (Nebula, decoupled, fast writers), which are not used by our configs.
    """
    ckpt_engine = getattr(engine, "checkpoint_engine", None)
    try:
        from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    except ImportError:
        return False
    if type(ckpt_engine) is not TorchCheckpointEngine:
        return False

    def load(self, path: str, map_location=None):
        return safe_torch_load(path, map_location=map_location)

    ckpt_engine.load = types.MethodType(load, ckpt_engine)
    return True


@contextlib.contextmanager
def safe_torch_load_everywhere():
    """While active, ``torch.load`` itself is :func:`safe_torch_load` (``zero_to_fp32`` and DeepSpeed's
    universal-checkpoint converter and loader call ``torch.load(weights_only=False)`` from several modules). For one
    thread of a process while nothing else loads: an export, or a training process at resume."""
    original = torch.load
    torch.load = safe_torch_load
    try:
        yield
    finally:
        torch.load = original
