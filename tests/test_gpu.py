"""The checks a GPU must pass (marker ``gpu``; ``benchmarks/gpu_check.sh`` runs them): bf16 + SDPA against fp32,
a DeepSpeed ZeRO-2 and ZeRO-3 pretraining step on one device, ``torch.compile`` without graph breaks.

On a machine with CUDA they run on the GPU. Without one they are skipped, unless ``BEIT3_GPU_DRY_RUN=1`` (set by
``gpu_check.sh --dry-run``, which CI runs): then the same code paths run on the CPU with tiny models.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beit3.demo.data import make_demo_data
from beit3.models.pretraining import BEiT3ForPretraining
from beit3.models.registry import create_model, model_config
from helpers import tool_env

pytestmark = pytest.mark.gpu
ROOT = Path(__file__).resolve().parents[1]
DRY_RUN = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def device():
    if torch.cuda.is_available():
        return torch.device("cuda")
    if os.environ.get("BEIT3_GPU_DRY_RUN") == "1":
        return torch.device("cpu")
    pytest.skip("no CUDA device (BEIT3_GPU_DRY_RUN=1 runs these on the CPU)")


def _model_name() -> str:
    return "beit3_tiny_patch8_32" if DRY_RUN else "beit3_base_patch16_224"


def _pair_inputs(cfg, batch: int, device, padded: bool = True):
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, cfg.img_size, cfg.img_size, generator=gen)
    tokens = torch.randint(4, cfg.vocab_size, (batch, 24), generator=gen)
    padding = torch.zeros(batch, 24, dtype=torch.bool)
    if padded:
        padding[0, 16:] = True
    return images.to(device), tokens.to(device), padding.to(device)


def _relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_bf16_sdpa_matches_fp32(device):
    """The backbone under bf16 autocast (SDPA: flash for unpadded image batches on a GPU, the memory-efficient kernel
    with a padding bias) against fp32: relative error of the final hidden states <= 2%."""
    model = create_model(_model_name()).to(device).eval()
    images, tokens, padding = _pair_inputs(model_config(_model_name()), 4, device)
    with torch.no_grad():
        for kwargs in ({"visual_tokens": images},
                       {"visual_tokens": images, "textual_tokens": tokens, "text_padding_position": padding}):
            reference = model(**kwargs)["encoder_out"]
            with torch.autocast(device.type, dtype=torch.bfloat16):
                if device.type == "cuda" and "textual_tokens" not in kwargs:
                    from torch.nn.attention import SDPBackend, sdpa_kernel
                    with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):  # fails if flash cannot take this call
                        fast = model(**kwargs)["encoder_out"]
                else:
                    fast = model(**kwargs)["encoder_out"]
            assert not torch.equal(fast, reference)  # autocast did compute in bf16
            assert _relative_error(fast, reference) <= 0.02, (list(kwargs), _relative_error(fast, reference))


def test_compile_traces_backbone_and_pretraining_without_graph_breaks(device):
    """``torch._dynamo.explain`` of the backbone (padded pair) and of the pretraining forward (masked image and text
    positions, contrastive and matching heads), with the data-dependent shapes captured as ``compile_model`` sets:
    no graph break. The last-layer selection of ``masked_only_last_layer`` is not covered: its width depends on the
    masks and SDPA guards on it (3 breaks, recorded by gpu_check.sh)."""
    import torch._dynamo

    from beit3.bench.common import compile_model

    compile_model(torch.nn.Identity())  # sets the capture options
    cfg = model_config(_model_name())
    backbone = create_model(_model_name()).to(device).eval()
    images, tokens, padding = _pair_inputs(cfg, 2, device)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(backbone)(visual_tokens=images, textual_tokens=tokens,
                                                 text_padding_position=padding)
    assert explained.graph_break_count == 0, explained.break_reasons
    pre = BEiT3ForPretraining(cfg, codebook_size=64, contrastive=True, matching=True).to(device)
    image_mask = torch.zeros(2, cfg.num_patches, dtype=torch.bool, device=device)
    image_mask[:, : cfg.num_patches // 3] = True
    text_mask = torch.zeros(2, tokens.shape[1], dtype=torch.bool, device=device)
    text_mask[:, 2:5] = True
    torch._dynamo.reset()
    explained = torch._dynamo.explain(pre)(images=images, image_mask=image_mask, text_tokens=tokens,
                                            padding_mask=padding, text_mask=text_mask)
    assert explained.graph_break_count == 0, explained.break_reasons


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo data and a freshly initialised visual tokenizer of the demo's shape (the step, not the codes, is tested)."""
    from tokenizer import VQKD, save_tokenizer, vqkd_config

    base = tmp_path_factory.mktemp("gpu")
    make_demo_data(base / "data", num_images=60, image_size=64, seed=0)
    save_tokenizer(VQKD(vqkd_config("vqkd_demo", img_size=64, patch_size=8, codebook_size=1024, code_dim=32)),
                   base / "tok")
    return base


@pytest.mark.parametrize("stage", [2, 3])
def test_deepspeed_zero_pretraining_step_on_one_device(demo, device, stage):
    """tools/pretrain.py as one process (one rank) under DeepSpeed ZeRO-``stage`` in bf16: 3 steps, finite losses,
    a checkpoint saved."""
    out = demo / f"zero{stage}"
    sets = [f"data.root={demo / 'data'}", f"tokenizer.path={demo / 'tok'}", f"output_dir={out}", "train.steps=3",
            "train.log_every=1", "train.save_every=3", f"train.zero_stage={stage}", "train.precision=bf16",
            "data.num_workers=0", "data.image_batch=4", "data.text_batch=4", "data.pair_batch=4",
            "eval.every_steps=0"]
    cmd = [sys.executable, str(ROOT / "tools/pretrain.py"), "--config", str(ROOT / "configs/pretrain/demo.yaml"),
           *[arg for item in sets for arg in ("--set", item)]]
    proc = subprocess.run(cmd, env=tool_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses))), rows
    assert (out / "checkpoints" / "latest").read_text().strip() == "step00000003"
