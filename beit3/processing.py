"""From PIL images and raw strings to model inputs, as the fine-tuning evaluation feeds them: the eval image transform
(RGB, bicubic resize to the model's size, mean = std = 0.5 per channel) and the text tokenizer (``<s>`` + ids +
``</s>``, padded with ``<pad>``, ``padding_mask`` True at pads)."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch
from PIL import Image

from .data.transforms import build_finetune_transform
from .text import TextTokenizer

ImageInput = Union[Image.Image, str, Path]


class BEiT3Processor:
    """Images and texts to the keyword arguments of the task models (``image``, ``text_description``,
    ``padding_mask``); ``images()`` / ``texts()`` give each part alone. Image paths are opened and converted to RGB."""

    def __init__(self, tokenizer: Optional[TextTokenizer], image_size: int, max_text_len: int = 64,
                 image_transform: Optional[Callable] = None):
        if max_text_len < 3:
            raise ValueError(f"max_text_len must be at least 3 (bos, one token, eos), got {max_text_len}")
        self.tokenizer = tokenizer
        self.image_size = image_size
        self.max_text_len = max_text_len
        self.image_transform = image_transform or build_finetune_transform(image_size, train=False)

    def images(self, images: Union[ImageInput, Sequence[ImageInput]]) -> torch.Tensor:
        """(B, 3, S, S) float tensor."""
        if isinstance(images, (Image.Image, str, Path)):
            images = [images]
        if not len(images):
            raise ValueError("no images given")
        return torch.stack([self.image_transform(_rgb(image)) for image in images])

    def texts(self, texts: Union[str, Sequence[str]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids (B, T), padding_mask (B, T))``, T the longest text (at most ``max_text_len``)."""
        if self.tokenizer is None:
            raise ValueError("this processor has no text tokenizer: pass tokenizer=beit3.get_tokenizer(PATH) "
                             "(the SentencePiece model the checkpoint was trained with)")
        if isinstance(texts, str):
            texts = [texts]
        if not len(texts) or not all(isinstance(t, str) for t in texts):
            raise ValueError("texts must be a string or a non-empty list of strings")
        return self.tokenizer.encode_padded(texts, self.max_text_len)

    def __call__(self, images=None, text=None) -> dict[str, torch.Tensor]:
        if images is None and text is None:
            raise ValueError("BEiT3Processor needs images, text or both")
        out = {}
        if images is not None:
            out["image"] = self.images(images)
        if text is not None:
            out["text_description"], out["padding_mask"] = self.texts(text)
        return out


def _rgb(image: ImageInput) -> Image.Image:
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    with Image.open(image) as opened:
        return opened.convert("RGB")
