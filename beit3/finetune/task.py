"""The interface every fine-tuning task implements (:class:`FinetuneTask`), the context it is given
(:class:`TaskContext`) and :class:`FinetuneObjective`, the module the training engine drives."""
from __future__ import annotations

import random
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch import nn

from beit3.data.transforms import build_finetune_transform
from beit3.engine import Callback
from beit3.text import TextTokenizer

from .data import Collate, SampleDataset, default_collate

DEFAULT_MAX_TEXT_LEN = 64


@dataclass
class TaskContext:
    """What a task reads besides its index items: the data root, the text tokenizer, image/text sizes, the task's
    options section of the config and evaluation settings (beam search)."""

    root: Path
    tokenizer: TextTokenizer
    image_size: int
    max_text_len: int
    randaug: bool = False
    options: Any = None
    min_crop_scale: float = 0.5
    hflip: bool = True
    num_beams: int = 3
    length_penalty: float = 0.6
    max_caption_len: int = 32
    caption_backend: str = "auto"
    references: dict[str, str] = field(default_factory=dict)  # split -> reference file (captioning)
    step: int = 0  # the optimizer step about to run, 0-based (kept by TrainProgress), and the run's length
    train_steps: int = 0

    def transform(self, train: bool) -> Callable:
        return build_finetune_transform(self.image_size, train, self.randaug and train,
                                        min_crop_scale=self.min_crop_scale, hflip=self.hflip)

    def text(self, ids: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """``([bos] + ids + [eos]`` padded to ``max_text_len``, padding mask) of one text segment."""
        tokens, mask = self.tokenizer.pad_ids([ids], self.max_text_len)
        return tokens[0], mask[0]


@dataclass
class EvalResult:
    """Metrics of one evaluation (higher is better for the task's ``metric``) and, where the task has one, the
    predictions file content (a JSON-able list) with its file name stem."""

    metrics: dict[str, float]
    predictions: Optional[list] = None
    predictions_name: str = ""


class FinetuneTask(ABC):
    """One downstream task: which index files and model it uses, how an index item becomes a training or evaluation
    sample, its loss, its per-sample predictions and how they are scored.

    ``indexes`` gives the default index files per split ({"train": [...], "val": name, "test": name}); ``metric`` is the
    key of :class:`EvalResult.metrics` that selects the best checkpoint.
    """

    name: str = ""
    default_model: str = ""
    metric: str = ""
    indexes: dict[str, Any] = {}
    references: dict[str, str] = {}
    max_text_len: int = DEFAULT_MAX_TEXT_LEN
    required_keys: tuple[str, ...] = ("image_path",)
    options_type: Optional[type] = None

    # -- model ---------------------------------------------------------------------------------------------------
    def model_kwargs(self, ctx: TaskContext, train_items: Sequence[dict]) -> dict:
        """Builder arguments derived from the data (e.g. ``num_classes``), used unless the config sets them."""
        return {}

    # -- data ----------------------------------------------------------------------------------------------------
    @abstractmethod
    def train_sample(self, ctx: TaskContext, transform: Callable, item: dict, rng: random.Random) -> dict:
        """One training sample (tensors/ints) from an index item; ``rng`` for the task's own random draws."""

    @abstractmethod
    def eval_sample(self, ctx: TaskContext, transform: Callable, item: dict, rng: random.Random) -> dict:
        """One evaluation sample from an index item."""

    def train_samples(self, ctx: TaskContext, items: list[dict]) -> SampleDataset:
        transform = ctx.transform(train=True)
        return SampleDataset(items, lambda item, rng: self.train_sample(ctx, transform, item, rng))

    def eval_samples(self, ctx: TaskContext, items: list[dict]) -> SampleDataset:
        transform = ctx.transform(train=False)
        return SampleDataset(items, lambda item, rng: self.eval_sample(ctx, transform, item, rng))

    def batch_transform(self, ctx: TaskContext, model: nn.Module) -> Optional[Callable[[dict], dict]]:
        """A transform of whole training batches (mixup/cutmix), run under the batch's seed; None for most tasks."""
        return None

    collate: Collate = staticmethod(default_collate)

    # -- training and evaluation ---------------------------------------------------------------------------------
    @abstractmethod
    def training_loss(self, model: nn.Module, batch: dict, ctx: TaskContext) -> tuple[torch.Tensor, dict]:
        """``(loss, metrics)`` of one training batch."""

    @abstractmethod
    def predict(self, model: nn.Module, batch: dict, ctx: TaskContext) -> list[dict]:
        """Per-sample records (plain Python/CPU tensors) of one evaluation batch; padding rows are dropped later."""

    @abstractmethod
    def score(self, model: nn.Module, records: list[dict], ctx: TaskContext, split: str) -> EvalResult:
        """Metrics (and predictions file) from the records of the whole split; runs on every rank."""


class TrainProgress(Callback):
    """Keeps ``ctx.step`` at the optimizer step about to run (also after a resume), for tasks whose training loss
    follows a schedule (retrieval's FLIP patch dropping, off for the last steps)."""

    def __init__(self, ctx: TaskContext):
        self.ctx = ctx

    def on_train_start(self, ctx) -> None:
        self.ctx.step = ctx.step

    def on_step_end(self, ctx, step: int, metrics: dict) -> None:
        self.ctx.step = step


class FinetuneObjective(nn.Module):
    """What the engine trains: ``forward(batch) -> (loss, metrics)`` of ``task`` on the task ``model``.

    Forwards the engine's optimizer hooks with the ``model.`` prefix: weight-decay exemptions, layer ids for layer
    decay and :meth:`head_parameters` (the task model's ``head*`` parameters, for ``optim.head_lr_weight``).
    """

    def __init__(self, model: nn.Module, task: FinetuneTask, ctx: TaskContext):
        super().__init__()
        self.model, self.task, self.ctx = model, task, ctx

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        loss, metrics = self.task.training_loss(self.model, batch, self.ctx)
        return loss, metrics

    def no_weight_decay(self) -> set[str]:
        return {f"model.{n}" for n in self.model.no_weight_decay()} if hasattr(self.model, "no_weight_decay") else set()

    def num_layers_for_lr_decay(self) -> int:
        return self.model.num_layers_for_lr_decay()

    def get_layer_id(self, name: str) -> int:
        return self.model.get_layer_id(name.removeprefix("model."))

    def head_parameters(self) -> set[str]:
        return {f"model.{n}" for n, _ in self.model.named_parameters() if n.startswith("head")}

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.model.set_grad_checkpointing(enable)
