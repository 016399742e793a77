"""What one checkpoint tag directory holds and how it is verified: the manifest ``complete.json`` (step, world size,
micro batches, every file with its size and SHA-256) and the per-rank ``rank{r}_state.pt`` files (data-iterator
and RNG state).

The manifest is written last, after every rank's files are on disk, so its presence means the save finished; its
checksums catch what sizes cannot (a flipped byte on a network file system, a partial copy). Hashing runs one
thread per file (``hashlib`` releases the GIL): the cost on a base-size checkpoint is in the README.
"""
from __future__ import annotations

import hashlib
import json
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from beit3.errors import CheckpointError

MANIFEST = "complete.json"
_CHUNK = 8 << 20


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _hash_files(paths: list[Path]) -> list[str]:
    if len(paths) <= 1:
        return [sha256_of(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(8, len(paths), os.cpu_count() or 1)) as pool:
        return list(pool.map(sha256_of, paths))


def write_manifest(tag_dir: Path, step: int, world_size: int, micro_batches: int) -> None:
    """fsync every file of ``tag_dir``, then write the manifest atomically (temp file + ``os.replace``)."""
    paths = [p for p in sorted(tag_dir.iterdir()) if p.is_file() and p.name != MANIFEST and not p.name.endswith(".tmp")]
    for path in paths:  # make the data durable before the rename publishes it
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    files = {p.name: {"bytes": p.stat().st_size, "sha256": digest} for p, digest in zip(paths, _hash_files(paths))}
    tmp = tag_dir / (MANIFEST + ".tmp")
    with open(tmp, "w") as handle:
        json.dump({"step": int(step), "world_size": int(world_size), "micro_batches": int(micro_batches),
                   "files": files}, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, tag_dir / MANIFEST)


def read_manifest(tag_dir: str | Path) -> dict | None:
    """The manifest of ``tag_dir`` (None when there is none or it is unreadable)."""
    try:
        manifest = json.loads((Path(tag_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def checkpoint_problem(tag_dir: str | Path, verify: bool = True) -> str | None:
    """Why ``tag_dir`` is not a complete, intact checkpoint (None when it is).

    Complete = its manifest exists and every listed file is there with its recorded size and (``verify``) SHA-256.
    Manifests of older versions record sizes only. Directories saved before manifests existed count as complete
    when ``rank0_state.pt``, the other ranks' state files and a model-states file are present.
    """
    tag_dir = Path(tag_dir)
    if not tag_dir.is_dir():
        return f"'{tag_dir}' does not exist"
    manifest_path = tag_dir / MANIFEST
    if not manifest_path.is_file():
        if (tag_dir / "rank0_state.pt").is_file() and any(tag_dir.glob("*model_states.pt")):
            try:
                world = int(load_rank_state(tag_dir, 0).get("world_size", 1))
            except (CheckpointError, FileNotFoundError, TypeError, ValueError) as err:
                return str(err)
            missing = [f"rank{r}_state.pt" for r in range(world) if not (tag_dir / f"rank{r}_state.pt").is_file()]
            return f"'{tag_dir}' lacks {', '.join(missing)}" if missing else None
        return f"'{tag_dir}' has no {MANIFEST} (the save did not finish)"
    manifest = read_manifest(tag_dir)
    if manifest is None:
        return f"'{manifest_path}' is unreadable (not the JSON manifest a save writes)"
    expected = {}
    for name, entry in manifest["files"].items():
        size, digest = (entry.get("bytes"), entry.get("sha256")) if isinstance(entry, dict) else (entry, None)
        path = tag_dir / name
        if not path.is_file():
            return f"'{path}' is missing"
        if path.stat().st_size != size:
            return f"'{path}' has {path.stat().st_size} bytes, the manifest says {size} (truncated?)"
        if verify and digest is not None:
            expected[path] = digest
    for (path, digest), actual in zip(expected.items(), _hash_files(list(expected))):
        if actual != digest:
            return f"'{path}' does not match its SHA-256 in {MANIFEST} (the file changed after the save: corrupt?)"
    return None


def saved_layout(tag_dir: str | Path) -> tuple[int, int | None]:
    """``(world_size, micro_batches)`` a checkpoint was saved with (micro batches None when not recorded)."""
    manifest = read_manifest(tag_dir)
    if manifest is not None and "world_size" in manifest:
        return int(manifest["world_size"]), manifest.get("micro_batches")
    state = load_rank_state(tag_dir, 0)
    return int(state.get("world_size", 1)), state.get("micro_batches")


def load_rank_state(tag_dir: str | Path, rank: int) -> dict:
    path = Path(tag_dir) / f"rank{rank}_state.pt"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint '{tag_dir}' has no '{path.name}' (incomplete?)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle with code, truncated file, ...
        raise CheckpointError(f"cannot read '{path}' with torch.load(weights_only=True): {err}") from err
