"""The fixed held-out set of the pretraining evaluation (:mod:`beit3.probing`): which val-split sources, which
samples, their whole-image views and visual codes, and masks drawn once from a seed; for pairs the "other" pair of
each sample (a different image) and the word-class probe masks."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from beit3.masking import MaskingConfig, image_mask_generator, mask_text
from beit3.text import TextTokenizer
from beit3.data.pretrain import derive_seed
from beit3.data.readers import SkipSample
from beit3.data.sources import open_image_source, open_pair_source, open_text_source
from beit3.data.transforms import BEIT3_MEAN, BEIT3_STD

EVAL_STREAMS = ("image", "text", "pair")
_STREAM_CODES = {name: code for code, name in enumerate(EVAL_STREAMS)}
OFF = "none"


@dataclass
class PretrainEvalConfig:
    """Held-out evaluation during pretraining (and of checkpoints, ``tools/probe_pretrained.py``).

    ``image_index`` / ``pair_index`` / ``text_source``: held-out sources under ``data.root``; empty = the val-split
    counterpart of the training source (``X.train.Y`` -> ``X.val.Y``, else ``X.val.Y`` for ``X.Y``) when that file
    exists, ``none`` = skip the stream. With no held-out source at all, evaluation is off (one notice).
    ``every_steps``: cadence in optimizer steps (0 = off; the last step is always evaluated when on).
    ``max_samples``: per stream, spread evenly over the source. ``probe_words``: word classes for the probe,
    e.g. ``{colour: [red, blue], shape: [circle, square]}``. ``seed`` fixes the masks."""

    every_steps: int = 1000
    image_index: str = ""
    pair_index: str = ""
    text_source: str = ""
    max_samples: int = 256
    batch_size: int = 32
    seed: int = 0
    probe_words: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.max_samples < 1 or self.batch_size < 1:
            raise ValueError("eval.every_steps must be >= 0, eval.max_samples and eval.batch_size >= 1")
        for name, words in self.probe_words.items():
            if not isinstance(words, (list, tuple)) or not words or not all(isinstance(w, str) and w for w in words):
                raise ValueError(f"eval.probe_words.{name} must be a non-empty list of words, got {words!r}")


def val_counterpart(spec: str) -> str:
    """The val-split file name of a training source: ``a.train.jsonl`` -> ``a.val.jsonl``, ``corpus.txt`` ->
    ``corpus.val.txt`` (empty for shard patterns, which have no single counterpart)."""
    if not spec or "{" in spec or spec.endswith(".tar"):
        return ""
    path = Path(spec)
    if ".train." in path.name:
        return str(path.with_name(path.name.replace(".train.", ".val.", 1)))
    if path.suffix:
        return str(path.with_name(f"{path.stem}.val{path.suffix}"))
    return ""


def resolve_eval_sources(cfg: PretrainEvalConfig, root: Path, image_source: str, pair_source: str,
                         text_sources: Sequence[str], streams: Iterable[str]) -> dict[str, str]:
    """``{stream: held-out source}`` for the streams that have one (explicit, or the existing val counterpart)."""
    explicit = {"image": cfg.image_index, "pair": cfg.pair_index, "text": cfg.text_source}
    trained = {"image": image_source, "pair": pair_source, "text": text_sources[0] if text_sources else ""}
    out = {}
    for stream in streams:
        spec = explicit[stream]
        if spec == OFF:
            continue
        if spec:
            if not (root / spec).exists():
                raise FileNotFoundError(f"eval.{_KEYS[stream]} '{root / spec}' does not exist")
            out[stream] = spec
        else:
            guess = val_counterpart(trained[stream])
            if guess and (root / guess).exists():
                out[stream] = guess
    return out


_KEYS = {"image": "image_index", "pair": "pair_index", "text": "text_source"}


@dataclass
class EvalSet:
    """Fixed held-out samples with fixed masks: per stream a dict of stacked tensors (``image``, ``codes``,
    ``image_mask``, ``text_tokens``, ``padding_mask``, ``text_targets``, ``text_mask``), for pairs the index of the
    "other" pair of each sample (another image) and, per probe word class, the probe text masks and the samples
    that contain such a word."""

    streams: dict[str, dict[str, torch.Tensor]]
    other: Optional[torch.Tensor] = None
    probes: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    sources: dict[str, str] = field(default_factory=dict)

    def num_samples(self) -> dict[str, int]:
        return {s: int(next(iter(t.values())).shape[0]) for s, t in self.streams.items()}


def spread_indices(total: int, count: int) -> list[int]:
    """``count`` indices spread evenly over ``range(total)`` (all of them when ``count >= total``)."""
    if count >= total:
        return list(range(total))
    return sorted({int(k * total / count) for k in range(count)})


def other_sample(keys: Sequence[str]) -> torch.Tensor:
    """For each sample the index of another sample with a *different* image key: a bijection (each sample is
    another's "other" exactly once). Samples are grouped by key, then shifted by half the set, which never lands in
    the same group when no key holds more than half of the samples."""
    n = len(keys)
    order = sorted(range(n), key=lambda i: (keys[i], i))
    largest = max(np.unique(np.asarray(keys), return_counts=True)[1]) if n else 0
    if n < 2 or largest > n // 2:
        raise ValueError(f"the held-out pairs need images of which none holds more than half of the {n} samples "
                         f"(largest group: {largest}); raise eval.max_samples or use another eval.pair_index")
    shift = n // 2
    other = torch.empty(n, dtype=torch.long)
    for pos, i in enumerate(order):
        other[i] = order[(pos + shift) % n]
    return other


def word_token_ids(tokenizer: TextTokenizer, words: Sequence[str]) -> list[list[int]]:
    """The token-id sequence of each word as it appears inside a sentence (SentencePiece's word-initial form)."""
    out = []
    for word in words:
        ids = tokenizer.encode(word)
        if not ids:
            raise ValueError(f"eval.probe_words: '{word}' encodes to no tokens")
        out.append(ids)
    return out


def probe_mask(tokens: torch.Tensor, word_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """Bool mask of the positions of ``tokens`` (B, L) that belong to an occurrence of one of the words (each word a
    token-id sequence, matched as a whole)."""
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    length = tokens.shape[1]
    for ids in word_ids:
        k = len(ids)
        if k > length:
            continue
        target = torch.tensor(ids, dtype=tokens.dtype)
        windows = tokens.unfold(1, k, 1)  # (B, L - k + 1, k)
        hits = (windows == target).all(dim=-1)
        for offset in range(k):
            mask[:, offset : offset + hits.shape[1]] |= hits
    return mask


class EvalImageViews:
    """The held-out views of an image: bicubic resize of the whole image to the model size (normalised) and to the
    tokenizer size (in [0, 1]); no crop, flip or jitter."""

    def __init__(self, image_size: int, tokenizer_image_size: int):
        self.image_size, self.tokenizer_image_size = image_size, tokenizer_image_size

    def __call__(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        model = TF.resize(image, [self.image_size] * 2, InterpolationMode.BICUBIC)
        tok = TF.resize(image, [self.tokenizer_image_size] * 2, InterpolationMode.BICUBIC)
        return TF.normalize(TF.to_tensor(model), BEIT3_MEAN, BEIT3_STD), TF.to_tensor(tok)


def _load_samples(source, indices: list[int], stream: str) -> list[dict]:
    samples = []
    for index in indices:
        try:
            sample = source.load(index)
        except SkipSample:
            continue  # an unusable held-out sample is left out (the same ones every time)
        sample["key"] = sample.get("image_path", str(index))
        samples.append(sample)
    if not samples:
        raise ValueError(f"held-out {stream} source '{source.location}' yields no usable sample")
    return samples


def build_eval_set(
    sources: dict[str, str],
    root: str | Path,
    tokenizer: TextTokenizer,
    *,
    image_size: int,
    tokenizer_image_size: int,
    patch_grid: tuple[int, int],
    masking: MaskingConfig,
    codes_fn: Optional[Callable[[torch.Tensor], torch.Tensor]],
    max_samples: int = 256,
    max_text_len: int = 64,
    seed: int = 0,
    probe_words: Optional[dict] = None,
) -> EvalSet:
    """Load the held-out samples, compute their visual codes once (``codes_fn``: tokenizer-view images -> codes) and
    draw their masks from (``seed``, stream, sample index). Without ``codes_fn`` pairs keep their images unmasked
    (text metrics only) and an image stream is an error."""
    root = Path(root)
    openers = {"image": lambda s: open_image_source(s, root, tokenizer),
               "text": lambda s: open_text_source([s], root, tokenizer),
               "pair": lambda s: open_pair_source(s, root, tokenizer)}
    views = EvalImageViews(image_size, tokenizer_image_size)
    blocks = image_mask_generator(patch_grid, masking)
    special = torch.tensor(sorted({tokenizer.bos_id, tokenizer.pad_id, tokenizer.eos_id}))
    out, other, probes = {}, None, {}
    for stream, spec in sources.items():
        source = openers[stream](spec)
        samples = _load_samples(source, spread_indices(len(source), max_samples), stream)
        batch: dict[str, torch.Tensor] = {}
        if "image" in samples[0]:
            model_views, tok_views = zip(*(views(s["image"]) for s in samples))
            batch["image"] = torch.stack(model_views)
        if "image" in samples[0] and (codes_fn is not None or stream == "image"):
            if codes_fn is None:
                raise ValueError(f"held-out {stream} stream '{spec}' needs a visual tokenizer for its codes")
            batch["codes"] = torch.cat([codes_fn(torch.stack(tok_views[i : i + 64])).long().cpu()
                                        for i in range(0, len(tok_views), 64)])
            if batch["codes"].shape[1] != patch_grid[0] * patch_grid[1]:
                raise ValueError(f"the visual tokenizer gives {batch['codes'].shape[1]} codes per image, the model "
                                 f"has {patch_grid[0] * patch_grid[1]} patches")
            batch["image_mask"] = torch.stack([
                torch.from_numpy(blocks(np.random.default_rng(derive_seed(seed, _STREAM_CODES[stream], i))))
                for i in range(len(samples))])
        if "text_ids" in samples[0]:
            tokens, padding = tokenizer.pad_ids([s["text_ids"] for s in samples], max_text_len)
            ratio = masking.pair_text_mask_ratio if stream == "pair" else masking.text_mask_ratio
            maskable = ~padding.bool() & ~torch.isin(tokens, special)
            text_mask = torch.zeros_like(tokens, dtype=torch.bool)
            for i in range(len(samples)):  # per sample: a sample's mask does not depend on the others
                gen = torch.Generator().manual_seed(derive_seed(seed, _STREAM_CODES[stream], i, 1))
                _, text_mask[i : i + 1] = mask_text(tokens[i : i + 1], maskable[i : i + 1], ratio, tokenizer.mask_id,
                                                    (0, 1), gen, mask_replace_prob=1.0, random_replace_prob=0.0)
            batch.update(text_tokens=tokens.masked_fill(text_mask, tokenizer.mask_id), padding_mask=padding,
                         text_mask=text_mask, text_targets=tokens)
            if stream == "pair":
                for name, words in (probe_words or {}).items():
                    mask = probe_mask(tokens, word_token_ids(tokenizer, words)) & maskable
                    probes[name] = {"text_tokens": tokens.masked_fill(mask, tokenizer.mask_id), "text_mask": mask,
                                    "samples": mask.any(dim=1).nonzero().flatten()}
        out[stream] = batch
        if stream == "pair":
            other = other_sample([s["key"] for s in samples])
    return EvalSet(out, other, probes, dict(sources))
