"""Visual tokenizer (VQ-KD) training run on the shared engine: configuration, start-up checks, training, and the
final artefacts (``OUT/tokenizer/`` for ``load_tokenizer(OUT)``, held-out code usage, a usage histogram PNG).

``tools/train_tokenizer.py`` is a thin wrapper over :func:`main`; launch it with ``deepspeed`` or ``python``.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch import nn

from tokenizer import VQKD, load_tokenizer, save_tokenizer
from tokenizer.precomputed import eval_transform, load_precomputed_codes, read_jsonl_index, tokenize_images
from tokenizer.teachers import FrozenTeacher
from tokenizer.train import (
    TokenizerObjectiveConfig,
    VQKDObjective,
    build_tokenizer_objective,
    code_informativeness,
    code_perplexity,
    save_usage_histogram,
)

from beit3.config import ConfigError, load_config, to_dict, write_yaml
from beit3.data.pretrain import PretrainDataConfig, build_pretrain_batches
from beit3.data.transforms import device_views
from beit3.engine import (OptimConfig, TrainConfig, add_common_args, barrier, build_deepspeed_config,
                     check_checkpoint_space, export_consolidated_state_dict, get_rank, get_world_size,
                     init_distributed, train)
from .startup import check_data, check_output_dir, check_previous_run, exit_code

RUN_CONFIG_FILE = "config.yaml"
TOKENIZER_DIR = "tokenizer"
EVAL_FILE = "tokenizer_eval.json"
HISTOGRAM_FILE = "codebook_usage.png"


def _image_only_data() -> PretrainDataConfig:
    return PretrainDataConfig(text_batch=0, pair_batch=0, image_batch=64, image_size=64, tokenizer_image_size=64)


@dataclass
class HeldOutConfig:
    """Held-out images (a JSONL index relative to ``data.root``) coded at the end to measure codebook usage."""

    index: str = "imagenet.val.index.jsonl"
    max_images: int = 2000  # images coded for codebook usage
    informativeness_images: int = 256  # images decoded from true vs shuffled codes (held in memory)


@dataclass
class TokenizerTrainingConfig:
    """A tokenizer training run; YAML under ``configs/tokenizer/`` plus ``--set key=value`` overrides."""

    output_dir: str = "runs/tokenizer"
    objective: TokenizerObjectiveConfig = field(default_factory=TokenizerObjectiveConfig)
    data: PretrainDataConfig = field(default_factory=_image_only_data)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    held_out: HeldOutConfig = field(default_factory=HeldOutConfig)


class TokenizerTraining(nn.Module):
    """Engine adapter: feeds the tokenizer view of the image stream to the VQ-KD objective."""

    def __init__(self, objective: VQKDObjective):
        super().__init__()
        self.objective = objective

    def no_weight_decay(self) -> set[str]:
        return {f"objective.{name}" for name in self.objective.no_weight_decay()}

    def forward(self, batch: dict) -> tuple[torch.Tensor, dict]:
        images = device_views(batch["image"])["tokenizer_image"]  # jittered on the device the batch is on
        loss, metrics = self.objective(images)
        return loss, {**metrics, "num_samples": torch.tensor(float(images.shape[0]))}


def check_config(cfg: TokenizerTrainingConfig) -> None:
    """Fail fast, naming the key or path at fault."""
    if cfg.data.text_batch or cfg.data.pair_batch:
        raise ConfigError("tokenizer training reads images only: set data.text_batch=0 and data.pair_batch=0")
    if not cfg.data.image_batch:
        raise ConfigError("data.image_batch must be > 0")
    if cfg.train.zero_stage > 2:
        raise ConfigError("train.zero_stage must be 0, 1 or 2 for tokenizer training: the EMA codebook is updated in place")
    if cfg.train.precision != "fp32":
        raise ConfigError("train.precision must be fp32 for tokenizer training: the EMA codebook must not be cast to bf16")
    check_data(cfg.data, streams=("image",))
    build_deepspeed_config(cfg.train)  # a missing or malformed train.deepspeed_config file
    check_output_dir(cfg.output_dir)
    check_previous_run(cfg.output_dir, to_dict(cfg), cfg.train.auto_resume, ("objective",), RUN_CONFIG_FILE)


def held_out_report(tok: VQKD, teacher: FrozenTeacher, cfg: TokenizerTrainingConfig) -> dict:
    """Code the held-out images (fixed center crops): usage, perplexity, a histogram PNG, and whether the codes carry
    information (reconstruction from each image's own codes vs from another image's, ``code_informativeness``)."""
    out = Path(cfg.output_dir)
    index = Path(cfg.data.root) / cfg.held_out.index
    if not index.is_file():
        raise ConfigError(f"held_out.index '{index}' does not exist")
    paths = read_jsonl_index(index)[: cfg.held_out.max_images]
    codes_dir = tokenize_images(tok, cfg.data.root, paths, out / "held_out_codes")
    _, codes = load_precomputed_codes(codes_dir, mmap=False)
    counts = torch.from_numpy(np.bincount(codes.reshape(-1).astype(np.int64), minlength=tok.config.codebook_size))
    save_usage_histogram(counts, out / HISTOGRAM_FILE, title=f"held-out codes ({len(paths)} images)")
    view = eval_transform(tok.config.img_size)
    subset = paths[: cfg.held_out.informativeness_images]
    images = torch.stack([view(Image.open(Path(cfg.data.root) / p).convert("RGB")) for p in subset])
    informative = code_informativeness(tok, images, teacher)
    return {
        "held_out_images": len(paths),
        "held_out_codebook_usage": float((counts > 0).float().mean()),
        "held_out_code_perplexity": code_perplexity(counts),
        "codebook_size": tok.config.codebook_size,
        **{f"held_out_{k}": informative[k] for k in ("rec_loss_true", "rec_loss_shuffled", "relative_gap")},
    }


def finish(cfg: TokenizerTrainingConfig, objective: VQKDObjective) -> dict:
    """Rank 0: consolidate the last checkpoint into ``OUT/tokenizer/`` and measure held-out usage."""
    state = export_consolidated_state_dict(cfg.output_dir)
    prefix = "objective.tokenizer."
    tok = VQKD(objective.tokenizer.config)
    tok.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}, strict=True)
    save_tokenizer(tok, Path(cfg.output_dir) / TOKENIZER_DIR)
    report = held_out_report(load_tokenizer(Path(cfg.output_dir) / TOKENIZER_DIR), objective.teacher, cfg)
    (Path(cfg.output_dir) / EVAL_FILE).write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_tokenizer_training(cfg: TokenizerTrainingConfig) -> dict:
    """Check, build and train; rank 0 then writes the tokenizer and its held-out evaluation."""
    check_config(cfg)
    init_distributed()
    rank = get_rank()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
    objective = build_tokenizer_objective(cfg.objective)
    if objective.tokenizer.config.img_size != cfg.data.tokenizer_image_size:
        raise ConfigError(
            f"data.tokenizer_image_size={cfg.data.tokenizer_image_size} but the tokenizer takes "
            f"{objective.tokenizer.config.img_size} px images (objective.model.img_size)"
        )
    try:
        batches = build_pretrain_batches(cfg.data, None, rank=rank, world_size=get_world_size(), seed=cfg.train.seed)
        batches.check_batch_sizes()
    except (OSError, ValueError) as err:
        raise ConfigError(f"data: {err}") from err
    model = TokenizerTraining(objective)
    check_checkpoint_space(model, cfg.output_dir)
    if rank == 0:  # only once every check passed: a failing start overwrites nothing
        write_yaml(Path(cfg.output_dir) / RUN_CONFIG_FILE, to_dict(cfg))
    result = train(model, batches, cfg.train, cfg.optim, cfg.output_dir, config_snapshot=to_dict(cfg))
    barrier()
    if rank == 0:
        result["held_out"] = finish(cfg, objective)
        print(json.dumps(result["held_out"]))
    barrier()
    return result


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description="Train a VQ-KD visual tokenizer"))
    args = parser.parse_args(argv)
    return exit_code(lambda: run_tokenizer_training(load_config(TokenizerTrainingConfig, args.config, args.overrides)))
