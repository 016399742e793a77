"""Saving and loading VQ-KD tokenizers: our ``config.json`` + ``model.safetensors`` directories and the official
BEiT v2 ``.pth`` files (``vqkd_encoder_base_decoder_*.pth``).

An official file carries no config, so the architecture is inferred from tensor shapes (``infer_vqkd_config``):
width, depth, patch and image size, MLP ratio, codebook size and dimension, decoder depth and target dimension.
Heads are not recorded in the weights; they follow the official rule ``width // 64`` (1 head below width 64).
Official training checkpoints also carry ``teacher_model.*``, ``scaling_layer.*`` (and possibly ``loss*``) entries;
those are dropped before the strict load, as the official ``as_tokenzer`` path does.

Every loaded tokenizer is returned in eval mode with ``quantize.embedding.initted = 1``, so k-means never overwrites
a loaded codebook. Pickles are read with ``torch.load(weights_only=True)`` only.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path

import torch
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed

from beit3.config import from_dict
from beit3.errors import CheckpointLayoutError, ConfigError
from tokenizer.vqkd import CONFIG_FILE, VQKD, WEIGHTS_FILE, VQKDConfig

DROPPED_PREFIXES = ("teacher", "scaling", "loss")
REQUIRED_KEYS = (
    "encoder.cls_token", "encoder.pos_embed", "encoder.patch_embed.proj.weight", "encoder.blocks.0.mlp.fc1.weight",
    "decoder.blocks.0.attn.qkv.weight", "quantize.embedding.weight", "decode_task_layer.2.weight",
)


def save_tokenizer(model: VQKD, directory: str | Path) -> Path:
    """Write ``model`` as ``config.json`` + ``model.safetensors`` into ``directory``."""
    return model.save_pretrained(directory)


def _count_blocks(state: dict[str, torch.Tensor], prefix: str) -> int:
    pattern = re.compile(rf"^{re.escape(prefix)}\.blocks\.(\d+)\.")
    return len({int(m.group(1)) for key in state if (m := pattern.match(key))})


def infer_vqkd_config(state: dict[str, torch.Tensor], source: str = "state dict") -> VQKDConfig:
    """Recover the architecture of an official-layout VQ-KD state dict from its tensor shapes."""
    missing = [k for k in REQUIRED_KEYS if k not in state]
    if missing:
        raise CheckpointLayoutError(
            f"{source} is not a VQ-KD tokenizer in the official BEiT v2 layout: missing {', '.join(missing)}"
            f" (found keys such as {', '.join(sorted(state)[:5])})"
        )
    width = state["encoder.cls_token"].shape[-1]
    patch_size = state["encoder.patch_embed.proj.weight"].shape[-1]
    grid = math.isqrt(state["encoder.pos_embed"].shape[1] - 1)
    if grid * grid != state["encoder.pos_embed"].shape[1] - 1:
        raise CheckpointLayoutError(f"{source}: encoder.pos_embed {tuple(state['encoder.pos_embed'].shape)} "
                                    "does not hold a CLS token plus a square patch grid")
    codebook_size, code_dim = state["quantize.embedding.weight"].shape
    return VQKDConfig(
        img_size=grid * patch_size, patch_size=patch_size, width=width, depth=_count_blocks(state, "encoder"),
        mlp_ratio=state["encoder.blocks.0.mlp.fc1.weight"].shape[0] / width,
        decoder_depth=_count_blocks(state, "decoder"), codebook_size=codebook_size, code_dim=code_dim,
        target_dim=state["decode_task_layer.2.weight"].shape[0],
    )


def _load_strict(model: VQKD, state: dict[str, torch.Tensor], source: str) -> VQKD:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        raise CheckpointLayoutError(
            f"{source} does not match the VQ-KD architecture {model.config}: missing {missing[:8]}, "
            f"unexpected {unexpected[:8]}, shape mismatches {shapes[:8]}"
        )
    model.load_state_dict(state, strict=True)
    model.quantize.embedding.initted.fill_(1.0)
    return model.eval()


def _read_pickle(path: Path) -> dict:
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):  # official training checkpoints store args
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # report any unpickling failure with the file name
        raise CheckpointLayoutError(f"cannot read '{path}' with torch.load(weights_only=True): {err}") from err


def load_official_vqkd(path: str | Path) -> VQKD:
    """Load an official BEiT v2 VQ-KD ``.pth`` file (``model`` or ``state_dict`` entry) with an inferred config."""
    path = Path(path)
    ckpt = _read_pickle(path)
    state = ckpt.get("model", ckpt.get("state_dict", ckpt)) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointLayoutError(f"'{path}' holds no state dict of tensors under 'model' or 'state_dict'")
    state = {k: v for k, v in state.items() if not k.startswith(DROPPED_PREFIXES)}
    source = f"checkpoint '{path}'"
    return _load_strict(VQKD(infer_vqkd_config(state, source)), state, source)


def load_pretrained_dir(directory: str | Path) -> VQKD:
    """Load a ``config.json`` + ``model.safetensors`` directory written by ``save_tokenizer``."""
    directory = Path(directory)
    try:
        config = json.loads((directory / CONFIG_FILE).read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as err:
        raise CheckpointLayoutError(f"'{directory / CONFIG_FILE}' is not a readable JSON config: {err}") from err
    if not isinstance(config, dict) or config.pop("model_type", None) != "vqkd":
        raise CheckpointLayoutError(f"'{directory / CONFIG_FILE}' is not a VQ-KD config (model_type != 'vqkd')")
    try:
        cfg = from_dict(VQKDConfig, config, prefix="vqkd")
    except ConfigError as err:
        raise CheckpointLayoutError(f"'{directory / CONFIG_FILE}': {err}") from err
    try:
        state = load_file(str(directory / WEIGHTS_FILE))
    except Exception as err:  # safetensors raises its own error types
        raise CheckpointLayoutError(f"'{directory / WEIGHTS_FILE}' is not a readable safetensors file: {err}") from err
    return _load_strict(VQKD(cfg), state, f"'{directory / WEIGHTS_FILE}'")


def _find_pretrained_dir(root: Path) -> Path:
    found = sorted(p.parent for p in root.rglob(CONFIG_FILE) if (p.parent / WEIGHTS_FILE).is_file())
    if len(found) == 1:
        return found[0]
    if not found:
        raise CheckpointLayoutError(f"no tokenizer in '{root}': expected {CONFIG_FILE} + {WEIGHTS_FILE} "
                                    "in it or in one of its sub-directories")
    raise CheckpointLayoutError(f"'{root}' holds several tokenizers, pass one of: {', '.join(map(str, found))}")


def resize_tokenizer(model: VQKD, img_size: int) -> VQKD:
    """The same tokenizer for ``img_size`` px images: the encoder's and the decoder's position tables are resampled
    bicubically to the new patch grid (as BEiT v2 does for other square sizes); the codebook is kept as it is.

    E.g. the official patch-16 tokenizer at 256 px gives the 16x16 grid of a patch-14 BEiT-3 giant at 224 px.
    """
    if img_size == model.config.img_size:
        return model
    try:
        config = dataclasses.replace(model.config, img_size=img_size)
    except ValueError as err:
        raise CheckpointLayoutError(f"cannot resize the tokenizer to {img_size} px: {err}") from err
    resized = VQKD(config)
    state = model.state_dict()
    grid = config.grid_size
    for key in ("encoder.pos_embed", "decoder.pos_embed"):
        state[key] = resample_abs_pos_embed(state[key], new_size=[grid, grid], num_prefix_tokens=1)
    resized.load_state_dict(state, strict=True)
    return resized.train(model.training)


def load_tokenizer(path: str | Path, device: str | torch.device = "cpu", img_size: int | None = None) -> VQKD:
    """Load a tokenizer in eval mode from our directory layout (possibly nested in a training-run directory), a
    ``model.safetensors`` file next to its ``config.json``, or an official BEiT v2 ``.pth`` file; ``img_size``
    resizes it (:func:`resize_tokenizer`)."""
    path = Path(path)
    if path.is_dir():
        model = load_pretrained_dir(_find_pretrained_dir(path))
    elif path.suffix == ".safetensors" and (path.parent / CONFIG_FILE).is_file():
        model = load_pretrained_dir(path.parent)
    elif path.is_file():
        model = load_official_vqkd(path)
    else:
        raise CheckpointLayoutError(f"tokenizer checkpoint '{path}' does not exist")
    if img_size is not None:
        model = resize_tokenizer(model, img_size)
    return model.to(device)
