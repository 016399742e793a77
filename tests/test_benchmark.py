"""Smoke test of the training-step benchmark (tiny model): the JSON has every field, all positive. No timing limits."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

from helpers import tool_env

ROOT = Path(__file__).resolve().parents[1]


def test_quick_suite_writes_complete_json(tmp_path):
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "benchmark.py"), "--suite", "quick", "--threads", "1", "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=tool_env(OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1")),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| backbone_pair |" in proc.stdout
    results = json.loads(out.read_text())
    assert results["peak_flops"] > 0 and results["peak_source"]
    cases = results["cases"]
    for name in ("backbone_image", "backbone_text", "backbone_pair", "pretrain_precomputed", "pretrain_online",
                 "pretrain_deepspeed", "pretrain_pixels_visible", "pretrain_pixels_full", "contrastive_flip",
                 "contrastive_full", "tokenizer_encode"):
        case = cases[name]
        for key in ("step_s", "samples_per_s", "tokens_per_s", "flops_per_step", "achieved_tflops", "mfu", "peak_mem_mb"):
            assert math.isfinite(case[key]) and case[key] > 0, (name, key, case[key])
        assert len(case["step_s_all"]) == results["config"]["repeats"]
    assert cases["data_loading"]["images_per_s_per_worker"] > 0
    assert results["comparisons"]["pretrain_precomputed_vs_backbone_pair"] > 0
    # the visible-only encoder and FLIP's dropping do fewer FLOPs per step than their baselines (not a timing claim)
    assert cases["pretrain_pixels_visible"]["flops_per_step"] < cases["pretrain_pixels_full"]["flops_per_step"]
    assert cases["contrastive_flip"]["flops_per_step"] < cases["contrastive_full"]["flops_per_step"]
    assert results["comparisons"]["speedup_mae_visible_only"] > 0 and results["comparisons"]["speedup_flip_patch_drop"] > 0


def test_checkpointing_every_k_runs_in_process():
    from beit3.bench.common import SUITES, BenchConfig
    from beit3.bench.run import run

    preset = SUITES["quick"]
    bench = BenchConfig(model=preset["model"], batch=2, text_len=8, repeats=1, warmup=0, baselines=False,
                        checkpointing="every_k", checkpoint_every=2, cases=("backbone_pair",))
    results = run(bench, log=lambda _: None)
    assert results["cases"]["backbone_pair"]["samples_per_s"] > 0


def test_encoder_block_compiles_without_graph_breaks():
    import torch

    import beit3

    model = beit3.create_model("beit3_tiny_patch8_32").train()
    layer = model.encoder.layers[0]
    image, text = torch.randn(2, 17, 64), torch.randn(2, 8, 64)
    bias = torch.zeros(2, 1, 1, 25)
    for split, parts, attn_bias in ((17, [image, text], bias), (-1, [image], None), (0, [text], None)):
        explained = torch._dynamo.explain(lambda *p: layer.forward_parts(list(p), split, attn_bias))(*parts)
        assert explained.graph_break_count == 0, explained.break_reasons
        assert explained.graph_count == 1


def test_pretraining_flops_count_only_the_work_the_loss_needs():
    from beit3.bench.pretraining import pretrain_flops
    from beit3.models.registry import model_config

    cfg = model_config("beit3_tiny_patch8_32")  # d 64, d_ff 256, depth 2
    d, f, batch, seq, patches, text = 64, 256, 2, 25, 7, 3
    expected = 0.0
    for layer in range(2):
        for token in range(batch * seq):
            read = layer == 0 or token < patches + text  # the last layer: full work only where a head reads
            weights = 4 * d * d + 2 * d * f if read else 2 * d * d  # else the key and value projections alone
            expected += 6 * weights + (12 * d * seq if read else 0)  # QK^T and AV rows of its query, fwd + bwd
    expected += 6 * d * (8192 * patches + 1000 * text)
    assert math.isclose(pretrain_flops(cfg, batch, seq, patches, text), expected, rel_tol=1e-12)


def test_deepspeed_step_trains_the_tiny_model_under_zero3_bf16_with_checkpointing():
    import torch

    from beit3.bench.common import BenchConfig, make_inputs
    from beit3.bench.pretraining import deepspeed_pretrain_step, pretrain_batch_fn
    from beit3.models.registry import model_config

    bench = BenchConfig(model="beit3_tiny_patch8_32", batch=2, text_len=8, precision="bf16", zero_stage=3,
                        deepspeed_config=str(ROOT / "configs" / "deepspeed" / "zero3.json"), checkpointing="all",
                        cases=("pretrain_deepspeed",))
    cfg = model_config(bench.model)
    make_batch, _ = pretrain_batch_fn(cfg, make_inputs(cfg, 2, 8, torch.device("cpu"), 0), bench, torch.device("cpu"))
    step = deepspeed_pretrain_step(cfg, bench, lambda: make_batch(None))
    losses = [float(step()) for _ in range(6)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses
