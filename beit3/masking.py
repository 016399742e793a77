"""Masking for masked data modeling: BEiT v2 block-wise image masking, BERT-style 80/10/10 text masking, and
:class:`PretrainInputs`, which masks the data layer's step batches and attaches their targets.

All draw from an explicit random generator so that a masked batch is a pure function of (seed, rank, step): exact
resumption never depends on the global RNG state.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Literal, Optional

import numpy as np
import torch

from .data.transforms import device_views


@dataclass
class MaskingConfig:
    """How much of each stream is masked (BEiT-3 paper §2.2: 40% of patches, 15% of text, 50% of paired text);
    ``image_mask_style``: BEiT's ``block``-wise masks or MAE's uniformly ``random`` patches (MAE masks 75%)."""

    image_mask_ratio: float = 0.4
    image_mask_style: Literal["block", "random"] = "block"
    min_block_patches: int = 16
    max_block_aspect: float = 1 / 0.3
    text_mask_ratio: float = 0.15
    pair_text_mask_ratio: float = 0.5
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1

    def __post_init__(self) -> None:
        for name in ("image_mask_ratio", "text_mask_ratio", "pair_text_mask_ratio"):
            if not 0.0 < getattr(self, name) < 1.0:
                raise ValueError(f"masking config '{name}' must be in (0, 1), got {getattr(self, name)}")
        if self.mask_replace_prob + self.random_replace_prob > 1.0 or min(self.mask_replace_prob, self.random_replace_prob) < 0:
            raise ValueError("masking config 'mask_replace_prob' + 'random_replace_prob' must be within [0, 1]")
        if self.min_block_patches < 1 or self.max_block_aspect < 1:
            raise ValueError("masking config 'min_block_patches' and 'max_block_aspect' must be >= 1")
        if self.image_mask_style not in ("block", "random"):
            raise ValueError(f"masking config 'image_mask_style' must be 'block' or 'random', got '{self.image_mask_style}'")


class BlockMaskGenerator:
    """BEiT v2 block-wise masking on a ``height x width`` patch grid with an *exact* number of masked patches.

    Rectangular blocks of at least ``min_block`` patches and log-uniform aspect ratio are added until the target is
    reached; a final fix-up masks or unmasks random cells so every mask has exactly ``num_masked`` patches.
    """

    def __init__(self, height: int, width: int, mask_ratio: float, min_block: int = 16, max_aspect: float = 1 / 0.3):
        self.height, self.width = height, width
        self.num_masked = int(round(mask_ratio * height * width))
        self.min_block = min(min_block, self.num_masked)
        self.log_aspect = (math.log(1 / max_aspect), math.log(max_aspect))

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        for _ in range(10):
            area = rng.uniform(*sorted((self.min_block, budget)))  # as random.uniform when budget < min_block
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < self.height and 0 < w < self.width:
                top = int(rng.integers(0, self.height - h + 1))
                left = int(rng.integers(0, self.width - w + 1))
                window = mask[top : top + h, left : left + w]
                added = h * w - int(window.sum())
                if 0 < added <= budget:
                    window[:] = True
                    return added
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        """One mask, a bool array (height*width,) in row-major patch order."""
        mask = np.zeros((self.height, self.width), dtype=bool)
        count = 0
        while count < self.num_masked:
            added = self._add_block(mask, self.num_masked - count, rng)
            if added == 0:
                break
            count += added
        flat = mask.reshape(-1)
        if count < self.num_masked:
            flat[rng.choice(np.flatnonzero(~flat), self.num_masked - count, replace=False)] = True
        elif count > self.num_masked:
            flat[rng.choice(np.flatnonzero(flat), count - self.num_masked, replace=False)] = False
        return flat

    def batch(self, batch_size: int, rng: np.random.Generator) -> torch.Tensor:
        return torch.from_numpy(np.stack([self(rng) for _ in range(batch_size)])) if batch_size else torch.zeros(0, self.height * self.width, dtype=torch.bool)


class RandomMaskGenerator(BlockMaskGenerator):
    """MAE's masking: ``num_masked`` patches drawn uniformly without replacement (the same exact count as blocks)."""

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        flat = np.zeros(self.height * self.width, dtype=bool)
        flat[rng.choice(flat.size, self.num_masked, replace=False)] = True
        return flat


def image_mask_generator(patch_grid: tuple[int, int], masking: MaskingConfig) -> BlockMaskGenerator:
    """The image mask generator ``masking`` asks for, on a ``patch_grid`` of patches."""
    cls = RandomMaskGenerator if masking.image_mask_style == "random" else BlockMaskGenerator
    return cls(*patch_grid, masking.image_mask_ratio, masking.min_block_patches, masking.max_block_aspect)


def mask_text(
    tokens: torch.Tensor,
    maskable: torch.Tensor,
    ratio: float,
    mask_id: int,
    random_token_range: tuple[int, int],
    generator: torch.Generator,
    mask_replace_prob: float = 0.8,
    random_replace_prob: float = 0.1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT-style masking, vectorised over the batch.

    In each row, ``max(1, round(ratio * n))`` of its ``n`` maskable positions (not special tokens, not padding) are
    chosen uniformly; of those 80% become ``mask_id``, 10% a random id in ``random_token_range`` and 10% stay.
    Returns ``(masked_tokens, masked_positions)``.
    """
    n = maskable.sum(dim=1)
    k = torch.where(n > 0, torch.clamp((n.float() * ratio).round().long(), min=1), torch.zeros_like(n))
    scores = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    scores = scores.masked_fill(~maskable, 2.0)  # never chosen
    ranks = scores.argsort(dim=1).argsort(dim=1)
    chosen = ranks < k.unsqueeze(1)
    action = torch.rand(tokens.shape, generator=generator, device=tokens.device)
    randoms = torch.randint(*random_token_range, tokens.shape, generator=generator, device=tokens.device)
    out = torch.where(chosen & (action < mask_replace_prob), torch.full_like(tokens, mask_id), tokens)
    use_random = chosen & (action >= mask_replace_prob) & (action < mask_replace_prob + random_replace_prob)
    out = torch.where(use_random, randoms, out)
    return out, chosen


class PretrainInputs:
    """Masks the data layer's step batches and attaches targets; resumable like the batches it wraps.

    The loader's uint8 views are made into jittered float inputs on ``device`` first (``device_views``), so the
    copy, the colour jitter and the normalisation run there, not in the loader's workers. ``codes_fn`` maps
    tokenizer-view images in [0, 1] to visual-token ids [B, N]; a stream that already carries ``codes``
    (precomputed by ``tools/tokenize_dataset.py``) skips it; with ``pixel_targets`` (MAE) no codes are made. Masks are drawn from a generator seeded by
    (seed, rank, step), so a resumed run masks exactly as an uninterrupted one.
    """

    def __init__(
        self,
        batches: Iterable[dict],
        masking: MaskingConfig,
        patch_grid: tuple[int, int],
        mask_token_id: int,
        random_token_range: tuple[int, int],
        special_token_ids: Iterable[int],
        codes_fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
        seed: int = 0,
        rank: int = 0,
        device: torch.device | str = "cpu",
        pixel_targets: bool = False,
    ):
        self.batches = batches
        self.device = torch.device(device)
        self.masking = masking
        self.block_masks = image_mask_generator(patch_grid, masking)
        self.pixel_targets = pixel_targets
        self.mask_token_id = mask_token_id
        self.random_token_range = random_token_range
        self.special_token_ids = torch.tensor(sorted(set(special_token_ids)))
        self.codes_fn = codes_fn
        self.seed, self.rank = seed, rank
        self.step = 0

    def state_dict(self) -> dict:
        return {"data": self.batches.state_dict(), "step": self.step}

    def skip_counts(self) -> dict[str, int]:
        """The data layer's skipped samples by reason (logged by the engine as ``data_skips``)."""
        return self.batches.skip_counts() if hasattr(self.batches, "skip_counts") else {}

    def load_state_dict(self, state: dict) -> None:
        self.batches.load_state_dict(state["data"])
        self.step = int(state["step"])

    def load_resharded_state_dict(self, states: list[dict]) -> None:
        """Continue a run saved on ``len(states)`` ranks (see ``PretrainBatches.load_resharded_state_dict``); the
        mask seeds carry on from the saved step (they are per rank and step, so none repeats)."""
        self.batches.load_resharded_state_dict([s["data"] for s in states])
        self.step = int(states[0]["step"])

    def __iter__(self) -> Iterator[dict]:
        # the data layer's iterator is made now, not at the first batch (see PretrainBatches.__iter__): the ITM
        # negatives draw from the global RNG, so a resumed run must not draw the loader's seed after restoring it
        batches = iter(self.batches)
        return (self.prepare(batch) for batch in batches)

    def prepare(self, batch: dict) -> dict:
        """Mask one step batch; advances the step counter that seeds the masks."""
        rng = np.random.default_rng([self.seed, self.rank, self.step])
        text_gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
        self.step += 1
        out = {}
        for stream, b in batch.items():
            b = device_views(b, self.device)
            if "image" in b:
                b["image_mask"] = self.block_masks.batch(b["image"].shape[0], rng)
                if self.pixel_targets:  # the targets are the image's own pixels (MAE): no codes
                    b.pop("codes", None)
                else:
                    self._attach_codes(stream, b)
                b.pop("tokenizer_image", None)
            out[stream] = self._mask_text(stream, b, text_gen)
        return out

    def _attach_codes(self, stream: str, b: dict) -> None:
        if "codes" not in b:
            if self.codes_fn is None:
                raise ValueError(f"the '{stream}' stream has no precomputed codes and no tokenizer was given")
            b["codes"] = self.codes_fn(b["tokenizer_image"])
        b["codes"] = b["codes"].long()
        if b["codes"].shape != b["image_mask"].shape:
            raise ValueError(
                f"visual codes of the '{stream}' stream have shape {tuple(b['codes'].shape)} but the model's patch "
                f"grid gives {tuple(b['image_mask'].shape)}: tokenizer and model must use the same patch grid"
            )

    def _mask_text(self, stream: str, b: dict, text_gen: torch.Generator) -> dict:
        if "text_tokens" in b:
            tokens = b["text_tokens"]
            maskable = ~b["padding_mask"].bool() & ~torch.isin(tokens, self.special_token_ids)
            ratio = self.masking.pair_text_mask_ratio if stream == "pair" else self.masking.text_mask_ratio
            b["text_targets"] = tokens
            b["text_tokens"], b["text_mask"] = mask_text(
                tokens, maskable, ratio, self.mask_token_id, self.random_token_range, text_gen,
                self.masking.mask_replace_prob, self.masking.random_replace_prob,
            )
        return b
