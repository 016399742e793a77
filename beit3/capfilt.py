"""CapFilt (BLIP, Li et al. 2022): clean an image-text source by captioning every image again and filtering.

For every image a fine-tuned captioner (:class:`~beit3.models.tasks.captioning.BEiT3ForCaptioning`) samples synthetic
captions (nucleus sampling, top-p 0.9 as BLIP); an image-text matching model (the retrieval model with its ITM head,
:class:`~beit3.models.tasks.retrieval.BEiT3ForRetrieval` built with ``itm=True``) scores the original and every
synthetic caption; captions whose match probability reaches ``threshold`` are kept, as pairs of the new source.

The work is cut into units (a JSONL index in chunks of ``chunk_size`` items, img2dataset shards one unit each); a
unit writes its output and then its stats file, each atomically, so a rerun skips finished units and a killed run
loses at most the units in flight. Units are dealt to ranks round-robin. Unusable samples (missing or corrupt
images, empty captions) are skipped and counted by reason, as in pretraining.
"""
from __future__ import annotations

import io
import json
import os
import random
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from .data.readers import SkipSample, expand_shards, load_image
from .data.sources import ShardSource
from .data.transforms import build_finetune_transform
from .generation import nucleus_sampling
from .jsonl import read_jsonl, write_jsonl
from .models.tasks.captioning import BEiT3ForCaptioning
from .text import TextTokenizer


@dataclass
class CapFiltConfig:
    """How captions are made and judged: ITM match probability ``threshold`` to keep a caption, nucleus ``top_p``,
    ``num_synthetic`` captions per image, caption and ITM text lengths (tokens incl. ``<s>``/``</s>``)."""

    threshold: float = 0.5
    top_p: float = 0.9
    num_synthetic: int = 1
    max_caption_len: int = 32
    max_text_len: int = 64
    batch_size: int = 32
    chunk_size: int = 1000
    seed: int = 0
    # the judge: "itm" (BLIP: the match probability of the ITM head) or "itc" ((1 + cosine) / 2 of the contrastive
    # embeddings, the CLIP-score filter of LAION): for a matcher whose ITM head did not learn (README "CapFilt")
    scorer: str = "itm"

    def __post_init__(self) -> None:
        if self.scorer not in ("itm", "itc"):
            raise ValueError(f"scorer must be 'itm' or 'itc', got '{self.scorer}'")
        if not 0.0 <= self.threshold <= 1.0 or not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"threshold must be in [0, 1] and top_p in (0, 1]; got {self.threshold}, {self.top_p}")
        if min(self.num_synthetic, self.batch_size, self.chunk_size) < 1 or self.max_caption_len < 3:
            raise ValueError("num_synthetic, batch_size and chunk_size must be >= 1 and max_caption_len >= 3")


@dataclass
class WorkUnit:
    """One resumable piece of the source: ``items`` of a JSONL index, or one tar ``shard``."""

    index: int
    name: str
    items: Optional[list[dict]] = None
    shard: Optional[Path] = None


def work_units(source: str, root: Path, chunk_size: int, items: Optional[list[dict]] = None) -> list[WorkUnit]:
    """The units of ``source`` under ``root``: a ``*.jsonl`` index (or its ``items``, e.g. with planted noise) cut
    into chunks, or img2dataset shards (a ``.tar``, brace pattern, glob or folder of ``*.tar``), one unit each."""
    if source.endswith(".jsonl"):
        items = read_jsonl(root / source) if items is None else items
        for number, item in enumerate(items, 1):
            missing = [k for k in ("image_path", "text_segment") if k not in item]
            if missing:
                raise ValueError(f"'{root / source}' line {number}: missing key(s) {missing}")
        return [WorkUnit(i, f"part{i:05d}", items=items[start : start + chunk_size])
                for i, start in enumerate(range(0, len(items), chunk_size))]
    return [WorkUnit(i, shard.stem, shard=shard) for i, shard in enumerate(expand_shards(source, root))]


def plant_noise(items: list[dict], fraction: float, seed: int = 0) -> list[dict]:
    """A copy of a pair index in which ``fraction`` of the items carry another image's caption, marked
    ``"noisy": true`` (the others ``false``): known wrong pairs to measure a filter on."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"the planted-noise fraction must be in [0, 1], got {fraction}")
    rng = random.Random(seed)
    out = [{**item, "noisy": False} for item in items]
    for i in rng.sample(range(len(items)), round(fraction * len(items))):
        image_id = items[i].get("image_id", items[i]["image_path"])
        others = [j for j in rng.sample(range(len(items)), min(len(items), 50))
                  if items[j].get("image_id", items[j]["image_path"]) != image_id]
        if others:
            out[i].update(text_segment=items[others[0]]["text_segment"], noisy=True)
    return out


class CapFilter:
    """The captioner and the matcher on one device: :meth:`judge` returns, per image, the original caption's match
    probability and the synthetic captions with theirs."""

    def __init__(self, captioner: nn.Module, matcher: nn.Module, tokenizer: TextTokenizer, cfg: CapFiltConfig,
                 device: torch.device | str = "cpu"):
        if cfg.scorer == "itm" and getattr(matcher, "itm_head", None) is None:
            raise ValueError("the matcher has no ITM head: fine-tune retrieval with model.overrides.itm=true, or "
                             "score with --scorer itc")
        if cfg.scorer == "itc" and not hasattr(matcher, "encode_image"):
            raise ValueError(f"the matcher is a {type(matcher).__name__}, not a retrieval model")
        if not isinstance(captioner, BEiT3ForCaptioning):
            raise ValueError(f"the captioner is a {type(captioner).__name__}, not a BEiT3ForCaptioning")
        self.device = torch.device(device)
        self.captioner, self.matcher = captioner.to(self.device).eval(), matcher.to(self.device).eval()
        self.tokenizer, self.cfg = tokenizer, cfg
        self.transform = build_finetune_transform(captioner.config.img_size, train=False)
        if matcher.config.img_size != captioner.config.img_size:
            raise ValueError(f"captioner ({captioner.config.img_size} px) and matcher ({matcher.config.img_size} px) "
                             "take images of different sizes")

    @torch.no_grad()
    def match_probability(self, images: torch.Tensor, captions: list[list[int]]) -> list[float]:
        tokens, pads = self.tokenizer.pad_ids(captions, self.cfg.max_text_len)
        tokens, pads = tokens.to(self.device), pads.to(self.device)
        if self.cfg.scorer == "itc":
            cosine = (self.matcher.encode_image(images) * self.matcher.encode_text(tokens, pads)).sum(dim=-1)
            return ((1 + cosine.float()) / 2).tolist()
        return torch.sigmoid(self.matcher.itm_score(images, tokens, pads).float()).tolist()

    @torch.no_grad()
    def judge(self, images: list, captions: list[list[int]], generator: torch.Generator) -> list[dict]:
        pixels = torch.stack([self.transform(image) for image in images]).to(self.device)
        results = [{"original_score": s, "synthetic": []} for s in self.match_probability(pixels, captions)]
        for _ in range(self.cfg.num_synthetic):
            sampled = nucleus_sampling(self.captioner, pixels, self.tokenizer, top_p=self.cfg.top_p,
                                       max_len=self.cfg.max_caption_len, generator=generator)
            ids = [c.token_ids or [self.tokenizer.unk_id] for c in sampled]
            for result, caption, score in zip(results, ids, self.match_probability(pixels, ids)):
                result["synthetic"].append({"ids": caption, "score": score})
        return results


def _samples(unit: WorkUnit, root: Path, tokenizer: TextTokenizer, skipped: dict) -> Iterator[dict]:
    """``{"image", "caption" (ids), "record"}`` of every usable sample of ``unit``; others counted in ``skipped``."""
    if unit.items is not None:
        for number, item in enumerate(unit.items):
            try:
                if not item["text_segment"]:
                    raise SkipSample("empty_text", f"{unit.name} item {number}")
                yield {"image": load_image(root / item["image_path"]), "caption": list(item["text_segment"]),
                       "record": item}
            except SkipSample as skip:
                skipped[skip.reason] = skipped.get(skip.reason, 0) + 1
        return
    source = ShardSource("pair", [unit.shard], tokenizer, with_text=True)
    if source.index.broken_shards:  # the samples before the damage are used
        skipped["broken_shard"] = skipped.get("broken_shard", 0) + len(source.index.broken_shards)
    for i in range(len(source)):
        try:
            raw = source.index[i]
            sample = source.parse(raw, source.index.describe(i))
            yield {"image": sample["image"], "caption": sample["text_ids"], "record": raw}
        except SkipSample as skip:
            skipped[skip.reason] = skipped.get(skip.reason, 0) + 1


def _batches(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


HISTOGRAM_BINS = 20  # match probabilities in bins of 0.05


def _bin(score: float) -> int:
    return min(HISTOGRAM_BINS - 1, max(0, int(score * HISTOGRAM_BINS)))


def unit_paths(out_dir: Path, unit: WorkUnit) -> tuple[Path, Path]:
    """The unit's output (a JSONL part or a tar shard) and its stats file, whose presence marks it done."""
    output = out_dir / ("parts" if unit.items is not None else "shards") / (
        f"{unit.name}.jsonl" if unit.items is not None else f"{unit.name}.tar")
    return output, out_dir / "parts" / f"{unit.name}.stats.json"


def process_unit(unit: WorkUnit, capfilter: CapFilter, root: Path, out_dir: Path, num_examples: int = 4) -> dict:
    """Judge every sample of ``unit`` and write its kept pairs and stats (each atomically); returns the stats:
    counts, histograms of the original and synthetic match probabilities, planted-noise counts before and after
    filtering where the source marks ``noisy`` items, and the first ``num_examples`` samples with their captions and
    scores."""
    output, stats_path = unit_paths(out_dir, unit)
    output.parent.mkdir(parents=True, exist_ok=True)
    stats_path.parent.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator(device=capfilter.device).manual_seed(capfilter.cfg.seed * 1_000_003 + unit.index)
    stats = {"unit": unit.name, "samples": 0, "skipped": {}, "original_histogram": [0] * HISTOGRAM_BINS,
             "synthetic_histogram": [0] * HISTOGRAM_BINS, "kept_original": 0, "kept_synthetic": 0,
             "planted": {"noisy": 0, "clean": 0, "noisy_kept": 0, "clean_kept": 0,
                         "noisy_histogram": [0] * HISTOGRAM_BINS, "clean_histogram": [0] * HISTOGRAM_BINS},
             "examples": []}
    kept: list = []
    threshold = capfilter.cfg.threshold
    for batch in _batches(_samples(unit, root, capfilter.tokenizer, stats["skipped"]), capfilter.cfg.batch_size):
        judged = capfilter.judge([s["image"] for s in batch], [s["caption"] for s in batch], generator)
        for sample, result in zip(batch, judged):
            stats["samples"] += 1
            captions = [("original", sample["caption"], result["original_score"])]
            captions += [(f"synthetic{k}", s["ids"], s["score"]) for k, s in enumerate(result["synthetic"])]
            for kind, _, score in captions:
                stats["original_histogram" if kind == "original" else "synthetic_histogram"][_bin(score)] += 1
            noisy = sample["record"].get("noisy") if unit.items is not None else None
            label = None if not isinstance(noisy, bool) else "noisy" if noisy else "clean"
            if label:
                stats["planted"][label] += 1
                stats["planted"][f"{label}_histogram"][_bin(result["original_score"])] += 1
            for kind, ids, score in captions:
                if score < threshold:
                    continue
                stats["kept_original" if kind == "original" else "kept_synthetic"] += 1
                if kind == "original" and label:
                    stats["planted"][f"{label}_kept"] += 1
                kept.append((sample, kind, ids, score))
            if len(stats["examples"]) < num_examples:
                stats["examples"].append(_example(unit, sample, captions, out_dir, len(stats["examples"]),
                                                  capfilter.tokenizer, threshold))
    tmp = output.with_name(output.name + ".tmp")
    if unit.items is not None:
        write_jsonl(tmp, (_index_item(sample["record"], kind, ids, score, root, out_dir)
                          for sample, kind, ids, score in kept))
    else:
        _write_shard(tmp, kept, capfilter.tokenizer)
    os.replace(tmp, output)
    tmp_stats = stats_path.with_name(stats_path.name + ".tmp")
    tmp_stats.write_text(json.dumps(stats))
    os.replace(tmp_stats, stats_path)
    return stats


def _example(unit: WorkUnit, sample: dict, captions: list, out_dir: Path, number: int, tokenizer: TextTokenizer,
             threshold: float) -> dict:
    """A report example: where the image is, a thumbnail of it under ``out_dir/examples``, each caption's text,
    score and verdict."""
    thumb = out_dir / "examples" / f"{unit.name}_{number}.jpg"
    thumb.parent.mkdir(parents=True, exist_ok=True)
    image = sample["image"].copy()
    image.thumbnail((160, 160))
    image.save(thumb, quality=90)
    record = sample["record"]
    where = record["image_path"] if unit.items is not None else f"{unit.shard}:{record['__key__']}"
    return {"image": where, "thumbnail": str(thumb.relative_to(out_dir)), "captions": [
        {"kind": kind, "text": tokenizer.decode(ids), "score": score, "kept": score >= threshold}
        for kind, ids, score in captions]}


def _index_item(record: dict, kind: str, ids: list[int], score: float, root: Path, out_dir: Path) -> dict:
    """An item of the new index: the source item's keys, this caption, the image path relative to ``out_dir``
    (the new source's data root) and ``capfilt`` (which caption, its score)."""
    item = {k: v for k, v in record.items() if k != "noisy"}
    item["image_path"] = os.path.relpath(Path(root) / record["image_path"], out_dir)
    item["text_segment"] = list(ids)
    item["capfilt"] = {"caption": kind, "score": round(score, 4)}
    if "noisy" in record:
        item["capfilt"]["planted_noise"] = bool(record["noisy"]) and kind == "original"
    return item


def _write_shard(path: Path, kept: list, tokenizer: TextTokenizer) -> None:
    """img2dataset layout: ``key.jpg`` (the source's bytes), ``key.txt`` (the kept caption), ``key.json`` (the
    source's json plus ``capfilt``); a kept synthetic caption gets the key ``<key>_<kind>``."""
    def add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))

    with tarfile.open(path, "w") as tar:
        for sample, kind, ids, score in kept:
            raw = sample["record"]
            key = raw["__key__"] if kind == "original" else f"{raw['__key__']}_{kind}"
            meta = json.loads(raw["json"]) if raw.get("json") else {}
            meta["capfilt"] = {"caption": kind, "score": round(score, 4)}
            text = raw["txt"].decode("utf-8", "replace") if kind == "original" else tokenizer.decode(ids)
            add(tar, f"{key}.jpg", raw["jpg"])
            add(tar, f"{key}.txt", text.encode("utf-8"))
            add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))


def run_units(units: list[WorkUnit], capfilter: CapFilter, root: Path, out_dir: Path, rank: int = 0,
              world_size: int = 1, log: Callable[[str], None] = print) -> int:
    """Process this rank's units (``index % world_size == rank``) that have no stats file yet; returns how many."""
    done = 0
    for unit in units[rank::world_size]:
        if unit_paths(out_dir, unit)[1].is_file():
            continue
        stats = process_unit(unit, capfilter, root, out_dir)
        done += 1
        log(f"[capfilt] rank {rank}: {unit.name}: {stats['samples']} samples, kept {stats['kept_original']} "
            f"original + {stats['kept_synthetic']} synthetic captions, skipped {sum(stats['skipped'].values())}")
    return done


def _histogram_sum(histograms: list[list[int]]) -> list[int]:
    """Bin-wise sum of the units' histograms (all zeros for no unit)."""
    return [sum(column) for column in zip(*histograms)] or [0] * HISTOGRAM_BINS


def merge_units(units: list[WorkUnit], source: str, out_dir: Path, cfg: CapFiltConfig) -> dict:
    """Once every unit is done: the new source (a JSONL source's parts joined into ``<stem>.capfilt.jsonl`` in
    ``out_dir``, image paths relative to ``out_dir``; a shard source's new shards under ``out_dir/shards``) and the
    summed report ``capfilt_report.json``, which it returns."""
    missing = [u.name for u in units if not unit_paths(out_dir, u)[1].is_file()]
    if missing:
        raise RuntimeError(f"{len(missing)} unit(s) of '{source}' are not done ({missing[:3]}...): run again")
    stats = [json.loads(unit_paths(out_dir, u)[1].read_text()) for u in units]
    if units and units[0].items is not None:
        new_source = out_dir / f"{Path(source).stem}.capfilt.jsonl"
        write_jsonl(new_source, (item for u in units for item in read_jsonl(unit_paths(out_dir, u)[0])))
    else:
        new_source = out_dir / "shards"
    samples = sum(s["samples"] for s in stats)
    kept_original, kept_synthetic = sum(s["kept_original"] for s in stats), sum(s["kept_synthetic"] for s in stats)
    skipped: dict[str, int] = {}
    for s in stats:
        for reason, count in s["skipped"].items():
            skipped[reason] = skipped.get(reason, 0) + count
    planted = {k: sum(s["planted"][k] for s in stats) for k in ("noisy", "clean", "noisy_kept", "clean_kept")}
    for label in ("noisy", "clean"):  # the original captions' scores by planted label: how separable they are
        planted[f"{label}_histogram"] = _histogram_sum([s["planted"][f"{label}_histogram"] for s in stats])
    report = {
        "source": source, "new_source": str(new_source), "config": vars(cfg), "units": len(units),
        "samples": samples, "skipped": skipped, "kept_original": kept_original, "kept_synthetic": kept_synthetic,
        "kept_original_fraction": kept_original / samples if samples else 0.0,
        "kept_synthetic_fraction": kept_synthetic / (samples * cfg.num_synthetic) if samples else 0.0,
        "pairs_written": kept_original + kept_synthetic,
        "histogram_bins": [round(i / HISTOGRAM_BINS, 2) for i in range(HISTOGRAM_BINS + 1)],
        "original_histogram": _histogram_sum([s["original_histogram"] for s in stats]),
        "synthetic_histogram": _histogram_sum([s["synthetic_histogram"] for s in stats]),
        "examples": [e for s in stats for e in s["examples"]],
    }
    if planted["noisy"] + planted["clean"]:
        before = planted["noisy"] / (planted["noisy"] + planted["clean"])
        kept = planted["noisy_kept"] + planted["clean_kept"]
        report["planted_noise"] = {
            **planted, "wrong_fraction_before": before,
            "wrong_fraction_after": planted["noisy_kept"] / kept if kept else 0.0,
            "wrong_fraction_of_all_written": (planted["noisy_kept"] / (kept_original + kept_synthetic)
                                              if kept_original + kept_synthetic else 0.0),
            "wrong_removed": 1 - planted["noisy_kept"] / planted["noisy"] if planted["noisy"] else 0.0,
            "right_kept": planted["clean_kept"] / planted["clean"] if planted["clean"] else 0.0,
        }
    (out_dir / "capfilt_report.json").write_text(json.dumps(report, indent=1))
    return report
