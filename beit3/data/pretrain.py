"""Multi-source pretraining batches: per optimizer step an image, a text and a pair batch; exactly resumable.

Design: every sample is a pure function of (seed, stream, rank, step, slot). Sample ``slot`` of step ``t`` on rank
``r`` sits at global position ``p = b * batch + slot`` of its stream, where ``b`` is the rank's rank batch of step
``t`` (``(t * world_size + r)`` in a run that kept its number of ranks; :mod:`beit3.data.schedule`); its index is
``permutation(seed, stream, epoch = p // N)[p % N]``, and its augmentation RNG is seeded from
(seed, stream, rank, step, slot). DataLoader workers receive step numbers and build whole steps, so the iterator's
state is the next step number (plus the skip counters and the schedule's origin). ``load_state_dict`` then
restarts exactly there, with any ``num_workers``; ``load_resharded_state_dict`` continues the global order of a
run saved on another number of ranks. Every rank draws the same streams with the same batch sizes, so schedules
agree across ranks.

Bad samples (missing file, corrupt image, empty text) are replaced by a deterministically drawn other sample of the
same stream and counted by reason; ``skip_counts()`` exposes the counters, and a skip fraction above
``max_skip_fraction`` (once ``skip_check_min_samples`` samples were drawn) raises an error.
"""
from __future__ import annotations

import itertools
import random
import signal
import zlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from beit3.data.codes import PrecomputedCodes
from beit3.data.readers import SkipSample
from beit3.data.schedule import RankSchedule
from beit3.data.sources import open_image_source, open_pair_source, open_text_source
from beit3.data.transforms import TwoViewTransform
from beit3.errors import SkipLimitError
from beit3.text import TextTokenizer

STREAMS = ("image", "text", "pair")


_STREAM_CODES = {name: code for code, name in enumerate(STREAMS)}


@dataclass
class PretrainDataConfig:
    """Where pretraining data comes from and how each step's batches look (per rank)."""

    root: str = "runs/demo/data"  # the demo data of the README; the same default in every tool
    image_source: str = "imagenet.train.index.jsonl"  # JSONL index, classification folder or tar shards
    text_sources: list[str] = field(default_factory=lambda: ["corpus.txt"])  # plain text files
    pair_source: str = "coco_retrieval.train.jsonl"  # retrieval-style JSONL index or img2dataset tar shards
    image_batch: int = 8
    text_batch: int = 8
    pair_batch: int = 8
    image_size: int = 224
    tokenizer_image_size: int = 224
    min_crop_scale: float = 0.2
    color_jitter: float = 0.4
    hflip: bool = True  # random horizontal flip (off for data whose text speaks of left and right)
    max_text_len: int = 64
    codes_dir: str = ""  # precomputed visual codes (tools/tokenize_dataset.py), relative to root; "" = online tokenizer
    num_workers: int = 2
    prefetch_factor: int = 2
    max_skip_fraction: float = 0.01
    skip_check_min_samples: int = 200
    max_replacements: int = 16

    def __post_init__(self) -> None:
        for key in ("image_batch", "text_batch", "pair_batch", "num_workers"):
            if getattr(self, key) < 0:
                raise ValueError(f"data.{key} must be >= 0, got {getattr(self, key)}")
        if self.image_batch + self.text_batch + self.pair_batch == 0:
            raise ValueError("data.image_batch, data.text_batch and data.pair_batch are all 0: nothing to load")
        if not 0 <= self.max_skip_fraction <= 1:
            raise ValueError(f"data.max_skip_fraction must be in [0, 1], got {self.max_skip_fraction}")
        if self.max_text_len < 3:
            raise ValueError(f"data.max_text_len must be >= 3, got {self.max_text_len}")


def derive_seed(*parts: int) -> int:
    """A 64-bit seed that is a pure function of the integer ``parts`` (numpy SeedSequence)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0])


class _Stream:
    """One source plus its batch size and the arithmetic that maps (rank, step, slot) to samples."""

    def __init__(self, name: str, source, batch: int, seed: int, max_replacements: int):
        if len(source) == 0:
            raise ValueError(f"{name} source '{source.location}' holds no samples")
        self.name, self.source, self.batch, self.seed = name, source, batch, seed
        self.code = _STREAM_CODES[name]
        self.max_replacements = max_replacements
        self._perm_epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def index_at(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.source))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng(derive_seed(self.seed, self.code, epoch)).permutation(len(self.source))
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def load(self, rank: int, step: int, rank_batch: int, slot: int, skips: "_SkipCounter",
             image_views: Callable[[dict, random.Random], dict]) -> tuple[dict, random.Random]:
        """The sample for a slot of global rank batch ``rank_batch`` with its image's ``views`` (``image_views``),
        replacing unusable samples; returns it with its augmentation RNG."""
        index = self.index_at(rank_batch * self.batch + slot)
        reasons = []
        for attempt in range(self.max_replacements + 1):
            try:
                sample = self.source.load(index)
                sample["image_key"] = sample.get("image_path", index)
                rng = random.Random(derive_seed(self.seed, self.code, rank, step, slot, attempt))
                if "image" in sample:
                    sample["views"] = image_views(sample, rng)
                return sample, rng
            except SkipSample as err:
                skips.record(err, self.name)
                reasons.append(str(err))
                index = random.Random(derive_seed(self.seed, self.code, rank, step, slot, attempt, 1)).randrange(len(self.source))
        raise RuntimeError(f"{self.name} source '{self.source.location}': {len(reasons)} samples in a row were unusable: {reasons[:3]}")

    def probe(self) -> None:
        """Fail early, naming the source, when none of its first samples is usable."""
        reasons = []
        for index in range(min(len(self.source), self.max_replacements + 1)):
            try:
                self.source.load(index)
                return
            except SkipSample as err:
                reasons.append(str(err))
        raise ValueError(f"{self.name} source '{self.source.location}' yields no usable sample; first problems: {reasons[:3]}")


class PretrainStepDataset(Dataset):
    """Map-style dataset whose item ``step`` is the complete batch dict of that step for one rank."""

    def __init__(self, streams: list[_Stream], transform: TwoViewTransform, tokenizer: TextTokenizer,
                 max_text_len: int, rank: int, world_size: int, codes: PrecomputedCodes | None = None):
        self.streams, self.transform, self.tokenizer = streams, transform, tokenizer
        self.max_text_len, self.rank = max_text_len, rank
        self.schedule = RankSchedule(rank, world_size)
        self.codes = codes

    def _image_views(self, sample: dict, rng: random.Random) -> dict[str, torch.Tensor]:
        """The two-view transform's uint8 views and jitter rows or, with precomputed codes, the fixed view and its
        codes."""
        if self.codes is None:
            return self.transform(sample["image"], rng)
        if "image_path" not in sample:
            raise ValueError("data.codes_dir needs image sources with image paths (JSONL indexes or image folders)")
        view, codes = self.codes(sample["image"], sample["image_path"])
        return {"image": view, "codes": codes}

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, step: int) -> tuple[dict, dict]:
        """The step's batch and the skipped samples' reasons: ``{reason: count}`` and the first few as text."""
        batch, skips = {}, _SkipCounter()
        rank_batch = self.schedule.batch_index(step)
        for stream in self.streams:
            views, texts, keys = [], [], []
            for slot in range(stream.batch):
                sample, rng = stream.load(self.rank, step, rank_batch, slot, skips, self._image_views)
                if "views" in sample:
                    views.append(sample["views"])
                    keys.append(zlib.crc32(str(sample["image_key"]).encode()))
                if "text_ids" in sample:
                    texts.append(sample["text_ids"])
            out = {}
            if views:
                out = {key: torch.stack([v[key] for v in views]) for key in views[0]}
                out["image_id"] = torch.tensor(keys, dtype=torch.long)  # equal for two captions of one image
            if texts:
                out["text_tokens"], out["padding_mask"] = self.tokenizer.pad_ids(texts, self.max_text_len)
            batch[stream.name] = out
        return batch, {"counts": dict(skips), "examples": skips.examples}


class _SkipCounter(Counter):
    """Skip counts by reason that also keep the first few skipped samples (what and where) for error messages."""

    def __init__(self):
        super().__init__()
        self.examples: list[str] = []

    def record(self, err: SkipSample, source: str) -> None:
        self[err.reason] += 1
        if len(self.examples) < 3:
            self.examples.append(f"{source} source: {err}")


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: SIGINT, SIGTERM and SIGUSR1 (which a terminal or a scheduler sends to the whole
    process group) are left to the training process, which finishes its step, saves and then ends its workers; a
    worker killed by them would fail the loader in the middle of that last step."""
    for number in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(number, signal.SIG_IGN)


class StepsFrom(Sampler):
    """Endless sampler of step numbers ``start, start + 1, ...`` (a loader item is a whole step)."""

    def __init__(self, start: int):
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)


class PretrainBatches:
    """Endless iterable of per-step batch dicts ``{"image": .., "text": .., "pair": ..}`` with exact resume.

    ``state_dict()`` holds the next step to be yielded, the skip counters and the schedule's origin;
    ``load_state_dict`` makes the next ``iter()`` continue from there, bit-identical to an uninterrupted run.
    """

    def __init__(self, dataset: PretrainStepDataset, num_workers: int, prefetch_factor: int,
                 max_skip_fraction: float, skip_check_min_samples: int):
        self.dataset = dataset
        self.num_workers, self.prefetch_factor = num_workers, prefetch_factor
        self.max_skip_fraction, self.skip_check_min_samples = max_skip_fraction, skip_check_min_samples
        self.samples_per_step = sum(s.batch for s in dataset.streams)
        self.next_step = 0
        self._drawn = 0  # samples drawn (replacements included) that this rank counts as its own
        self._skips: Counter = Counter()
        self._examples: list[str] = []  # the first skipped samples of this process (for the skip-limit message)

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples so far by reason, e.g. ``{"corrupt_image": 2, "missing_file": 1}``."""
        return dict(self._skips)

    def check_batch_sizes(self) -> None:
        """A batch larger than its source would repeat samples within one step: a ValueError naming the key."""
        for stream in self.dataset.streams:
            if stream.batch > len(stream.source):
                raise ValueError(f"data.{stream.name}_batch={stream.batch} is larger than the {len(stream.source)} "
                                 f"samples of the {stream.name} source '{stream.source.location}'")

    def state_dict(self) -> dict:
        return {"next_step": self.next_step, "skip_counts": dict(self._skips),
                "schedule": self.dataset.schedule.state_dict(), "drawn": self._drawn}

    def load_state_dict(self, state: dict) -> None:
        self.next_step = int(state["next_step"])
        self._skips = Counter(state.get("skip_counts", {}))
        self.dataset.schedule = self.dataset.schedule.with_state(state.get("schedule"))
        self._drawn = self._drawn_in(state)

    def load_resharded_state_dict(self, states: list[dict]) -> None:
        """Continue the global order of a run saved on ``len(states)`` ranks (their states, in rank order); rank 0
        takes over the skip counts and drawn samples of all of them, so totals and the skip fraction carry on."""
        schedule = self.dataset.schedule.continued([s.get("schedule") for s in states],
                                                   [int(s["next_step"]) for s in states])
        self.dataset.schedule, self.next_step = schedule, schedule.first_step
        self._skips, self._drawn = Counter(), 0
        if schedule.rank == 0:
            for state in states:
                self._skips.update(state.get("skip_counts", {}))
            self._drawn = sum(self._drawn_in(state) for state in states)

    def _drawn_in(self, state: dict) -> int:
        """The drawn samples of a saved state (states saved before they were counted: steps x batch + skips)."""
        if "drawn" in state:
            return int(state["drawn"])
        return int(state["next_step"]) * self.samples_per_step + sum(state.get("skip_counts", {}).values())

    def _check_skips(self) -> None:
        skipped, drawn = sum(self._skips.values()), self._drawn
        if drawn >= self.skip_check_min_samples and skipped > self.max_skip_fraction * drawn:
            raise SkipLimitError(f"data: {skipped} of {drawn} samples skipped ({dict(self._skips)}), more than "
                               f"data.max_skip_fraction={self.max_skip_fraction}; first ones: "
                               f"{'; '.join(self._examples) or 'before this run (resumed)'}. Fix or remove those "
                               "samples, or raise data.max_skip_fraction")

    def __iter__(self) -> Iterator[dict]:
        extra = {"prefetch_factor": self.prefetch_factor} if self.num_workers > 0 else {}
        loader = DataLoader(self.dataset, batch_size=None, sampler=StepsFrom(self.next_step),
                            num_workers=self.num_workers, worker_init_fn=ignore_stop_signals,
                            pin_memory=torch.cuda.is_available(), **extra)  # pinned: the copy to the GPU overlaps
        # made now, not at the first batch: the loader draws its base seed from the global RNG, and the engine
        # creates the iterator before it restores a resumed run's RNG state
        return self._counted(iter(loader))

    def _counted(self, loader: Iterator) -> Iterator[dict]:
        for batch, skips in loader:
            self._skips.update(skips["counts"])
            self._drawn += self.samples_per_step + sum(skips["counts"].values())
            self._examples.extend(skips["examples"][: 3 - len(self._examples)])
            self.next_step += 1
            self._check_skips()
            yield batch


def build_pretrain_batches(cfg: PretrainDataConfig, text_tokenizer: TextTokenizer, rank: int = 0,
                           world_size: int = 1, seed: int = 0) -> PretrainBatches:
    """Open the configured sources (checking each yields something) and return the resumable batch iterable."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
    root = Path(cfg.root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.root '{root}' does not exist")
    openers = {
        "image": lambda: open_image_source(cfg.image_source, root, text_tokenizer),
        "text": lambda: open_text_source(cfg.text_sources, root, text_tokenizer),
        "pair": lambda: open_pair_source(cfg.pair_source, root, text_tokenizer),
    }
    sizes = {"image": cfg.image_batch, "text": cfg.text_batch, "pair": cfg.pair_batch}
    streams = [_Stream(name, openers[name](), sizes[name], seed, cfg.max_replacements) for name in STREAMS if sizes[name]]
    for stream in streams:
        stream.probe()
    transform = TwoViewTransform(cfg.image_size, cfg.tokenizer_image_size, cfg.min_crop_scale, cfg.color_jitter,
                                 hflip=cfg.hflip)
    codes = PrecomputedCodes(root / cfg.codes_dir, cfg.image_size) if cfg.codes_dir else None
    dataset = PretrainStepDataset(streams, transform, text_tokenizer, cfg.max_text_len, rank, world_size, codes)
    return PretrainBatches(dataset, cfg.num_workers, cfg.prefetch_factor, cfg.max_skip_fraction,
                           cfg.skip_check_min_samples)
