"""Readers: images (files or bytes), JSONL index files, image folders, text files, WebDataset tar shards.

Map-style readers (``TextLines``, ``TarShardIndex``) give random access by integer index, which is what the
pretraining mixer needs for exact resume. ``webdataset_stream`` reads shards sequentially through the ``webdataset``
library (split by rank and worker, or resampled without end) for pipelines that only need a stream.
A sample that cannot be used raises :class:`SkipSample` with a reason (``missing_file``, ``corrupt_image``,
``empty_text``, ``overlong_text``, ``truncated_sample``, ``broken_shard``) so that callers can replace and count it.
A shard that is unreadable from some point on (truncated download) keeps the samples before that point; one that is
unreadable from the start is left out with a warning (an error only when no shard is readable).
"""
from __future__ import annotations

import io
import tarfile
import warnings
from bisect import bisect_right
from pathlib import Path
from typing import Sequence

import braceexpand
import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError

from tokenizer.precomputed import list_images

MAX_TEXT_BYTES = 1 << 16  # a longer line/caption is a broken record (e.g. a file without newlines), not a sentence


class SkipSample(Exception):
    """A sample that cannot be used; ``reason`` is a short counter name such as ``corrupt_image``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


def decode_image(data: bytes, name: str) -> Image.Image:
    """Decode image bytes to RGB; undecodable data raises SkipSample('corrupt_image')."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise SkipSample("corrupt_image", f"{name}: {err}") from err


def load_image(path: str | Path) -> Image.Image:
    """Read an image file as RGB; a missing file or undecodable data raises SkipSample."""
    try:
        data = Path(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError, PermissionError) as err:
        raise SkipSample("missing_file", str(path)) from err
    return decode_image(data, str(path))




def list_image_folder(root: str | Path) -> tuple[list[tuple[str, int]], list[str]]:
    """``root/CLASS/*.jpg`` -> ([(path relative to root, label)], classes); labels follow sorted class names."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder '{root}' does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    samples = [(f"{name}/{path}", label) for label, name in enumerate(classes)
               for path in list_images(root / name, allow_empty=True)]
    if not samples:
        raise ValueError(f"image folder '{root}' holds no images in class sub-folders")
    return samples, classes


class TextLines:
    """Random access to the non-blank lines of plain text files through a byte-offset index (files stay on disk).
    Blank (whitespace-only) lines separate documents: they are not indexed, so they are never sampled or counted
    as faults."""

    def __init__(self, files: Sequence[str | Path]):
        self.files = [Path(f) for f in files]
        self._spans: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per file: starts, sizes, line numbers
        for f in self.files:
            if not f.is_file():
                raise FileNotFoundError(f"text file '{f}' does not exist")
            data = f.read_bytes()
            array = np.frombuffer(data, dtype=np.uint8)
            ends = np.flatnonzero(array == ord("\n")) + 1
            starts = np.concatenate([[0], ends]).astype(np.int64)
            if starts[-1] == len(array):
                starts = starts[:-1]
            sizes = np.diff(np.concatenate([starts, [len(array)]])).astype(np.int64)
            short = np.flatnonzero(sizes <= 64)  # only short lines can be blank: check those by their bytes
            blank = [i for i in short if not data[starts[i]:starts[i] + sizes[i]].strip()]
            keep = np.setdiff1d(np.arange(len(starts)), np.asarray(blank, dtype=np.int64))
            self._spans.append((starts[keep], sizes[keep], keep + 1))
        self._cumulative = np.cumsum([0] + [len(s[0]) for s in self._spans])

    def __len__(self) -> int:
        return int(self._cumulative[-1])

    def __getitem__(self, index: int) -> str:
        """Non-blank line ``index`` (over all files in order), stripped; a line that reads empty (the file changed
        since it was indexed) raises SkipSample."""
        if not 0 <= index < len(self):
            raise IndexError(f"line {index} out of range for {len(self)} lines")
        file_index = bisect_right(self._cumulative, index) - 1
        starts, sizes, numbers = self._spans[file_index]
        row = index - int(self._cumulative[file_index])
        size, line_number = int(sizes[row]), int(numbers[row])
        if size > MAX_TEXT_BYTES:
            raise SkipSample("overlong_text", f"{self.files[file_index]} line {line_number} has {size} bytes")
        try:
            with self.files[file_index].open("rb") as f:
                f.seek(int(starts[row]))
                text = f.read(size).decode("utf-8", errors="replace").strip()
        except OSError as err:
            raise SkipSample("missing_file", f"{self.files[file_index]}: {err}") from err
        if not text:
            raise SkipSample("empty_text", f"{self.files[file_index]} line {line_number}")
        return text


def expand_shards(spec: str | Sequence[str], root: str | Path = ".") -> list[Path]:
    """Shard paths from brace patterns (``shards/{00000..00003}.tar``), globs or a folder of ``*.tar``."""
    root = Path(root)
    paths: list[Path] = []
    for item in [spec] if isinstance(spec, str) else spec:
        for name in braceexpand.braceexpand(item):
            path = root / name
            if path.is_dir():
                paths.extend(sorted(path.glob("*.tar")))
            elif any(c in name for c in "*?["):
                paths.extend(sorted(root.glob(name)))
            else:
                paths.append(path)
    if not paths:
        raise ValueError(f"shard spec {spec!r} under '{root}' matches no tar files")
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"shard files do not exist: {missing[:3]}")
    return paths


class TarShardIndex:
    """Random access to the samples of img2dataset-style tar shards (``key.jpg``, ``key.txt``, ``key.json``).

    The index (member offsets per key) is built once from the tar headers; reading a sample then seeks straight to
    its members. Samples lacking one of ``required`` extensions are left out of the index.
    """

    def __init__(self, shards: Sequence[str | Path], required: Sequence[str] = ("jpg", "txt")):
        self.shards = [Path(s) for s in shards]
        self._entries: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        self.broken_shards: list[str] = []  # "path: reason" of shards (partly) unreadable at indexing time
        for shard_index, shard in enumerate(self.shards):
            members: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                file_size = shard.stat().st_size
                with tarfile.open(shard) as tar:
                    for info in tar:
                        if info.isfile() and "." in info.name and info.offset_data + info.size <= file_size:
                            key, ext = info.name.split(".", 1)
                            members.setdefault(key, {})[ext] = (info.offset_data, info.size)
            except (tarfile.TarError, OSError, EOFError, ValueError) as err:  # truncated or not a tar file
                self.broken_shards.append(f"{shard}: {err}")
                warnings.warn(f"shard '{shard}' is unreadable from some point on ({err}); "
                              f"{len(members)} samples before it are used")
            self._entries.extend((shard_index, key, parts) for key, parts in members.items()
                                 if all(ext in parts for ext in required))
        if not self._entries and self.broken_shards:
            raise ValueError(f"no readable sample in the shards: {self.broken_shards[:3]}")

    def __len__(self) -> int:
        return len(self._entries)

    def describe(self, index: int) -> str:
        """``shard_path:key`` of sample ``index`` for error messages."""
        shard_index, key, _ = self._entries[index]
        return f"{self.shards[shard_index]}:{key}"

    def __getitem__(self, index: int) -> dict:
        """``{"__key__": key, ext: bytes, ...}`` of sample ``index``."""
        shard_index, key, parts = self._entries[index]
        sample: dict = {"__key__": key}
        where = f"{self.shards[shard_index]}:{key}"
        try:
            with self.shards[shard_index].open("rb") as f:
                for ext, (offset, size) in parts.items():
                    f.seek(offset)
                    sample[ext] = f.read(size)
                    if len(sample[ext]) != size:
                        raise SkipSample("truncated_sample", f"{where}.{ext}: {len(sample[ext])} of {size} bytes")
        except OSError as err:  # the shard vanished or became unreadable during the run
            raise SkipSample("broken_shard", f"{where}: {err}") from err
        return sample


def webdataset_stream(shards: Sequence[str | Path], rank: int = 0, world_size: int = 1, seed: int = 0,
                      resampled: bool = True) -> wds.DataPipeline:
    """Sequential WebDataset pipeline of raw samples ``{"__key__", "jpg", "txt", ...}``.

    ``resampled=True`` draws shards with replacement without end from an RNG seeded by (seed, rank, worker); it
    never runs dry and is the mode for pretraining. ``resampled=False`` reads each shard once, split by rank, then
    by DataLoader worker (needs at least world_size x num_workers shards). Unreadable tar data is skipped with a
    warning. Resume is by fast-forwarding: skip the number of samples already consumed (``itertools.islice``).
    """
    urls = [str(s) for s in shards]
    if resampled:
        def worker_seed() -> int:
            return rank * 1000 + wds.utils.pytorch_worker_info()[2]
        source = wds.ResampledShards(urls, seed=seed, worker_seed=worker_seed, deterministic=True)
        return wds.DataPipeline(source, wds.tarfile_to_samples(handler=wds.warn_and_continue))
    if len(urls) < world_size:
        raise ValueError(f"{len(urls)} shards cannot be split over {world_size} ranks; use resampled=True")
    return wds.DataPipeline(
        wds.SimpleShardList(urls[rank::world_size]),
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=wds.warn_and_continue),
    )

