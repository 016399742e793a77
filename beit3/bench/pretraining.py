"""Pretraining-step cases of the benchmark (see :mod:`beit3.bench.run`): the masked pair batch, the objective's
fwd + bwd with precomputed codes or the online VQ-KD tokenizer, and the whole DeepSpeed training step (ZeRO stage,
bf16 master-weight mode, optimizer) as ``tools/pretrain.py`` runs it, plus the model FLOPs these steps need. The
objective runs as the base/large/giant configs set it: ``masked_only_last_layer=True``."""
from __future__ import annotations

from typing import Callable

import torch

from beit3.bench.common import BenchConfig, configure_model, maybe_compile, sequence_flops
from beit3.models.backbone import BEiT3Config

PRETRAIN_CASES = ("pretrain_precomputed", "pretrain_online", "pretrain_deepspeed")


def head_flops(dim: int, classes: int, positions: int) -> float:
    return 6.0 * dim * classes * positions


def pretrain_flops(cfg: BEiT3Config, batch: int, seq: int, masked_patches: int, masked_text: int,
                   codebook_size: int = 8192) -> float:
    """Training FLOPs of a pair pretraining step: the trunk less the last layer's work for the positions no head
    reads (only their keys and values are needed), plus the MIM and MLM heads on the masked positions."""
    d, f = cfg.embed_dim, cfg.ffn_dim
    unread = batch * seq - masked_patches - masked_text
    skipped = 6.0 * (2 * d * d + 2 * d * f) * unread + 12.0 * d * seq * unread
    return (batch * sequence_flops(cfg, seq) - skipped + head_flops(d, codebook_size, masked_patches)
            + head_flops(d, cfg.vocab_size, masked_text))


def build_tokenizer(bench: BenchConfig, cfg: BEiT3Config, device: torch.device):
    from tokenizer.vqkd import VQKD, vqkd_config

    tcfg = vqkd_config(bench.tokenizer, img_size=cfg.img_size, patch_size=cfg.patch_size, kmeans_init=False)
    return VQKD(tcfg).to(device).eval().requires_grad_(False)


def tokenizer_images(tokenizer, batch: int, device: torch.device) -> torch.Tensor:
    size = tokenizer.config.img_size
    return torch.rand(batch, 3, size, size, generator=torch.Generator().manual_seed(1)).to(device)


def pretrain_batch_fn(cfg: BEiT3Config, inputs: dict, bench: BenchConfig, device: torch.device):
    """A function making a masked pair batch (``PretrainInputs.prepare``) and the model FLOPs of its step."""
    from beit3.masking import MaskingConfig
    from beit3.masking import PretrainInputs

    grid = cfg.img_size // cfg.patch_size
    masking = MaskingConfig()
    state = {"tok_images": None}

    def make(tokenizer) -> dict:
        pair = {"image": inputs["images"].cpu(), "text_tokens": inputs["tokens"].cpu(), "padding_mask": inputs["padding"].cpu()}
        codes_fn = None
        if tokenizer is None:
            pair["codes"] = torch.randint(0, 8192, (bench.batch, grid * grid), generator=torch.Generator().manual_seed(2))
        else:
            if state["tok_images"] is None:
                state["tok_images"] = tokenizer_images(tokenizer, bench.batch, device)
            pair["tokenizer_image"] = state["tok_images"]

            def codes_fn(images):
                with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=bench.precision == "bf16"):
                    return tokenizer.get_codebook_indices(images).cpu()
        prep = PretrainInputs([], masking, (grid, grid), mask_token_id=3, random_token_range=(4, cfg.vocab_size),
                              special_token_ids=(0, 1, 2), codes_fn=codes_fn, seed=bench.seed)
        batch = prep.prepare({"pair": pair})
        return {s: {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in b.items()} for s, b in batch.items()}

    sample = make(None)["pair"]
    masked_patches = int(sample["image_mask"].sum())
    masked_text = int(sample["text_mask"].sum())
    return make, pretrain_flops(cfg, bench.batch, cfg.num_patches + 1 + bench.text_len, masked_patches, masked_text)


def pretraining_cases(pre, cfg: BEiT3Config, inputs: dict, bench: BenchConfig, device: torch.device, tokenizer):
    """The requested pretraining step functions and their model FLOPs (the online one needs ``tokenizer``; ``pre`` is
    the shared model of the plain cases, ``pretrain_deepspeed`` builds its own)."""
    fns: dict[str, Callable[[], None]] = {}
    if not any(case in bench.cases for case in PRETRAIN_CASES):
        return fns, {}
    make_batch, step_flops = pretrain_batch_fn(cfg, inputs, bench, device)
    if "pretrain_precomputed" in bench.cases or "pretrain_online" in bench.cases:
        objective = maybe_compile(pre, bench)
        if "pretrain_precomputed" in bench.cases:
            fns["pretrain_precomputed"] = pretrain_step(objective, lambda: make_batch(None))
        if "pretrain_online" in bench.cases and tokenizer is not None:
            fns["pretrain_online"] = pretrain_step(objective, lambda: make_batch(tokenizer))
    if "pretrain_deepspeed" in bench.cases:
        fns["pretrain_deepspeed"] = deepspeed_pretrain_step(cfg, bench, lambda: make_batch(None))
    return fns, {name: step_flops for name in fns}


def pretrain_step(pre, make_batch: Callable[[], dict]) -> Callable[[], None]:
    from beit3.masked_data_modeling import MaskedDataModeling, ObjectiveConfig

    objective = MaskedDataModeling(pre, ObjectiveConfig(masked_only_last_layer=True))

    def step() -> None:
        objective.zero_grad(set_to_none=True)
        loss, _ = objective(make_batch())
        loss.backward()
    return step




def deepspeed_pretrain_step(cfg: BEiT3Config, bench: BenchConfig, make_batch: Callable[[], dict]) -> Callable[[], torch.Tensor]:
    """The training step of ``tools/pretrain.py`` (:func:`beit3.engine.train_step`) on a fresh model: a DeepSpeed
    engine (``bench.zero_stage``, optional ``bench.deepspeed_config``, bf16 master-weight mode for ``precision=bf16``,
    clipping 3.0) around the objective, then fwd, bwd, the ranks' non-finite agreement and the AdamW step; the step
    returns its loss. Starts a one-rank process group when no launcher did."""
    from beit3.engine import OptimConfig, TrainConfig, init_distributed, train_step
    from beit3.engine.build import build_engine
    from beit3.models.pretraining import BEiT3ForPretraining
    from beit3.masked_data_modeling import MaskedDataModeling, ObjectiveConfig

    init_distributed()
    model = BEiT3ForPretraining(cfg, codebook_size=8192)
    configure_model(model, bench)
    objective = MaskedDataModeling(model, ObjectiveConfig(masked_only_last_layer=True))
    train_cfg = TrainConfig(precision=bench.precision, zero_stage=bench.zero_stage,
                            deepspeed_config=bench.deepspeed_config)
    engine, optimizer, _, _, _ = build_engine(objective, train_cfg, OptimConfig())
    float_dtype = torch.bfloat16 if bench.precision == "bf16" else None

    def step() -> torch.Tensor:
        return train_step(engine, optimizer, [make_batch()], float_dtype=float_dtype).values["loss"][0]
    return step
