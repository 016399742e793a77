"""Pretraining run: configuration, start-up checks, and the wiring data -> masking/codes -> objective -> engine.

``tools/pretrain.py`` is a thin wrapper over :func:`main`; launch it with ``deepspeed`` (any number of ranks and
nodes) or plain ``python`` (one process).
"""
from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Sequence

import torch

from beit3.config import ConfigError, load_config, to_dict, write_yaml
from beit3.data.codes import read_codes_meta
from beit3.data.eval_set import PretrainEvalConfig, build_eval_set, resolve_eval_sources
from beit3.errors import CheckpointError
from .startup import check_data, check_output_dir, check_previous_run, check_readable_file, exit_code
from beit3.data.pretrain import PretrainDataConfig, build_pretrain_batches
from beit3.engine import (
    OptimConfig,
    TrainConfig,
    add_common_args,
    build_deepspeed_config,
    check_checkpoint_space,
    export_consolidated_state_dict,
    get_local_rank,
    get_rank,
    get_world_size,
    init_distributed,
    train,
)
from beit3.models import load_checkpoint, model_config, save_pretrained
from beit3.models.pretraining import BEiT3ForPretraining
from beit3.data.codes import visual_codes_fn
from beit3.masked_data_modeling import STAGE_STREAMS, MaskedDataModeling, ObjectiveConfig, apply_stage
from beit3.masking import PretrainInputs
from beit3.probing import PretrainEvalCallback
from beit3.text import TextTokenizer


RUN_CONFIG_FILE = "config.yaml"
OFFICIAL_EXPORT_FILE = "beit3_pretrained.pth"


@dataclass
class PretrainModelConfig:
    """Which backbone to pretrain: a registry name, config overrides, and an optional checkpoint to start from."""

    name: str = "beit3_base_patch16_224"
    overrides: dict = field(default_factory=dict)
    init_from: str = ""


@dataclass
class PretrainTokenizerConfig:
    """The frozen visual tokenizer (``path``: a directory from ``tools/train_tokenizer.py`` or an official VQ-KD
    ``.pth``) and the text tokenizer (``text``: a SentencePiece model; default ``<data.root>/beit3.spm``)."""

    path: str = ""
    text: str = ""
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPUs, fp32 on CPUs


@dataclass
class PretrainConfig:
    """Everything a pretraining run reads; YAML under ``configs/pretrain/`` plus ``--set key=value`` overrides."""

    output_dir: str = "runs/pretrain"
    model: PretrainModelConfig = field(default_factory=PretrainModelConfig)
    tokenizer: PretrainTokenizerConfig = field(default_factory=PretrainTokenizerConfig)
    data: PretrainDataConfig = field(default_factory=PretrainDataConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    eval: PretrainEvalConfig = field(default_factory=PretrainEvalConfig)


def eval_sources(cfg: PretrainConfig) -> dict[str, str]:
    """The held-out source of each trained stream that has one (``eval.*``, or the data root's val-split files);
    empty when ``eval.every_steps`` is 0. Image-bearing streams need a visual tokenizer (``tokenizer.path``) for
    their codes and are left out without one."""
    if not cfg.eval.every_steps:
        return {}
    batch = {"image": cfg.data.image_batch, "text": cfg.data.text_batch, "pair": cfg.data.pair_batch}
    streams = [s for s in STAGE_STREAMS[cfg.objective.stage] if batch[s]]
    if cfg.objective.image_target == "pixels":  # pairs evaluate their MLM and probes; no codes for a MIM accuracy
        streams = [s for s in streams if s != "image"]
    elif not cfg.tokenizer.path:
        streams = [s for s in streams if s == "text"]
    try:
        return resolve_eval_sources(cfg.eval, Path(cfg.data.root), cfg.data.image_source, cfg.data.pair_source,
                                    cfg.data.text_sources, streams)
    except FileNotFoundError as err:
        raise ConfigError(str(err)) from err


def check_config(cfg: PretrainConfig) -> None:
    """Fail fast, before any process group or model exists, naming the key or path at fault."""
    streams = STAGE_STREAMS[cfg.objective.stage]
    batch = {"image": cfg.data.image_batch, "text": cfg.data.text_batch, "pair": cfg.data.pair_batch}
    extra = [s for s in batch if batch[s] and s not in streams]
    if extra:
        raise ConfigError(
            f"objective.stage='{cfg.objective.stage}' trains only the {'/'.join(streams)} stream(s) but "
            f"data.{extra[0]}_batch={batch[extra[0]]}; set it to 0"
        )
    if not any(batch[s] for s in streams):
        raise ConfigError(f"objective.stage='{cfg.objective.stage}' needs a non-zero data.{streams[0]}_batch")
    if (cfg.objective.itc_weight or cfg.objective.itm_weight) and ("pair" not in streams or cfg.data.pair_batch < 2):
        raise ConfigError("objective.itc_weight / itm_weight need the pair stream with data.pair_batch >= 2 "
                          f"(objective.stage='{cfg.objective.stage}', data.pair_batch={cfg.data.pair_batch})")
    check_data(cfg.data, streams)
    build_deepspeed_config(cfg.train)  # a missing or malformed train.deepspeed_config file
    needs_codes = (batch["image"] or batch["pair"]) and cfg.objective.image_target == "vqkd"
    codes_dir = Path(cfg.data.root) / cfg.data.codes_dir
    if needs_codes and cfg.data.codes_dir:
        if not codes_dir.is_dir():
            raise ConfigError(f"data.codes_dir '{codes_dir}' does not exist (write it with tools/tokenize_dataset.py)")
    elif needs_codes and not cfg.tokenizer.path:
        raise ConfigError("tokenizer.path is empty: image and pair streams need a visual tokenizer (tools/train_tokenizer.py)")
    elif needs_codes and not Path(cfg.tokenizer.path).exists():
        raise ConfigError(f"tokenizer.path '{cfg.tokenizer.path}' does not exist")
    text_path = text_tokenizer_path(cfg)
    if not text_path.is_file():
        raise ConfigError(f"tokenizer.text '{text_path}' does not exist (a SentencePiece model, e.g. beit3.spm)")
    check_readable_file(text_path, "tokenizer.text")
    if cfg.model.init_from and not Path(cfg.model.init_from).exists():
        raise ConfigError(f"model.init_from '{cfg.model.init_from}' does not exist")
    eval_sources(cfg)
    check_output_dir(cfg.output_dir)
    check_previous_run(cfg.output_dir, to_dict(cfg), cfg.train.auto_resume, ("model",), RUN_CONFIG_FILE,
                       ignore=("model.init_from",))


def text_tokenizer_path(cfg: PretrainConfig) -> Path:
    return Path(cfg.tokenizer.text) if cfg.tokenizer.text else Path(cfg.data.root) / "beit3.spm"


def image_target_kwargs(objective: ObjectiveConfig) -> dict:
    """The pretraining model's image-target arguments: none for VQ-KD codes, the decoder's sizes for pixels."""
    if objective.image_target == "vqkd":
        return {}
    return {"image_target": "pixels", "pixel_decoder": to_dict(objective.pixel_decoder)}


def _device() -> torch.device:
    return torch.device("cuda", get_local_rank()) if torch.cuda.is_available() else torch.device("cpu")


def _check_grid(code_patches: int, model_patches: int, source: str, model_cfg) -> None:
    if code_patches != model_patches:
        raise ConfigError(
            f"{source} gives {code_patches} codes per image, the model has {model_patches} patches: the patch grids "
            f"must match (model img_size/patch_size = {model_cfg.img_size}/{model_cfg.patch_size})"
        )


def build_pretraining(cfg: PretrainConfig, rank: int = 0, world_size: int = 1) -> tuple[MaskedDataModeling, PretrainInputs]:
    """The objective module (what the engine trains) and its resumable, masked input stream for this rank."""
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank (ZeRO-3 partitions each rank's own)
    try:
        text_tok = TextTokenizer.from_file(text_tokenizer_path(cfg))
    except (OSError, ValueError) as err:
        raise ConfigError(f"tokenizer.text: {err}") from err
    overrides = dict(cfg.model.overrides)
    overrides.setdefault("vocab_size", text_tok.vocab_size)
    try:
        model_cfg = model_config(cfg.model.name, **overrides)
    except (KeyError, TypeError, ValueError) as err:
        raise ConfigError(f"model: {err}") from err
    if model_cfg.vocab_size < text_tok.vocab_size:
        raise ConfigError(
            f"model vocab_size {model_cfg.vocab_size} is smaller than the text tokenizer's {text_tok.vocab_size} "
            f"('{text_tokenizer_path(cfg)}')"
        )
    if cfg.data.image_size != model_cfg.img_size:
        raise ConfigError(f"data.image_size={cfg.data.image_size} but model '{cfg.model.name}' takes {model_cfg.img_size} px images")
    grid = model_cfg.img_size // model_cfg.patch_size
    codes_fn, codebook_size = None, None
    pixels = cfg.objective.image_target == "pixels"
    needs_codes = (cfg.data.image_batch or cfg.data.pair_batch) and not pixels  # MAE: images are their own targets
    if needs_codes and cfg.data.codes_dir:
        meta = read_codes_meta(Path(cfg.data.root) / cfg.data.codes_dir)
        codebook_size = int(meta["codebook_size"])
        _check_grid(int(meta["num_patches"]), grid * grid, f"precomputed codes '{cfg.data.codes_dir}'", model_cfg)
    elif needs_codes:
        try:
            codes_fn, tok = visual_codes_fn(cfg.tokenizer.path, cfg.tokenizer.precision, _device(), cfg.data.tokenizer_image_size)
        except (CheckpointError, OSError, ValueError) as err:
            raise ConfigError(f"tokenizer.path '{cfg.tokenizer.path}': {err}") from err
        codebook_size = tok.config.codebook_size
        _check_grid(tok.config.num_patches, grid * grid, f"visual tokenizer '{cfg.tokenizer.path}' at data.tokenizer_image_size={cfg.data.tokenizer_image_size}", model_cfg)
    model = BEiT3ForPretraining(model_cfg, codebook_size=codebook_size or 8192,
                                contrastive=cfg.objective.itc_weight > 0, matching=cfg.objective.itm_weight > 0,
                                **image_target_kwargs(cfg.objective))
    if cfg.model.init_from:
        try:
            load_checkpoint(model, cfg.model.init_from)
        except CheckpointError as err:
            raise ConfigError(f"model.init_from: {err}") from err
    apply_stage(model, cfg.objective.stage)
    try:
        batches = build_pretrain_batches(cfg.data, text_tok, rank=rank, world_size=world_size, seed=cfg.train.seed)
        batches.check_batch_sizes()
    except (OSError, ValueError) as err:
        raise ConfigError(f"data: {err}") from err
    inputs = PretrainInputs(
        batches,
        cfg.objective.masking,
        (grid, grid),
        mask_token_id=text_tok.mask_id,
        random_token_range=(text_tok.unk_id + 1, text_tok.mask_id),
        special_token_ids=(text_tok.bos_id, text_tok.pad_id, text_tok.eos_id),
        codes_fn=codes_fn,
        seed=cfg.train.seed,
        rank=rank,
        device=_device(),
        pixel_targets=pixels,
    )
    return MaskedDataModeling(model, cfg.objective), inputs


def build_eval_callbacks(cfg: PretrainConfig, inputs: PretrainInputs) -> list[PretrainEvalCallback]:
    """The held-out evaluation of this run (``eval:``) as an engine callback, or none (with a one-line notice)."""
    sources = eval_sources(cfg)
    if not sources:
        if cfg.eval.every_steps and get_rank() == 0:
            print(f"[beit3.eval] held-out evaluation off: no val-split source under '{cfg.data.root}' "
                  f"(set eval.image_index / eval.pair_index / eval.text_source{'' if cfg.tokenizer.path else ' and tokenizer.path'})",
                  file=sys.stderr, flush=True)
        return []
    codes_fn = inputs.codes_fn
    if codes_fn is None and set(sources) - {"text"} and cfg.objective.image_target == "vqkd":
        codes_fn, _ = visual_codes_fn(cfg.tokenizer.path, cfg.tokenizer.precision, _device(), cfg.data.tokenizer_image_size)
    grid = inputs.block_masks.height, inputs.block_masks.width
    try:
        eval_set = build_eval_set(
            sources, cfg.data.root, TextTokenizer.from_file(text_tokenizer_path(cfg)), image_size=cfg.data.image_size,
            tokenizer_image_size=cfg.data.tokenizer_image_size, patch_grid=grid, masking=cfg.objective.masking,
            codes_fn=codes_fn, max_samples=cfg.eval.max_samples, max_text_len=cfg.data.max_text_len, seed=cfg.eval.seed,
            probe_words=cfg.eval.probe_words)
    except (OSError, ValueError) as err:
        raise ConfigError(f"eval: {err}") from err
    if get_rank() == 0:
        counts = ", ".join(f"{s} {n} ('{sources[s]}')" for s, n in eval_set.num_samples().items())
        probes = ", ".join(f"{k} ({len(v['samples'])} captions)" for k, v in eval_set.probes.items())
        print(f"[beit3.eval] held-out evaluation every {cfg.eval.every_steps} steps: {counts}"
              + (f"; probes: {probes}" if probes else ""), file=sys.stderr, flush=True)
    return [PretrainEvalCallback(eval_set, cfg.eval.every_steps, cfg.eval.batch_size)]


def run_pretraining(cfg: PretrainConfig) -> dict:
    """Check the config, build everything for this rank and train (auto-resuming from ``output_dir``)."""
    check_config(cfg)
    init_distributed()
    objective, inputs = build_pretraining(cfg, get_rank(), get_world_size())
    callbacks = build_eval_callbacks(cfg, inputs)
    check_checkpoint_space(objective, cfg.output_dir)
    if get_rank() == 0:  # only once every check passed: a failing start overwrites nothing
        write_yaml(Path(cfg.output_dir) / RUN_CONFIG_FILE, to_dict(cfg))
    return train(objective, inputs, cfg.train, cfg.optim, cfg.output_dir, config_snapshot=to_dict(cfg),
                 callbacks=callbacks)


def export_pretrained(run_dir: str | Path, out_dir: str | Path) -> Path:
    """Consolidate the latest checkpoint of a pretraining run (any ZeRO stage) into ``out_dir``:
    ``config.json`` + ``model.safetensors`` (``from_pretrained``), the run's text tokenizer as ``beit3.spm``, a model
    card, and ``beit3_pretrained.pth``, the official layout
    (``{"model": {beit3.*, mim_head.*, mlm_head.*}}``; ``pixel_decoder.*`` in place of ``mim_head`` for MAE targets) that ``load_checkpoint`` and the official fine-tuning code read."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    cfg = load_config(PretrainConfig, run_dir / RUN_CONFIG_FILE)
    state = {k[len("model.") :]: v for k, v in export_consolidated_state_dict(run_dir).items() if k.startswith("model.")}
    if "mlm_head.weight" not in state or not {"mim_head.weight", "pixel_decoder.pred.weight"} & state.keys():
        raise ConfigError(f"'{run_dir}' holds no pretraining checkpoint (no mlm_head and mim_head / pixel_decoder in "
                          "its latest checkpoint)")
    overrides = {"vocab_size": state["beit3.text_embed.weight"].shape[0], **cfg.model.overrides}
    heads = {**BEiT3ForPretraining.heads_of(state), **image_target_kwargs(cfg.objective)}
    model = BEiT3ForPretraining(model_config(cfg.model.name, **overrides), **heads)
    load_checkpoint(model, state, strict=True)
    text_path = text_tokenizer_path(cfg)
    save_pretrained(model, out_dir, text_tokenizer=text_path if text_path.is_file() else None)
    torch.save({"model": {k: v.contiguous() for k, v in model.state_dict().items()}}, out_dir / OFFICIAL_EXPORT_FILE)
    return out_dir


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = add_common_args(argparse.ArgumentParser(description="BEiT-3 masked data modeling pretraining"))
    args = parser.parse_args(argv)
    return exit_code(lambda: run_pretraining(load_config(PretrainConfig, args.config, args.overrides)))
