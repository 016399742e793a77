"""OpenCLIP-style entry points: ``create_model_and_transforms`` and ``get_tokenizer``.

    model, train_transform, eval_transform = beit3.create_model_and_transforms("runs/demo/ft/retrieval/best")
    model.encode_image([Image.open("cat.jpg")]) @ model.encode_text(["a cat"]).T

A model comes back in eval mode with a :class:`~beit3.processing.BEiT3Processor` as ``model.processor`` when a text
tokenizer is known (``tokenizer=`` or ``beit3.spm`` in the checkpoint folder), so ``encode_text`` takes raw strings.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

from torch import nn

from .data.transforms import build_finetune_transform
from .errors import CheckpointError
from .hub import is_repo_id, resolve_pretrained
from .models import create_model, from_pretrained, list_models, load_checkpoint
from .models.checkpoint import CONFIG_FILE, TEXT_TOKENIZER_FILE
from .models.tasks.zero_shot import require_contrastive_heads
from .processing import BEiT3Processor
from .text import TextTokenizer

PathLike = Union[str, os.PathLike]


def get_tokenizer(path: PathLike) -> TextTokenizer:
    """The text tokenizer: a SentencePiece file (``beit3.spm``), a model folder holding ``beit3.spm``, or a hub id."""
    resolved = resolve_pretrained(path)
    if resolved.is_dir():
        resolved = resolved / TEXT_TOKENIZER_FILE
        if not resolved.is_file():
            raise FileNotFoundError(f"'{path}' holds no {TEXT_TOKENIZER_FILE}; pass the SentencePiece model itself")
    return TextTokenizer.from_file(resolved)


def _is_model_folder(name: PathLike) -> bool:
    return (Path(name).expanduser() / CONFIG_FILE).is_file() or is_repo_id(str(name))


def attach_processor(model: nn.Module, folder: Optional[Path] = None,
                     tokenizer: Optional[Union[PathLike, TextTokenizer]] = None, max_text_len: int = 64) -> Callable:
    """Set ``model.processor`` (eval transform of the model's size; text tokenizer ``tokenizer``, else ``beit3.spm``
    in ``folder``, else none) and return its eval transform. A tokenizer with ids past the model's vocabulary is a
    CheckpointError: it is not the one the model was trained with."""
    if tokenizer is None and folder is not None and (folder / TEXT_TOKENIZER_FILE).is_file():
        tokenizer = folder / TEXT_TOKENIZER_FILE
    if tokenizer is not None and not isinstance(tokenizer, TextTokenizer):
        tokenizer = get_tokenizer(tokenizer)
    if tokenizer is not None and tokenizer.mask_id >= model.config.vocab_size:
        raise CheckpointError(f"text tokenizer '{tokenizer.spm_path}' has ids up to {tokenizer.mask_id} (<mask>) but the "
                              f"model's vocabulary is {model.config.vocab_size}: not the tokenizer it was trained with")
    eval_transform = build_finetune_transform(model.config.img_size, train=False)
    model.processor = BEiT3Processor(tokenizer, model.config.img_size, max_text_len, eval_transform)
    return eval_transform


def create_model_and_transforms(
    model_name: PathLike,
    pretrained: Optional[PathLike] = None,
    tokenizer: Optional[Union[PathLike, TextTokenizer]] = None,
    max_text_len: int = 64,
    **overrides,
) -> tuple[nn.Module, Callable, Callable]:
    """``(model, train_transform, eval_transform)``.

    ``model_name``: a registered name (``beit3.list_models()``), or a folder / hub id written by ``save_pretrained``
    (then ``pretrained`` is not needed). ``pretrained``: a checkpoint loaded into the named model (official ``.pth``,
    ``beit3_pretrained.pth``, ``.safetensors`` or a model folder). A retrieval model must get trained contrastive heads
    from it (see :func:`~beit3.models.tasks.zero_shot.require_contrastive_heads`). ``overrides`` go to
    ``create_model`` (e.g. ``img_size=384``)."""
    folder = None
    if str(model_name) not in list_models() and _is_model_folder(model_name):
        if pretrained is not None:
            raise ValueError(f"'{model_name}' is a saved model already; pretrained= is for registered model names")
        folder = resolve_pretrained(model_name)
        model = from_pretrained(folder, **overrides)
    else:
        model = create_model(str(model_name), **overrides)
        if pretrained is not None:
            source = resolve_pretrained(pretrained)
            require_contrastive_heads(model, load_checkpoint(model, source), str(pretrained))
            folder = source if source.is_dir() else source.parent
    eval_transform = attach_processor(model, folder, tokenizer, max_text_len)
    return model.eval(), build_finetune_transform(model.config.img_size, train=True), eval_transform
