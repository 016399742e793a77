"""Caption decoding for :class:`~beit3.models.tasks.captioning.BEiT3ForCaptioning`: beam search as the official
evaluation runs it (beam 3, length penalty 0.6, 32 tokens, key/value cache), greedy decoding, and nucleus sampling
(BLIP's CapFilt captioner: top-p 0.9).

The text starts as [``<s>``, ``<mask>``]; the logits at the ``<mask>`` slot give the next word. With the cache each
step feeds only [last word, ``<mask>``] at text positions (cur_len, cur_len + 1), then drops the ``<mask>`` key/value
entry and reorders the cache by beam; without it every step re-encodes the image and the whole text (same result,
for verification). Token ids come from any object with ``bos_id``, ``pad_id``, ``eos_id`` and ``mask_id`` attributes
(e.g. ``beit3.text.TextTokenizer``) or from plain ints.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

# Candidates kept per beam at each step (official TOPN_PER_BEAM): enough to refill the beams after some end in EOS.
CANDIDATES_PER_BEAM = 3
# Score given to the unused beams at the first step, so that only one copy of [<s>] expands.
INACTIVE_BEAM_SCORE = -1e9


def _next_word_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax of the last position, in float32 at least (float64 stays float64)."""
    return F.log_softmax(logits[:, -1], dim=-1, dtype=torch.promote_types(logits.dtype, torch.float32))


@dataclass(frozen=True)
class SpecialTokenIds:
    """The token ids decoding needs: ``<s>`` (bos), ``<pad>``, ``</s>`` (eos) and ``<mask>``."""

    bos_id: int
    pad_id: int
    eos_id: int
    mask_id: int

    @classmethod
    def resolve(
        cls, tokenizer: Any = None, bos_id: int = 0, pad_id: int = 1, eos_id: int = 2, mask_id: Optional[int] = None
    ) -> "SpecialTokenIds":
        """Ids from ``tokenizer`` (any object with ``bos_id``/``pad_id``/``eos_id``/``mask_id``) or the ints given."""
        if tokenizer is not None:
            missing = [n for n in ("bos_id", "pad_id", "eos_id", "mask_id") if not hasattr(tokenizer, n)]
            if missing:
                raise TypeError(f"tokenizer {type(tokenizer).__name__} lacks the attribute(s) {', '.join(missing)}")
            return cls(int(tokenizer.bos_id), int(tokenizer.pad_id), int(tokenizer.eos_id), int(tokenizer.mask_id))
        if mask_id is None:
            raise ValueError("decoding needs the <mask> token id: pass mask_id=... or a tokenizer")
        return cls(int(bos_id), int(pad_id), int(eos_id), int(mask_id))


@dataclass
class Caption:
    """A decoded caption: token ids without ``<s>``/``</s>``, and its score (the beam-search score, i.e. the summed
    log-probability divided by length ** length_penalty; for greedy decoding the summed log-probability)."""

    token_ids: list[int]
    score: float


class _CachedSteps:
    """Next-word log-probabilities with the official key/value cache."""

    def __init__(self, model: nn.Module, images: torch.Tensor, ids: SpecialTokenIds):
        self.model, self.images, self.ids = model, images, ids
        self.cache: dict = {}

    def first(self) -> torch.Tensor:
        text = self.images.new_tensor([[self.ids.bos_id, self.ids.mask_id]], dtype=torch.long).expand(self.images.shape[0], 2)
        logits, self.cache = self.model(self.images, text, torch.zeros_like(text), None, text_len=2, incremental_state={})
        return _next_word_log_probs(logits)

    def advance(self, beam_idx: torch.Tensor, words: torch.Tensor, cur_len: int) -> torch.Tensor:
        for layer_state in self.cache.values():
            for key, value in layer_state.items():
                layer_state[key] = value.index_select(0, beam_idx)[:, :, :-1]
        text = torch.stack([words, torch.full_like(words, self.ids.mask_id)], dim=1)
        logits, self.cache = self.model(None, text, None, None, text_len=cur_len, incremental_state=self.cache)
        return _next_word_log_probs(logits)


class _RecomputedSteps:
    """Next-word log-probabilities re-encoding the image and the whole text every step (no cache)."""

    def __init__(self, model: nn.Module, images: torch.Tensor, ids: SpecialTokenIds):
        self.model, self.images, self.ids = model, images, ids
        self.prefix = torch.full((images.shape[0], 1), ids.bos_id, dtype=torch.long, device=images.device)

    def _run(self) -> torch.Tensor:
        text = torch.cat([self.prefix, torch.full_like(self.prefix[:, :1], self.ids.mask_id)], dim=1)
        logits, _ = self.model(self.images, text, torch.zeros_like(text), None)
        return _next_word_log_probs(logits)

    def first(self) -> torch.Tensor:
        return self._run()

    def advance(self, beam_idx: torch.Tensor, words: torch.Tensor, cur_len: int) -> torch.Tensor:
        self.prefix = torch.cat([self.prefix.index_select(0, beam_idx), words[:, None]], dim=1)
        return self._run()


def _steps(model: nn.Module, images: torch.Tensor, ids: SpecialTokenIds, use_cache: bool, max_len: int):
    if images.dim() != 4:
        raise ValueError(f"images must be (B, C, H, W); got {tuple(images.shape)}")
    if max_len < 3:
        raise ValueError(f"max_len counts <s> and </s> and must be at least 3, got {max_len}")
    return (_CachedSteps if use_cache else _RecomputedSteps)(model, images, ids)


@torch.no_grad()
def beam_search(
    model: nn.Module,
    images: torch.Tensor,
    tokenizer: Any = None,
    *,
    num_beams: int = 3,
    max_len: int = 32,
    length_penalty: float = 0.6,
    use_cache: bool = True,
    bos_id: int = 0,
    pad_id: int = 1,
    eos_id: int = 2,
    mask_id: Optional[int] = None,
) -> list[Caption]:
    """Best caption per image by beam search, following the official evaluation.

    At each step the ``num_beams`` x 3 best continuations are scanned in order: one ending in ``</s>`` becomes a
    finished hypothesis scored sum(log p) / cur_len ** ``length_penalty`` (cur_len counts ``<s>``, the words and
    ``</s>``); the others refill the beams. An image is done when its best finished score beats what the best live
    beam could reach at full length; at ``max_len`` (tokens incl. ``<s>`` and ``</s>``) every candidate is closed.
    (The official code replaces the last word by ``</s>`` there; here the word is kept.)
    """
    if num_beams < 1:
        raise ValueError(f"num_beams must be >= 1, got {num_beams}")
    ids = SpecialTokenIds.resolve(tokenizer, bos_id, pad_id, eos_id, mask_id)
    batch = images.shape[0]
    steps = _steps(model, images.repeat_interleave(num_beams, dim=0), ids, use_cache, max_len)
    device = images.device
    logprobs, cur_len = steps.first(), 2
    beam_scores = torch.zeros(batch, num_beams, dtype=logprobs.dtype, device=device)
    beam_scores[:, 1:] = INACTIVE_BEAM_SCORE
    generated = torch.empty(batch * num_beams, 0, dtype=torch.long, device=device)
    best: list[Optional[Caption]] = [None] * batch
    done = [False] * batch
    while True:
        vocab = logprobs.shape[-1]
        totals = (logprobs + beam_scores.view(-1, 1)).view(batch, num_beams * vocab)
        top_scores, top_index = totals.topk(min(CANDIDATES_PER_BEAM * num_beams, totals.shape[1]), dim=1)
        last_step = cur_len + 1 == max_len
        next_beams: list[tuple[float, int, int]] = []
        for b in range(batch):
            reachable = top_scores[b, 0].item() / (max_len - 1) ** length_penalty
            done[b] = done[b] or (best[b] is not None and best[b].score >= reachable)
            live: list[tuple[float, int, int]] = []
            if not done[b]:
                for score, index in zip(top_scores[b].tolist(), top_index[b].tolist()):
                    beam, word = divmod(index, vocab)
                    row = b * num_beams + beam
                    if word == ids.eos_id or last_step:
                        words = generated[row].tolist() + ([] if word == ids.eos_id else [word])
                        normalised = score / cur_len**length_penalty
                        if best[b] is None or normalised > best[b].score:
                            best[b] = Caption(words, normalised)
                    else:
                        live.append((score, word, row))
                    if len(live) == num_beams:
                        break
                done[b] = last_step
            if done[b]:  # keep the finished image's rows in place; their content no longer matters
                live = [(INACTIVE_BEAM_SCORE, ids.pad_id, b * num_beams + k) for k in range(num_beams)]
            next_beams.extend(live)
        if all(done):
            break
        beam_scores = torch.tensor([s for s, _, _ in next_beams], dtype=logprobs.dtype, device=device).view(batch, num_beams)
        words = torch.tensor([w for _, w, _ in next_beams], dtype=torch.long, device=device)
        beam_idx = torch.tensor([r for _, _, r in next_beams], dtype=torch.long, device=device)
        generated = torch.cat([generated.index_select(0, beam_idx), words[:, None]], dim=1)
        cur_len += 1
        logprobs = steps.advance(beam_idx, words, cur_len)
    return best  # every image has a caption: the max_len step closes all beams


@torch.no_grad()
def greedy_search(
    model: nn.Module,
    images: torch.Tensor,
    tokenizer: Any = None,
    *,
    max_len: int = 32,
    use_cache: bool = True,
    bos_id: int = 0,
    pad_id: int = 1,
    eos_id: int = 2,
    mask_id: Optional[int] = None,
) -> list[Caption]:
    """Most likely next word at every step until ``</s>`` or ``max_len`` tokens (incl. ``<s>`` and ``</s>``), scored
    by the summed log-probability: :func:`beam_search` with one beam and ``length_penalty=0``."""
    return beam_search(model, images, tokenizer, num_beams=1, max_len=max_len, length_penalty=0.0, use_cache=use_cache,
                       bos_id=bos_id, pad_id=pad_id, eos_id=eos_id, mask_id=mask_id)


def sample_top_p(logprobs: torch.Tensor, top_p: float, temperature: float = 1.0,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """One word per row (B,) drawn from the smallest set of words whose probabilities (at ``temperature``) sum to at
    least ``top_p`` (nucleus sampling, Holtzman et al. 2020), renormalised."""
    if not 0.0 < top_p <= 1.0 or temperature <= 0:
        raise ValueError(f"top_p must be in (0, 1] and temperature > 0; got {top_p}, {temperature}")
    probs = torch.softmax(logprobs.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p  # the words after the nucleus is full
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    choice = torch.multinomial(sorted_probs / sorted_probs.sum(dim=-1, keepdim=True), 1, generator=generator)
    return order.gather(1, choice).squeeze(1)


@torch.no_grad()
def nucleus_sampling(
    model: nn.Module,
    images: torch.Tensor,
    tokenizer: Any = None,
    *,
    top_p: float = 0.9,
    temperature: float = 1.0,
    max_len: int = 32,
    use_cache: bool = True,
    generator: Optional[torch.Generator] = None,
    bos_id: int = 0,
    pad_id: int = 1,
    eos_id: int = 2,
    mask_id: Optional[int] = None,
) -> list[Caption]:
    """One sampled caption per image: each next word drawn by :func:`sample_top_p` until ``</s>`` or ``max_len``
    tokens (incl. ``<s>`` and ``</s>``); scored by the summed log-probability of the words drawn. BLIP's CapFilt
    samples (top-p 0.9) rather than searches: more diverse captions, which the filter then judges."""
    ids = SpecialTokenIds.resolve(tokenizer, bos_id, pad_id, eos_id, mask_id)
    steps = _steps(model, images, ids, use_cache, max_len)
    batch = images.shape[0]
    rows = torch.arange(batch, device=images.device)
    logprobs, cur_len = steps.first(), 2
    captions = [Caption([], 0.0) for _ in range(batch)]
    finished = [False] * batch
    while True:
        words = sample_top_p(logprobs, top_p, temperature, generator)
        word_logprobs = logprobs.gather(1, words[:, None]).squeeze(1).tolist()
        for b, word in enumerate(words.tolist()):
            if finished[b]:
                continue
            captions[b].score += word_logprobs[b]
            if word == ids.eos_id:
                finished[b] = True
            else:
                captions[b].token_ids.append(word)
                finished[b] = cur_len + 1 == max_len
        if all(finished):
            return captions
        cur_len += 1
        logprobs = steps.advance(rows, words, cur_len)
