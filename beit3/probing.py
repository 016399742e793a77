"""Held-out evaluation of masked data modeling and the grounding probe: does the model use the other modality?

On a fixed held-out set (:mod:`beit3.data.eval_set`: fixed views, fixed masks drawn from a seed, so two evaluations
of the same weights agree exactly) :func:`evaluate_pretraining` measures, per stream, the masked loss and top-1
accuracy (image MIM, text MLM, pair MIM, pair MLM) and, for pairs, the **grounding gap**: the same texts with the same
masks, read once with each pair's own image and once with another pair's image (pair MLM), and the same images with
their masks read with their own text and with another pair's text (pair MIM). The **word-class probe** masks only the
words of a list (``probe_words``, e.g. colour names) in the held-out captions, the image unmasked, and reports the same
own-minus-other gap: a model that guesses those words from the caption's context scores the same with any image.

Evaluation is sharded over ranks by batch (every rank runs the same number of forward passes, so it works at every
ZeRO stage) and reduced as sums over masked tokens, so the numbers do not depend on the number of ranks or the
batch size. :class:`PretrainEvalCallback` runs it during pretraining and logs ``eval_*`` rows.
"""
from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data.eval_set import (EVAL_STREAMS, EvalSet, PretrainEvalConfig, build_eval_set, resolve_eval_sources,
                            val_counterpart)
from .engine import Callback, all_reduce_, gathered_parameters, get_rank, get_world_size, move_to_device
from .masking import MaskingConfig
from .text import TextTokenizer


class _Sums:
    """Per-metric sums of (loss, correct, count) over masked tokens; reduced over ranks once at the end."""

    def __init__(self):
        self.values: dict[str, list[float]] = {}

    def add(self, name: str, logits: torch.Tensor, targets: torch.Tensor, weight: float) -> None:
        entry = self.values.setdefault(name, [0.0, 0.0, 0.0])
        if not targets.numel() or not weight:
            return
        entry[0] += F.cross_entropy(logits.float(), targets, reduction="sum").item()
        entry[1] += (logits.max(dim=-1).indices == targets).sum().item()
        entry[2] += targets.numel()

    def reduce(self, names: Sequence[str], device) -> dict[str, tuple[float, float, float]]:
        buf = torch.tensor([self.values.get(n, [0.0, 0.0, 0.0]) for n in names], dtype=torch.float64, device=device)
        all_reduce_(buf, "sum")
        return {n: tuple(buf[i].tolist()) for i, n in enumerate(names)}


_IMAGE_KEYS = ("image", "codes", "image_mask")
_TEXT_KEYS = ("text_tokens", "padding_mask", "text_mask", "text_targets")


def eval_jobs(eval_set: EvalSet) -> list[tuple[dict[str, str], dict[str, torch.Tensor]]]:
    """Every forward pass of an evaluation as (metric name per head, inputs), in one fixed order: the image and text
    streams; pairs with their own and with another pair's image (same text, same masks); per probe class the captions
    with only that class's words masked, whole image, own and other."""
    jobs = []
    if "image" in eval_set.streams:
        jobs.append(({"mim": "image"}, eval_set.streams["image"]))
    if "text" in eval_set.streams:
        jobs.append(({"mlm": "text"}, eval_set.streams["text"]))
    if "pair" in eval_set.streams:
        pair = eval_set.streams["pair"]
        images = {k: pair[k] for k in _IMAGE_KEYS if k in pair}
        texts = {k: pair[k] for k in _TEXT_KEYS}
        jobs.append(({"mim": "pair_image", "mlm": "pair_text"}, pair))
        jobs.append(({"mim": "pair_image_other", "mlm": "pair_text_other"},
                     {**_rows(images, eval_set.other), **texts}))
        for name, probe in eval_set.probes.items():
            rows = probe["samples"]
            text = {**_rows(texts, rows), "text_tokens": probe["text_tokens"][rows], "text_mask": probe["text_mask"][rows]}
            jobs.append(({"mlm": f"probe_{name}"}, {"image": pair["image"][rows], **text}))
            jobs.append(({"mlm": f"probe_{name}_other"}, {"image": pair["image"][eval_set.other[rows]], **text}))
    return jobs


def _rows(batch: dict[str, torch.Tensor], index: torch.Tensor) -> dict[str, torch.Tensor]:
    return {k: v[index] for k, v in batch.items()}


def evaluate_pretraining(model: nn.Module, eval_set: EvalSet, batch_size: int = 32, device=None,
                         float_dtype: Optional[torch.dtype] = None) -> dict[str, float]:
    """Metrics of a :class:`~beit3.models.pretraining.BEiT3ForPretraining` on ``eval_set`` (eval mode, no grad),
    identical on every rank: ``loss_*``/``acc_*`` per stream (``image``, ``text``, ``pair_image``, ``pair_text``, and
    ``pair_{image,text}_other`` with another pair's text / image), ``grounding_gap_{text,image}`` (own minus other
    accuracy) and per probe class ``probe_<name>_acc``, ``_acc_other``, ``_gap``, ``_tokens``. Accuracies are
    fractions of masked tokens, losses means per masked token.

    Batches are dealt to ranks round-robin and every rank runs the same number of forward passes (a rank short of a
    batch repeats one with weight 0), which ZeRO-3's parameter gathering needs."""
    device = device or next(model.parameters()).device
    rank, world = get_rank(), get_world_size()
    sums = _Sums()
    jobs = eval_jobs(eval_set)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for names, inputs in jobs:
                n = next(iter(inputs.values())).shape[0]
                starts = list(range(0, n, batch_size))
                for b in range(rank, math.ceil(len(starts) / world) * world, world):
                    real = b < len(starts)
                    start = starts[b] if real else 0
                    chunk = move_to_device({k: v[start : start + batch_size] for k, v in inputs.items()}, device,
                                           float_dtype)
                    logits = model(images=chunk.get("image"), image_mask=chunk.get("image_mask"),
                                   text_tokens=chunk.get("text_tokens"), padding_mask=chunk.get("padding_mask"),
                                   text_mask=chunk.get("text_mask"))
                    if "mim" in names and "image_mask" in chunk:
                        sums.add(names["mim"], logits["mim"], chunk["codes"][chunk["image_mask"]], float(real))
                    if "mlm" in names:
                        sums.add(names["mlm"], logits["mlm"], chunk["text_targets"][chunk["text_mask"]], float(real))
    finally:
        model.train(was_training)
    names = sorted({name for job_names, _ in jobs for name in job_names.values()})
    return summarize_sums(sums.reduce(names, device))


def summarize_sums(totals: dict[str, tuple[float, float, float]]) -> dict[str, float]:
    """Losses, accuracies and gaps from the summed ``(loss, correct, count)`` of each metric name."""
    out: dict[str, float] = {}
    for name, (loss, correct, count) in totals.items():
        if not count:
            continue
        if name.startswith("probe_"):
            base = name.removesuffix("_other")
            out[f"{base}_acc{'_other' if name.endswith('_other') else ''}"] = correct / count
            out[f"{base}_tokens"] = count
        else:
            out[f"loss_{name}"] = loss / count
            out[f"acc_{name}"] = correct / count
    for modality in ("text", "image"):
        if f"acc_pair_{modality}" in out and f"acc_pair_{modality}_other" in out:
            out[f"grounding_gap_{modality}"] = out[f"acc_pair_{modality}"] - out[f"acc_pair_{modality}_other"]
    for key in [k for k in out if k.startswith("probe_") and k.endswith("_acc")]:
        if f"{key}_other" in out:
            out[f"{key[: -len('_acc')]}_gap"] = out[key] - out[f"{key}_other"]
    return out


def eval_summary_line(step: int, metrics: dict[str, float]) -> str:
    """One line for the console: the grounding gaps and probe gaps in points, and the stream accuracies."""
    parts = []
    for modality in ("text", "image"):
        if f"grounding_gap_{modality}" in metrics:
            parts.append(f"pair-{'MLM' if modality == 'text' else 'MIM'} {100 * metrics[f'acc_pair_{modality}']:.1f} "
                         f"own / {100 * metrics[f'acc_pair_{modality}_other']:.1f} other "
                         f"(gap {100 * metrics[f'grounding_gap_{modality}']:+.1f})")
    for key in sorted(k for k in metrics if k.startswith("probe_") and k.endswith("_gap")):
        name = key[len("probe_") : -len("_gap")]
        parts.append(f"{name} words {100 * metrics[f'probe_{name}_acc']:.1f} / "
                     f"{100 * metrics[f'probe_{name}_acc_other']:.1f} (gap {100 * metrics[key]:+.1f})")
    for stream in ("image", "text"):
        if f"acc_{stream}" in metrics:
            parts.append(f"{stream} acc {100 * metrics[f'acc_{stream}']:.1f}")
    return f"[beit3.eval] step {step}: " + "; ".join(parts)


class PretrainEvalCallback(Callback):
    """Runs :func:`evaluate_pretraining` every ``every_steps`` optimizer steps and after the last one, on every rank;
    rank 0 logs the metrics as one ``log.jsonl`` row of ``eval_*`` keys (TensorBoard: ``eval/*``) and prints
    :func:`eval_summary_line`."""

    def __init__(self, eval_set: EvalSet, every_steps: int, batch_size: int):
        self.eval_set, self.every_steps, self.batch_size = eval_set, every_steps, batch_size
        self.last: Optional[dict] = None

    def on_step_end(self, ctx, step: int, metrics: dict) -> None:
        if step % self.every_steps and step != ctx.train_cfg.steps:
            return
        start = time.time()
        float_dtype = torch.bfloat16 if ctx.train_cfg.precision == "bf16" else None
        with gathered_parameters(ctx.engine):
            result = evaluate_pretraining(ctx.engine.module.model, self.eval_set, self.batch_size, ctx.engine.device,
                                          float_dtype)
        record = {"step": step, **{f"eval_{k}": v for k, v in result.items()}, "eval_seconds": time.time() - start,
                  "timestamp": time.time()}
        self.last = record
        ctx.monitor.log(record)
        ctx.monitor.message(eval_summary_line(step, result))


# the training sources whose val-split counterparts a checkpoint probe reads by default (the official index names)
DEFAULT_TRAIN_SOURCES = {"image": "imagenet.train.index.jsonl", "pair": "coco_retrieval.train.jsonl",
                         "text": "corpus.txt"}


def probe_pretrained(
    checkpoint: str | Path,
    data_root: str | Path,
    *,
    model_name: str = "",
    visual_tokenizer: str = "",
    text_tokenizer: str = "",
    eval_cfg: Optional[PretrainEvalConfig] = None,
    masking: Optional[MaskingConfig] = None,
    train_sources: Optional[dict[str, str]] = None,
    max_text_len: int = 64,
    device: Optional[torch.device] = None,
) -> dict:
    """The held-out evaluation of a pretraining run, on a checkpoint: our export (``save_pretrained`` directory or its
    ``beit3_pretrained.pth``) or an official BEiT-3 pretrained ``.pth`` (``model_name`` names its architecture).

    Held-out sources: ``eval_cfg``'s, else the val-split counterparts of ``train_sources`` (default: the official
    index names) that exist under ``data_root``. Image and pair streams need ``visual_tokenizer`` (ours or an official
    VQ-KD ``.pth``) for their codes and are left out without one. Returns a JSON-able report."""
    from .models.pretraining import load_pretraining_model
    from .data.codes import visual_codes_fn

    eval_cfg = eval_cfg or PretrainEvalConfig()
    masking = masking or MaskingConfig()
    root = Path(data_root)
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_pretraining_model(checkpoint, model_name).to(device)
    text_path = Path(text_tokenizer) if text_tokenizer else root / "beit3.spm"
    if not text_path.is_file():
        raise FileNotFoundError(f"text tokenizer '{text_path}' does not exist (a SentencePiece model, e.g. beit3.spm)")
    tokenizer = TextTokenizer.from_file(text_path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"text tokenizer '{text_path}' has {tokenizer.vocab_size} ids, the model's vocabulary "
                         f"{model.config.vocab_size}: not the tokenizer this model was trained with")
    trained = {**DEFAULT_TRAIN_SOURCES, **(train_sources or {})}
    streams = EVAL_STREAMS if visual_tokenizer else ("text", "pair")
    sources = resolve_eval_sources(eval_cfg, root, trained["image"], trained["pair"], [trained["text"]], streams)
    codes_fn = None
    notes = []
    if visual_tokenizer:
        codes_fn, _ = visual_codes_fn(visual_tokenizer, "auto", device, model.config.img_size)
    elif "pair" in sources:
        notes.append("no visual tokenizer given: pair MIM and the image stream are not measured")
    if not sources:
        raise FileNotFoundError(f"no held-out source under '{root}' (tried {sorted(val_counterpart(v) for v in trained.values())})")
    grid = model.config.img_size // model.config.patch_size
    eval_set = build_eval_set(sources, root, tokenizer, image_size=model.config.img_size,
                              tokenizer_image_size=model.config.img_size, patch_grid=(grid, grid), masking=masking,
                              codes_fn=codes_fn, max_samples=eval_cfg.max_samples, max_text_len=max_text_len,
                              seed=eval_cfg.seed, probe_words=eval_cfg.probe_words)
    start = time.time()
    metrics = evaluate_pretraining(model, eval_set, eval_cfg.batch_size, device)
    return {"checkpoint": str(checkpoint), "data_root": str(root), "sources": sources,
            "num_samples": eval_set.num_samples(),
            "probe_captions": {k: int(len(v["samples"])) for k, v in eval_set.probes.items()},
            "seed": eval_cfg.seed, "seconds": time.time() - start, "notes": notes, "metrics": metrics}
