"""Fine-tuning and evaluation runs: configuration, start-up checks, wiring task -> data -> model -> engine.

``tools/finetune.py`` and ``tools/evaluate.py`` are thin wrappers over :func:`main` and :func:`evaluate_main`;
fine-tuning runs under ``deepspeed`` (any number of ranks) or plain ``python`` (one process).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch
from torch import nn

from beit3.config import ConfigError, load_config, read_yaml, to_dict, write_yaml
from .commands import out_file
from .startup import check_output_dir, check_previous_run, exit_code
from beit3.engine import OptimConfig, TrainConfig, add_common_args, get_rank, get_world_size, init_distributed, train
from beit3.finetune import (TASKS, CaptioningOptions, ClassificationOptions, EvalCallback, EvalResult, FinetuneObjective,
                       FinetuneTask, RetrievalOptions, TaskContext, TrainBatches, TrainProgress, evaluate, read_index,
                       write_predictions)
from beit3.finetune.data import require_keys
from beit3.finetune.evaluation import BEST_DIR, BEST_METRICS_FILE
from beit3.models import CheckpointError, create_model, from_pretrained, load_checkpoint, model_config, read_state_dict
from beit3.models.checkpoint import CONFIG_FILE as MODEL_CONFIG_FILE, saved_model_class
from beit3.models.registry import registered_class
from beit3.models.tasks.zero_shot import require_contrastive_heads
from beit3.text import TextTokenizer

RUN_CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
TaskName = Literal["imagenet", "vqav2", "nlvr2", "coco_retrieval", "flickr30k", "coco_captioning"]


@dataclass
class FinetuneModelConfig:
    """Registry name (empty: the task's base model), overrides (``BEiT3Config`` fields and builder arguments such as
    ``num_classes``, ``itm``) and the checkpoint to start from (official ``.pth``, our ``beit3_pretrained.pth`` or a
    ``save_pretrained`` directory; vision positions are interpolated to the model's image size)."""

    name: str = ""
    overrides: dict = field(default_factory=dict)
    init_from: str = ""


@dataclass
class FinetuneDataConfig:
    """Index files under ``root`` (empty: the task's official names), the text tokenizer (default ``root/beit3.spm``),
    per-rank batch size, image size (0: the model's), RandAugment, the training crop scale and horizontal flip (the
    official recipe: 0.5 and on; off for data whose text speaks of left and right, like the demo's), max text length
    (0: 64, captioning 32) and captioning references per split (merged over ``coco_karpathy_{val,test}_gt.json``)."""

    root: str = "runs/demo/data"  # the demo data of the README; the same default in every tool
    train_index: list[str] = field(default_factory=list)
    val_index: str = ""
    test_index: str = ""
    references: dict = field(default_factory=dict)
    text_tokenizer: str = ""
    batch_size: int = 32
    image_size: int = 0
    randaug: bool = False
    min_crop_scale: float = 0.5
    hflip: bool = True
    max_text_len: int = 0
    num_workers: int = 2

    def __post_init__(self):
        if self.batch_size < 1 or self.num_workers < 0 or self.image_size < 0:
            raise ValueError("data.batch_size must be >= 1 and data.num_workers, data.image_size >= 0")
        if self.max_text_len and self.max_text_len < 3:
            raise ValueError(f"data.max_text_len must be 0 or >= 3, got {self.max_text_len}")
        if not 0.0 < self.min_crop_scale <= 1.0:
            raise ValueError(f"data.min_crop_scale must be in (0, 1], got {self.min_crop_scale}")


@dataclass
class FinetuneEvalConfig:
    """Which split is evaluated during training, how often (``every_steps`` 0: once per epoch, and always after the
    last step), batch size (0: 1.5 x data.batch_size), the metric that picks ``best/`` (empty: the task's) and beam
    search settings for captioning."""

    split: Literal["val", "test"] = "val"
    every_steps: int = 0
    batch_size: int = 0
    metric: str = ""
    num_beams: int = 3
    length_penalty: float = 0.6
    max_len: int = 32
    caption_backend: Literal["auto", "python", "pycocoevalcap"] = "auto"

    def __post_init__(self):
        if self.every_steps < 0 or self.batch_size < 0 or self.num_beams < 1 or self.max_len < 3:
            raise ValueError("eval: every_steps, batch_size must be >= 0, num_beams >= 1, max_len >= 3")


@dataclass
class FinetuneOptions:
    """Task-specific settings; each task reads its own section."""

    classification: ClassificationOptions = field(default_factory=ClassificationOptions)
    captioning: CaptioningOptions = field(default_factory=CaptioningOptions)
    retrieval: RetrievalOptions = field(default_factory=RetrievalOptions)


@dataclass
class FinetuneConfig:
    """Everything a fine-tuning run reads; YAML under ``configs/finetune/`` plus ``--set key=value`` overrides.

    ``epochs`` > 0 sets ``train.steps`` = ceil(epochs x steps per epoch) and ``optim.warmup_steps`` =
    int(warmup_epochs x steps per epoch), steps per epoch = len(train) // (batch_size x ranks x micro_batches).
    """

    task: TaskName = "imagenet"
    output_dir: str = "runs/finetune"
    model: FinetuneModelConfig = field(default_factory=FinetuneModelConfig)
    data: FinetuneDataConfig = field(default_factory=FinetuneDataConfig)
    epochs: float = 0.0
    warmup_epochs: float = 0.0
    eval: FinetuneEvalConfig = field(default_factory=FinetuneEvalConfig)
    options: FinetuneOptions = field(default_factory=FinetuneOptions)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)


_OPTION_SECTIONS = {ClassificationOptions: "classification", CaptioningOptions: "captioning",
                    RetrievalOptions: "retrieval"}


def _indexes(cfg: FinetuneConfig, task: FinetuneTask) -> dict[str, list[str]]:
    d = cfg.data
    return {"train": d.train_index or task.indexes["train"], "val": [d.val_index or task.indexes["val"]],
            "test": [d.test_index or task.indexes["test"]]}


def _tokenizer_path(cfg: FinetuneConfig) -> Path:
    return Path(cfg.data.text_tokenizer) if cfg.data.text_tokenizer else Path(cfg.data.root) / "beit3.spm"


def check_config(cfg: FinetuneConfig, splits: Sequence[str] = ("train",), output: bool = True) -> None:
    """Fail fast, before any process group or model exists, naming the key or file at fault."""
    task = TASKS[cfg.task]
    root = Path(cfg.data.root)
    if not root.is_dir():
        raise ConfigError(f"data.root '{root}' is not a directory (make one with tools/make_demo_data.py)")
    key = {"train": "data.train_index", "val": "data.val_index", "test": "data.test_index"}
    for split in {*splits, cfg.eval.split}:
        for name in _indexes(cfg, task)[split]:
            if not (root / name).is_file():
                raise ConfigError(f"{key[split]}: index file '{root / name}' does not exist")
    if not _tokenizer_path(cfg).is_file():
        raise ConfigError(f"data.text_tokenizer '{_tokenizer_path(cfg)}' does not exist (a SentencePiece model)")
    if cfg.model.init_from and not Path(cfg.model.init_from).exists():
        raise ConfigError(f"model.init_from '{cfg.model.init_from}' does not exist")
    if cfg.task in ("coco_retrieval", "flickr30k") and cfg.options.retrieval.rerank_top_k and not cfg.model.overrides.get("itm"):
        raise ConfigError("options.retrieval.rerank_top_k > 0 needs the ITM head: set model.overrides.itm=true")
    if cfg.task == "coco_captioning" and cfg.train.zero_stage == 3:
        raise ConfigError("train.zero_stage=3 is not supported for coco_captioning: beam search runs a different "
                          "number of forward passes on each rank, which ZeRO-3 parameter gathering cannot follow")
    if output:
        check_output_dir(cfg.output_dir)
        check_previous_run(cfg.output_dir, to_dict(cfg), cfg.train.auto_resume, ("task", "model"), RUN_CONFIG_FILE,
                           ignore=("model.init_from",))


def build_context(cfg: FinetuneConfig, image_size: int) -> TaskContext:
    task = TASKS[cfg.task]
    section = _OPTION_SECTIONS.get(task.options_type)
    return TaskContext(
        root=Path(cfg.data.root), tokenizer=TextTokenizer.from_file(_tokenizer_path(cfg)), image_size=image_size,
        max_text_len=cfg.data.max_text_len or task.max_text_len, randaug=cfg.data.randaug,
        min_crop_scale=cfg.data.min_crop_scale, hflip=cfg.data.hflip,
        options=getattr(cfg.options, section) if section else None, num_beams=cfg.eval.num_beams,
        length_penalty=cfg.eval.length_penalty, max_caption_len=cfg.eval.max_len,
        caption_backend=cfg.eval.caption_backend, references={**task.references, **cfg.data.references},
    )


def _read_items(cfg: FinetuneConfig, split: str) -> list[dict]:
    task = TASKS[cfg.task]
    files = _indexes(cfg, task)[split]
    try:
        items = read_index(cfg.data.root, files)
        require_keys(items, task.required_keys, f"index {files} under '{cfg.data.root}'")
    except (ValueError, FileNotFoundError) as err:
        raise ConfigError(str(err)) from err
    return items


def build_model(cfg: FinetuneConfig, tokenizer: TextTokenizer, train_items: list[dict]) -> nn.Module:
    """The task model from the registry (task-derived builder arguments unless overridden) with ``init_from`` loaded.

    ``vocab_size`` (unless overridden) follows the ``init_from`` checkpoint's text embedding, else the registry's
    value, raised to the text tokenizer's size where that is smaller."""
    task = TASKS[cfg.task]
    name = cfg.model.name or task.default_model
    probe = TaskContext(root=Path(cfg.data.root), tokenizer=tokenizer, image_size=0, max_text_len=0)
    overrides = {**task.model_kwargs(probe, train_items), **cfg.model.overrides}
    state = None
    try:
        if cfg.model.init_from:
            state = read_state_dict(cfg.model.init_from)
            embed = state.get("beit3.text_embed.weight", state.get("text_embed.weight"))
            if embed is not None:
                overrides.setdefault("vocab_size", embed.shape[0])
        if model_config(name).vocab_size < tokenizer.vocab_size:
            overrides.setdefault("vocab_size", tokenizer.vocab_size)
        model = create_model(name, **overrides)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from err
    if model.config.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"model vocab_size {model.config.vocab_size} is smaller than the text tokenizer's "
                          f"{tokenizer.vocab_size} ('{_tokenizer_path(cfg)}')")
    if state is not None:
        try:
            report = load_checkpoint(model, state)
        except CheckpointError as err:
            raise ConfigError(f"model.init_from '{cfg.model.init_from}': {err}") from err
        if get_rank() == 0:
            print(f"[beit3.finetune] loaded {cfg.model.init_from}: {report}", flush=True)
        model.init_report = report  # what the checkpoint held (evaluation refuses untrained heads)
    return model


def _image_size(cfg: FinetuneConfig, model: nn.Module) -> int:
    if cfg.data.image_size and cfg.data.image_size != model.config.img_size:
        raise ConfigError(f"data.image_size={cfg.data.image_size} but the model takes {model.config.img_size} px images")
    return model.config.img_size


def _eval_batch_size(cfg: FinetuneConfig) -> int:
    return cfg.eval.batch_size or max(1, int(1.5 * cfg.data.batch_size))


def run_finetuning(cfg: FinetuneConfig) -> dict:
    """Check the config, build everything for this rank, train with periodic evaluation (auto-resuming from
    ``output_dir``), keep ``best/`` and write ``metrics.json``; returns the metrics written."""
    check_config(cfg, splits=("train",))
    init_distributed()
    rank, world = get_rank(), get_world_size()
    torch.manual_seed(cfg.train.seed)  # identical initial heads on every rank
    task = TASKS[cfg.task]
    train_items = _read_items(cfg, "train")
    eval_items = _read_items(cfg, cfg.eval.split)
    tokenizer = TextTokenizer.from_file(_tokenizer_path(cfg))
    model = build_model(cfg, tokenizer, train_items)
    ctx = build_context(cfg, _image_size(cfg, model))
    batches = TrainBatches(task.train_samples(ctx, train_items), cfg.data.batch_size, seed=cfg.train.seed, rank=rank,
                           world_size=world, collate=task.collate, batch_transform=task.batch_transform(ctx, model),
                           num_workers=cfg.data.num_workers, micro_batches=cfg.train.micro_batches)
    if cfg.epochs > 0:
        cfg.train.steps = max(1, math.ceil(cfg.epochs * batches.steps_per_epoch))
        cfg.optim.warmup_steps = int(cfg.warmup_epochs * batches.steps_per_epoch)
    ctx.train_steps = cfg.train.steps
    metric = cfg.eval.metric or task.metric
    callback = EvalCallback(task, task.eval_samples(ctx, eval_items), ctx, cfg.eval.split, _eval_batch_size(cfg),
                            cfg.eval.every_steps or batches.steps_per_epoch, metric, cfg.data.num_workers)
    if rank == 0:
        write_yaml(Path(cfg.output_dir) / RUN_CONFIG_FILE, to_dict(cfg))
    summary = train(FinetuneObjective(model, task, ctx), batches, cfg.train, cfg.optim, cfg.output_dir,
                    config_snapshot=to_dict(cfg), callbacks=[callback, TrainProgress(ctx)])
    out = Path(cfg.output_dir)
    final = callback.last
    if final is None:  # resumed a finished run: evaluate the final weights once more
        result = evaluate(task, summary["engine"].module.model, callback.samples, ctx, cfg.eval.split,
                          _eval_batch_size(cfg), cfg.data.num_workers)
        final = {"step": summary["step"], "split": cfg.eval.split, "metrics": result.metrics}
    best = json.loads((out / BEST_METRICS_FILE).read_text()) if (out / BEST_METRICS_FILE).is_file() else None
    metrics = {"task": cfg.task, "metric": metric, "steps": summary["step"], "steps_per_epoch": batches.steps_per_epoch,
               "final": final, "best": best, "best_checkpoint": str(out / BEST_DIR)}
    if rank == 0:
        (out / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _load_for_eval(cfg: FinetuneConfig, checkpoint: Path, tokenizer: TextTokenizer) -> nn.Module:
    """A fine-tuned folder of this task's model class as saved; anything else (a pretraining export, an official
    ``.pth``) loaded into the configured model, which must then find its trained heads in it: evaluating random heads
    is refused (for retrieval, trained contrastive heads make it zero-shot evaluation)."""
    if (checkpoint / BEST_DIR / MODEL_CONFIG_FILE).is_file():
        checkpoint = checkpoint / BEST_DIR
    task_class = registered_class(cfg.model.name or TASKS[cfg.task].default_model)
    if (checkpoint / MODEL_CONFIG_FILE).is_file() and saved_model_class(checkpoint) == getattr(task_class, "__name__", None):
        return from_pretrained(checkpoint)
    with_init = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, init_from=str(checkpoint)))
    model = build_model(with_init, tokenizer, _read_items(cfg, "train"))
    report = model.init_report
    try:
        require_contrastive_heads(model, report, str(checkpoint))
    except CheckpointError as err:
        raise ConfigError(str(err)) from None
    heads = sorted(k for k in report.missing if not k.startswith("beit3."))
    if heads:
        raise ConfigError(
            f"'{checkpoint}' has no trained {cfg.task} head (missing: {', '.join(heads[:6])}"
            f"{', ...' if len(heads) > 6 else ''}): evaluating it would score random weights. Fine-tune it first "
            f"(tools/finetune.py --task {cfg.task} --set model.init_from={checkpoint}) and evaluate that run")
    return model


def evaluate_checkpoint(cfg: FinetuneConfig, checkpoint: str | Path, split: str, out: str | Path) -> dict:
    """Evaluate ``checkpoint`` (a fine-tuning run dir, a ``save_pretrained`` dir, or any checkpoint file loaded into
    the configured model: zero-shot evaluation) on ``split``; write the metrics JSON to ``out`` and, for VQAv2 and
    captioning, the submission / caption results file next to it."""
    if split not in ("val", "test"):
        raise ConfigError(f"--split must be 'val' or 'test', got '{split}'")
    cfg.eval.split = split
    checkpoint = Path(checkpoint)
    if not checkpoint.exists():
        raise ConfigError(f"checkpoint '{checkpoint}' does not exist")
    check_config(cfg, splits=(split,), output=False)
    task = TASKS[cfg.task]
    tokenizer = TextTokenizer.from_file(_tokenizer_path(cfg))
    model = _load_for_eval(cfg, checkpoint, tokenizer).to("cuda" if torch.cuda.is_available() else "cpu")
    ctx = build_context(cfg, _image_size(cfg, model))
    result: EvalResult = evaluate(task, model, task.eval_samples(ctx, _read_items(cfg, split)), ctx, split,
                                  _eval_batch_size(cfg), cfg.data.num_workers)
    out = Path(out)
    predictions = write_predictions(result, out.parent, split)
    report = {"task": cfg.task, "split": split, "checkpoint": str(checkpoint), "metrics": result.metrics,
              "predictions_file": str(predictions) if predictions else None}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    return report


def _load(args, default_config: Optional[Path] = None) -> FinetuneConfig:
    path = args.config or (str(default_config) if default_config and default_config.is_file() else None)
    if path is not None and args.task and read_yaml(path).get("task", args.task) != args.task:
        raise ConfigError(f"--task {args.task} but config '{path}' is for task '{read_yaml(path)['task']}'")
    overrides = ([f"task={args.task}"] if args.task else []) + list(args.overrides)
    return load_config(FinetuneConfig, path, overrides)


def _parser(description: str) -> argparse.ArgumentParser:
    parser = add_common_args(argparse.ArgumentParser(description=description))
    parser.add_argument("--task", choices=sorted(TASKS), default=None, help="the task (must match the config's)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser("BEiT-3 fine-tuning").parse_args(argv)
    return exit_code(lambda: run_finetuning(_load(args)))


def evaluate_main(argv: Optional[Sequence[str]] = None) -> int:
    parser = _parser("Evaluate a BEiT-3 task checkpoint")
    parser.add_argument("--checkpoint", required=True, help="fine-tuning run dir, save_pretrained dir or .pth file")
    parser.add_argument("--split", default="val", help="val or test")
    parser.add_argument("--out", required=True, type=out_file, help="metrics JSON to write")
    args = parser.parse_args(argv)
    def evaluate() -> None:
        report = evaluate_checkpoint(_load(args, Path(args.checkpoint) / RUN_CONFIG_FILE), args.checkpoint,
                                     args.split, args.out)
        print(json.dumps(report["metrics"], indent=2))
    return exit_code(evaluate)
