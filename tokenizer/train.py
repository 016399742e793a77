"""VQ-KD training objective and the pieces a training tool needs around it.

* ``TokenizerObjectiveConfig``: the model + teacher section of a tokenizer training config.
* ``build_tokenizer_objective(cfg)``: a ``VQKDObjective`` whose ``forward(images_01)`` returns
  ``(loss, metrics)``; ``loss = rec_loss + quant_loss`` (per-token cosine regression to the teacher's features plus
  the commitment loss, unweighted as official). The step's code ids are kept in ``objective.last_codes``.
* ``CodeUsageTracker``: fraction of codes used and code perplexity over the last N steps (counts all-reduced).
* ``save_usage_histogram(counts, path)``: PNG of per-code usage.
* ``code_informativeness(tokenizer, images, teacher)``: held-out reconstruction loss with each image's own codes vs.
  codes shuffled across images. Usage alone does not show that codes mean anything: a decoder that ignores its input
  and predicts the mean target gets the same loss either way (relative gap 0) while usage can still be ~100%.
* ``VQKDObjective.no_weight_decay()``: names exempt from weight decay besides 1-D tensors and biases: cls_token, pos_embed and
  the codebook (the official ``no_weight_decay`` set).
"""
from __future__ import annotations

import collections
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from beit3.config import ConfigError, from_dict, to_dict
from beit3.comm import all_reduce_
from tokenizer.teachers import FrozenTeacher, TeacherConfig, build_teacher
from tokenizer.vqkd import VQKD, VQKDConfig, vqkd_config

NO_DECAY_SUFFIXES = ("cls_token", "pos_embed", "quantize.embedding.weight")


@dataclass
class TokenizerObjectiveConfig:
    """Model + teacher section of a tokenizer training config.

    ``arch`` names a ``tokenizer.vqkd.NAMED_CONFIGS`` entry, ``model`` overrides its fields. ``target_dim`` is taken
    from the teacher; setting it to another value is an error.
    """

    arch: str = "vqkd_demo"
    model: dict = field(default_factory=dict)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    usage_window: int = 100  # training steps over which codebook usage and perplexity are reported

    def resolve_model(self, target_dim: int) -> VQKDConfig:
        """The VQ-KD config: named arch, then ``model`` overrides, then the teacher's target dimension."""
        requested = self.model.get("target_dim", target_dim)
        if requested != target_dim:
            raise ConfigError(f"config key 'model.target_dim' is {requested} but the teacher gives {target_dim}-d "
                              "features; remove it (it is taken from the teacher)")
        base = to_dict(vqkd_config(self.arch))
        return from_dict(VQKDConfig, {**base, **self.model, "target_dim": target_dim}, prefix="model")


def code_perplexity(counts: torch.Tensor) -> float:
    """``exp(entropy)`` of the code frequencies (1 = collapse, ``len(counts)`` = uniform)."""
    probs = counts.double() / counts.sum().clamp(min=1)
    return float(torch.exp(-(probs * probs.clamp(min=1e-30).log()).sum()))


def cosine_regression_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``1 - cos(prediction_i, target_i)`` (official ``rec_loss_type='cosine'``), in fp32."""
    prediction, target = F.normalize(prediction.float(), dim=-1), F.normalize(target.float(), dim=-1)
    return (1.0 - (prediction * target).sum(-1)).mean()


class CodeUsageTracker:
    """Per-code counts over the last ``window`` updates; usage fraction and perplexity of the code distribution.

    With ``distributed=True`` each update's counts are summed over ranks (every rank must call ``update``).
    """

    def __init__(self, num_codes: int, window: int = 100, distributed: bool = True):
        if window < 1:
            raise ValueError(f"CodeUsageTracker window must be >= 1, got {window}")
        self.num_codes, self.distributed = num_codes, distributed
        self.history: collections.deque[torch.Tensor] = collections.deque(maxlen=window)
        self.total = torch.zeros(num_codes, dtype=torch.long)

    @torch.no_grad()
    def update(self, codes: torch.Tensor) -> None:
        """Add a batch of code ids (any shape)."""
        counts = torch.bincount(codes.reshape(-1), minlength=self.num_codes)
        if self.distributed:
            counts = all_reduce_(counts)
        counts = counts.cpu()
        if len(self.history) == self.history.maxlen:
            self.total -= self.history[0]
        self.history.append(counts)
        self.total += counts

    def reset(self) -> None:
        self.history.clear()
        self.total.zero_()

    def counts(self) -> torch.Tensor:
        """Per-code counts over the window, ``[num_codes]`` long."""
        return self.total.clone()

    def usage(self) -> float:
        """Fraction of codes used at least once in the window."""
        return float((self.total > 0).float().mean())

    def perplexity(self) -> float:
        """Perplexity of the code frequencies in the window."""
        return code_perplexity(self.total)


class VQKDObjective(nn.Module):
    """Tokenizer + frozen teacher; ``forward(images_01 [B,3,H,W] in [0,1]) -> (loss, metrics)``.

    Metrics (detached scalars): ``rec_loss``, ``quant_loss``, ``total_loss`` and, over the tracker's window of
    training steps, ``codebook_usage`` and ``code_perplexity``. The step's code ids ``[B,N]`` are in ``last_codes``.
    """

    def __init__(self, tokenizer: VQKD, teacher: FrozenTeacher, usage_window: int = 100):
        super().__init__()
        self.tokenizer = tokenizer
        self.teacher = teacher.requires_grad_(False)
        self.usage = CodeUsageTracker(tokenizer.config.codebook_size, usage_window)
        self.last_codes: torch.Tensor | None = None

    def no_weight_decay(self) -> set[str]:
        """Trainable names exempt from weight decay besides 1-D tensors and biases (official ``no_weight_decay``)."""
        return {name for name, _ in self.named_parameters() if name.endswith(NO_DECAY_SUFFIXES)}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        out = self.tokenizer(images)
        target = self.teacher(images)
        if target.shape[:2] != out.reconstruction.shape[:2]:
            raise ValueError(f"teacher gives {target.shape[1]} tokens per image, the tokenizer "
                             f"{out.reconstruction.shape[1]}: their patch grids must match")
        rec_loss = cosine_regression_loss(out.reconstruction, target)
        loss = rec_loss + out.quant_loss
        self.last_codes = out.codes.detach()
        if self.training:
            self.usage.update(self.last_codes)
        metrics = {"rec_loss": rec_loss.detach(), "quant_loss": out.quant_loss.detach(), "total_loss": loss.detach(),
                   "codebook_usage": torch.tensor(self.usage.usage()),
                   "code_perplexity": torch.tensor(self.usage.perplexity())}
        return loss, metrics


def build_tokenizer_objective(cfg: TokenizerObjectiveConfig) -> VQKDObjective:
    """Build teacher and tokenizer from ``cfg``; checks that their patch grids agree."""
    patch_size = cfg.model.get("patch_size", vqkd_config(cfg.arch).patch_size)
    teacher = build_teacher(cfg.teacher, int(patch_size))
    model_cfg = cfg.resolve_model(teacher.feature_dim)
    teacher_patches = getattr(teacher, "num_patches", None)
    if teacher_patches is not None and teacher_patches != model_cfg.num_patches:
        raise ConfigError(f"teacher '{cfg.teacher.model_name}' sees {teacher_patches} patches but the tokenizer "
                          f"{model_cfg.num_patches} ({model_cfg.img_size}px / patch {model_cfg.patch_size}); "
                          "set teacher.model_kwargs.img_size or the tokenizer's img_size/patch_size to match")
    return VQKDObjective(VQKD(model_cfg), teacher, cfg.usage_window)


def save_usage_histogram(counts: torch.Tensor, path: str | Path, title: str = "codebook usage") -> Path:
    """Write a PNG of per-code counts sorted by frequency (log scale), annotated with usage and perplexity."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = counts.detach().cpu().double()
    perplexity = code_perplexity(counts)
    used = int((counts > 0).sum())
    fig = Figure(figsize=(8, 3.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(range(len(counts)), counts.sort(descending=True).values.numpy(), width=1.0)
    ax.set_yscale("symlog")
    ax.set_xlabel("codes, most used first")
    ax.set_ylabel("count")
    ax.set_title(f"{title}: {used}/{len(counts)} used ({used / len(counts):.1%}), perplexity {perplexity:.1f}")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


@torch.no_grad()
def code_informativeness(model: VQKD | VQKDObjective, images: torch.Tensor, teacher: FrozenTeacher | None = None,
                         batch_size: int = 64, seed: int = 0) -> dict[str, float]:
    """Do the codes carry information about the image? Held-out check on ``images [B,3,S,S]`` in [0,1] (B >= 2).

    Decodes every image from its own codes (``rec_loss_true``) and from the codes of another image at the same
    positions (``rec_loss_shuffled``; a derangement, so no image keeps its own codes), both scored with the
    official cosine loss against ``teacher`` (taken from an objective when not given). Returns::

        rec_loss_true, rec_loss_shuffled
        relative_gap         (shuffled - true) / shuffled; ~0 when the decoder ignores its codes
        rec_loss_mean_target loss of predicting the per-position mean target of these images (a code-free baseline)
        code_stability       fraction of codes identical in two encodings of the same images (eval mode)
        codebook_usage       fraction of the codebook used on these images
        code_perplexity      perplexity of the code distribution on these images
        codes_per_position   mean number of distinct codes per patch position across images
        codes_per_image      mean number of distinct codes within one image

    Runs in eval mode (no codebook or usage-statistic update) and restores the previous mode.
    """
    if isinstance(model, VQKDObjective):
        teacher = teacher if teacher is not None else model.teacher
        model = model.tokenizer
    if teacher is None:
        raise ValueError("code_informativeness needs a teacher (or a VQKDObjective that holds one)")
    if images.shape[0] < 2:
        raise ValueError(f"code_informativeness needs at least 2 images, got {images.shape[0]}")
    was_training = model.training
    model.eval()
    try:
        codes, again, targets = [], [], []
        for chunk in images.split(batch_size):
            codes.append(model.get_codebook_indices(chunk))
            again.append(model.get_codebook_indices(chunk))
            targets.append(teacher(chunk).float())
        codes, again, targets = torch.cat(codes), torch.cat(again), torch.cat(targets)
        num = codes.shape[0]
        order = torch.randperm(num, generator=torch.Generator().manual_seed(seed))
        donor = torch.empty_like(order)
        donor[order] = order.roll(1)  # image order[i] gets the codes of image order[i-1]: never its own

        def rec_loss(code_ids: torch.Tensor) -> float:
            total = 0.0
            for ids, target in zip(code_ids.split(batch_size), targets.split(batch_size)):
                prediction = model.decode(model.quantize.embedding(ids))
                total += float(cosine_regression_loss(prediction, target)) * ids.shape[0]
            return total / num

        true_loss, shuffled_loss = rec_loss(codes), rec_loss(codes[donor])
        mean_target = F.normalize(targets, dim=-1).mean(0, keepdim=True).expand_as(targets)
        counts = torch.bincount(codes.reshape(-1), minlength=model.config.codebook_size)
        return {
            "rec_loss_true": true_loss,
            "rec_loss_shuffled": shuffled_loss,
            "relative_gap": (shuffled_loss - true_loss) / max(shuffled_loss, 1e-12),
            "rec_loss_mean_target": float(cosine_regression_loss(mean_target, targets)),
            "code_stability": float((codes == again).float().mean()),
            "codebook_usage": float((counts > 0).float().mean()),
            "code_perplexity": code_perplexity(counts),
            "codes_per_position": float(sum(col.unique().numel() for col in codes.t()) / codes.shape[1]),
            "codes_per_image": float(sum(row.unique().numel() for row in codes) / num),
        }
    finally:
        model.train(was_training)
