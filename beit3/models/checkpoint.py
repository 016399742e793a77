"""Checkpoint I/O: official BEiT-3 ``.pth`` files, position interpolation, and ``save_pretrained`` /
``from_pretrained`` directories (``config.json`` + ``model.safetensors``).

Only tensors are ever deserialised: torch files go through ``torch.load(weights_only=True)`` and a pickle that
carries code is refused with a clear message.
"""
from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import ConfigError, from_dict, to_dict
from ..hub import resolve_pretrained
from .backbone import BEiT3, BEiT3Config
from .input_embeddings import POSITION_OFFSET
from .registry import model_class

logger = logging.getLogger("beit3")

BACKBONE_PREFIX = "beit3."
BACKBONE_ROOTS = ("text_embed.", "vision_embed.", "encoder.")
VISION_POSITIONS = "encoder.embed_positions.A.weight"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
MODEL_CARD_FILE = "README.md"
TEXT_TOKENIZER_FILE = "beit3.spm"
HF_MODEL_TYPE = "beit3"  # config.json's model_type: transformers' AutoConfig finds beit3.hf.BEiT3HFConfig by it

PathLike = Union[str, os.PathLike]


from ..errors import CheckpointError  # noqa: E402  (re-exported: beit3.models.checkpoint.CheckpointError)


def read_state_dict(path: PathLike) -> dict[str, torch.Tensor]:
    """Read the tensors of a checkpoint: an official ``.pth`` (under ``model``/``module``/``state_dict`` or at the
    top level), a ``.safetensors`` file, or a ``save_pretrained`` directory."""
    path = Path(path).expanduser()
    if path.is_dir():
        if not (path / WEIGHTS_FILE).is_file():
            raise CheckpointError(f"'{path}' is a directory without {WEIGHTS_FILE}; not a saved model")
        path = path / WEIGHTS_FILE
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    if path.suffix == ".safetensors":
        try:
            return load_file(str(path))
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"'{path}' is not a readable safetensors file: {err}") from err
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if found:
            raise CheckpointError(
                f"'{path}' holds a pickled object other than tensors ({found.group(1)}) and is refused: only "
                "weights_only checkpoints are loaded, so no code in a file can run. Re-save its state dict with "
                "torch.save(state_dict) or safetensors"
            ) from err
        raise CheckpointError(f"'{path}' is not a PyTorch checkpoint (unreadable pickle data)") from err
    except Exception as err:
        raise CheckpointError(f"'{path}' is not a PyTorch checkpoint: {err}") from err
    state = obj
    if isinstance(obj, Mapping):
        for key in ("model", "module", "state_dict"):
            if isinstance(obj.get(key), Mapping):
                state = obj[key]
                break
    if not isinstance(state, Mapping) or not state:
        raise CheckpointError(f"'{path}' does not contain a state dict (found {type(state).__name__})")
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"'{path}': entry '{bad[0]}' is a {type(state[bad[0]]).__name__}, not a tensor")
    return dict(state)


def interpolate_vision_positions(table: torch.Tensor, num_patches: int) -> torch.Tensor:
    """Resize the vision position table to ``num_patches`` exactly as the official loader does: keep the first 3 rows
    (2 unused + CLS) and bicubically resize (align_corners=False) the remaining rows as a square grid."""
    extra = POSITION_OFFSET + 1
    orig = math.isqrt(table.shape[0] - extra)
    new = math.isqrt(num_patches)
    if orig * orig != table.shape[0] - extra or new * new != num_patches:
        raise CheckpointError(
            f"cannot interpolate '{VISION_POSITIONS}' from {table.shape[0]} rows to {num_patches + extra}: "
            "the patch grids are not square"
        )
    if orig == new:
        return table
    grid = table[extra:].float().reshape(1, orig, orig, -1).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new * new, -1).to(table.dtype)
    return torch.cat([table[:extra], grid], dim=0)


@dataclass
class LoadReport:
    """What :func:`load_checkpoint` did, key by key."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    left_for_heads: list[str] = field(default_factory=list)
    dropped_mismatched: list[str] = field(default_factory=list)
    interpolated: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        parts = []
        for name in ("missing", "unexpected", "left_for_heads", "dropped_mismatched", "interpolated"):
            keys = getattr(self, name)
            if keys:
                shown = ", ".join(keys[:10]) + (f", ... ({len(keys)} in all)" if len(keys) > 10 else "")
                parts.append(f"{name}: {shown}")
        return "; ".join(parts) or "all keys matched"


def _backbone_of(model: nn.Module) -> tuple[BEiT3, str]:
    if isinstance(model, BEiT3):
        return model, ""
    if isinstance(getattr(model, "beit3", None), BEiT3):
        return model.beit3, BACKBONE_PREFIX
    raise TypeError(f"load_checkpoint expects a BEiT3 backbone or a model with a .beit3 backbone, got {type(model).__name__}")


def _canonical_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys as in the official files: strip a ``module.`` wrapper prefix, prefix bare backbone keys with ``beit3.``,
    drop ``relative_position_index`` buffers (the official loader ignores them too)."""
    out = {}
    for key, value in state.items():
        if key.startswith("module."):
            key = key[len("module.") :]
        if key.startswith(BACKBONE_ROOTS):
            key = BACKBONE_PREFIX + key
        if key.endswith("relative_position_index"):
            continue
        out[key] = value
    return out


def load_checkpoint(
    model: nn.Module, checkpoint: Union[PathLike, Mapping[str, torch.Tensor]], strict: bool = False
) -> LoadReport:
    """Load an official or own checkpoint into a backbone or a task model.

    Backbone keys (``beit3.*`` in the official files) always have to fit: a mis-shaped one is an error, except the
    vision position table, which is interpolated to the model's image size. Head keys (``mlm_head``, ``mim_head``,
    ``head``, ...) are loaded when the model has them; into a bare backbone they are left for heads. A head key whose
    shape differs (another number of classes) is dropped and reported, as the official loader does. ``strict=True``
    turns missing, unexpected and dropped keys into errors.
    """
    source = str(checkpoint) if not isinstance(checkpoint, Mapping) else "<state dict>"
    state = _canonical_keys(read_state_dict(checkpoint) if not isinstance(checkpoint, Mapping) else checkpoint)
    backbone, prefix = _backbone_of(model)
    target = model.state_dict()
    report = LoadReport()
    to_load: dict[str, torch.Tensor] = {}
    shape_errors = []
    for key, value in state.items():
        name = key[len(BACKBONE_PREFIX) :] if (not prefix and key.startswith(BACKBONE_PREFIX)) else key
        if name not in target:
            if not prefix and not key.startswith(BACKBONE_PREFIX):
                report.left_for_heads.append(key)
            else:
                report.unexpected.append(key)
            continue
        if name.endswith(VISION_POSITIONS) and value.shape != target[name].shape and value.shape[1:] == target[name].shape[1:]:
            value = interpolate_vision_positions(value, backbone.vision_embed.num_patches)
            report.interpolated.append(key)
        if value.shape != target[name].shape:
            if key.startswith(BACKBONE_PREFIX):
                shape_errors.append(f"'{key}' is {tuple(value.shape)} in the checkpoint, {tuple(target[name].shape)} in the model")
            else:
                report.dropped_mismatched.append(key)
            continue
        to_load[name] = value
    if shape_errors:
        raise CheckpointError(
            f"{source}: {len(shape_errors)} key(s) do not fit the model ({backbone.config.embed_dim}-wide, "
            f"{backbone.config.depth} layers, vocab {backbone.config.vocab_size}): " + "; ".join(shape_errors[:5])
        )
    if not to_load:
        raise CheckpointError(f"{source}: none of its {len(state)} keys belongs to this model; not a BEiT-3 checkpoint?")
    report.missing = sorted(set(target) - set(to_load))
    if strict and (report.missing or report.unexpected or report.dropped_mismatched):
        raise CheckpointError(f"{source}: strict load failed: {report}")
    model.load_state_dict(to_load, strict=False)
    if report.missing or report.unexpected or report.dropped_mismatched:
        logger.warning("load_checkpoint(%s): %s", source, report)
    return report


def _readable_as_umask_allows(path: Path) -> None:
    """safetensors writes its files mode 0600; give them the mode a plain ``open`` would (0666 minus the umask)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def save_pretrained(model: nn.Module, directory: PathLike, text_tokenizer: PathLike | None = None) -> Path:
    """Write a push-ready folder: ``config.json`` (class, backbone config, init arguments; also read by
    ``transformers.AutoConfig``), ``model.safetensors``, a model card ``README.md`` (kept if one exists) and, with
    ``text_tokenizer``, that SentencePiece model as ``beit3.spm``."""
    directory = Path(directory).expanduser()
    directory.mkdir(parents=True, exist_ok=True)
    backbone, _ = _backbone_of(model)
    meta = {
        "model_type": HF_MODEL_TYPE,
        "architectures": [type(model).__name__],
        "model_class": type(model).__name__,
        "beit3_config": to_dict(backbone.config),
        "init_kwargs": dict(getattr(model, "init_kwargs", {})),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    tmp = directory / (WEIGHTS_FILE + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    _readable_as_umask_allows(tmp)
    os.replace(tmp, directory / WEIGHTS_FILE)
    (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    if text_tokenizer is not None:
        shutil.copyfile(Path(text_tokenizer).expanduser(), directory / TEXT_TOKENIZER_FILE)
    card = directory / MODEL_CARD_FILE
    if not card.exists():
        card.write_text(model_card(meta, has_tokenizer=(directory / TEXT_TOKENIZER_FILE).is_file()))
    return directory


def model_card(meta: Mapping, has_tokenizer: bool) -> str:
    """A Hugging Face model card (YAML front matter + usage) for a folder written by :func:`save_pretrained`."""
    cfg = meta["beit3_config"]
    size = f"{cfg['embed_dim']}-wide, {cfg['depth']} layers, {cfg['img_size']} px, patch {cfg['patch_size']}"
    tokenizer_line = ("The text tokenizer is `beit3.spm` in this folder." if has_tokenizer else
                      "No text tokenizer is stored here: pass the SentencePiece model used in training to "
                      "`beit3.get_tokenizer`.")
    return f"""---
library_name: beit3
tags: [beit3, multiway-transformer, vision-language]
license: mit
---
# {meta['model_class']} ({size})

A BEiT-3 model written by the `beit3` package. {tokenizer_line}

```python
import beit3  # registers the BEiT-3 classes with transformers' Auto classes
model = beit3.from_pretrained("path/or/org-name")             # the {meta['model_class']} itself
# or: transformers.AutoModel.from_pretrained("path/or/org-name")  # the backbone
```

Images: RGB, bicubic resize to {cfg['img_size']} x {cfg['img_size']}, normalised with mean = std = 0.5 per channel.
"""


def read_saved_config(directory: PathLike) -> dict:
    """The ``config.json`` of a :func:`save_pretrained` folder (a CheckpointError when it is missing or unreadable)."""
    path = Path(directory) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"'{directory}' has no {CONFIG_FILE}; not a folder written by save_pretrained") from None
    except json.JSONDecodeError as err:
        raise CheckpointError(f"'{path}' is not a beit3 model config: {err}") from err


def saved_backbone_config(meta: Mapping, **overrides) -> BEiT3Config:
    """The backbone :class:`BEiT3Config` of a ``config.json`` (``beit3_config``; ``config`` in folders written before
    0.2) with ``overrides``."""
    saved = meta["beit3_config"] if "beit3_config" in meta else meta["config"]
    return from_dict(BEiT3Config, {**saved, **overrides}, prefix="beit3_config")


def saved_model_class(directory: PathLike) -> str:
    """The model class name recorded in a :func:`save_pretrained` folder's ``config.json``."""
    meta = read_saved_config(directory)
    try:
        return meta["model_class"]
    except (KeyError, TypeError) as err:
        raise CheckpointError(f"'{Path(directory) / CONFIG_FILE}' is not a beit3 model config: {err}") from err


def from_pretrained(name_or_path: PathLike, **config_overrides) -> nn.Module:
    """Rebuild and load a model written by :func:`save_pretrained` (weights loaded strictly): a local folder or a
    Hugging Face Hub repository id (``"org/name"``, through the hub cache; ``HF_HUB_OFFLINE=1`` uses the cache only)."""
    directory = resolve_pretrained(name_or_path)
    meta = read_saved_config(directory)
    try:
        config = saved_backbone_config(meta, **config_overrides)
        cls = model_class(meta["model_class"])
    except (KeyError, ConfigError, ValueError) as err:
        raise CheckpointError(f"'{directory / CONFIG_FILE}' is not a valid model config: {err}") from err
    model = cls(config, **meta.get("init_kwargs", {}))
    load_checkpoint(model, read_state_dict(directory), strict=True)
    return model
