"""Training-step benchmarks: throughput, model-FLOP utilisation (MFU) and peak memory of the BEiT-3 steps.

Cases (each timed after warm-up, over several repeats, median reported):

- ``backbone_{image,text,pair}``: fwd + bwd of the backbone on an image, text or image-text batch;
- ``pretrain_{precomputed,online}``: the pair stream of the pretraining objective (masking, backbone, MIM/MLM heads on
  masked positions, cross-entropy, bwd) with precomputed visual codes or with the VQ-KD tokenizer run every step;
- ``pretrain_deepspeed``: the whole training step under DeepSpeed (ZeRO stage ``zero_stage``, bf16 master-weight mode
  for ``precision=bf16``, AdamW step included) on a model of its own: the case for peak memory (e.g. giant, ZeRO-3,
  activation checkpointing, one GPU);
- ``pretrain_pixels_{visible,full}`` and ``contrastive_{flip,full}``: MAE's visible-only encoder and FLIP's patch
  dropping, each beside its baseline (:mod:`beit3.bench.variants`);
- ``tokenizer_encode``: ``VQKD.get_codebook_indices`` on a batch (no grad);
- ``data_loading``: :func:`beit3.bench.data_loading.measure_loading` (one worker, decode + two-view transform);
- same-run baselines when importable: ``torchscale_{image,text,pair}`` (the official torchscale ``BEiT3`` holding the
  *same* weights, outputs checked against ours) and ``timm_vit_image`` (``vit_base_patch16_224``-shaped ViT of the
  same width/depth as the model); both in :mod:`beit3.bench.baselines`.

Model FLOPs follow ``6·N·T + 12·L·d·T²`` per sequence (N = L·(4d² + 2·d·d_ff) active parameters per token; embeddings,
norms and activations excluded); a pretraining step adds ``6·d·C`` per masked position for the heads and drops the
last layer's work past keys and values for the positions no head reads
(:func:`beit3.bench.pretraining.pretrain_flops`). MFU = FLOPs / step time / peak; the CPU peak is measured with a
large matmul in the benchmark's precision, GPU peaks come from the vendor table. Timings exclude the optimizer step,
except ``pretrain_deepspeed`` (whose FLOPs still count the model only).
"""
from __future__ import annotations

import tempfile
from dataclasses import asdict
from typing import Callable

import torch

from beit3.models.backbone import BEiT3, BEiT3Config
from beit3.models.registry import model_config

# Dense peak TFLOP/s per GPU (bf16 tensor cores; fp32 runs as TF32 with torch.backends.cuda.matmul.allow_tf32).
from beit3.bench.baselines import timm_vit, torchscale_twin, vit_step
from beit3.bench.common import (BenchConfig, Timer, backbone_kwargs, backbone_step, configure_model,
    environment, gpu_peak, make_inputs, maybe_compile, measure_cpu_peak, sequence_flops,
    tokens_of)
from beit3.bench.data_loading import measure_loading
from beit3.bench.pretraining import build_tokenizer, pretraining_cases, tokenizer_images
from beit3.bench.variants import FLIP_CASES, MAE_CASES, variant_cases
from beit3.demo.data import make_demo_data
from beit3.models.pretraining import BEiT3ForPretraining


def run(bench: BenchConfig, log: Callable[[str], None] = print) -> dict:
    """Run the benchmark; returns the JSON-able results."""

    device = torch.device(bench.device)
    torch.manual_seed(bench.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    cfg = model_config(bench.model, **bench.model_overrides)
    dtype = torch.bfloat16 if bench.precision == "bf16" else torch.float32
    if bench.precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be fp32 or bf16, got '{bench.precision}'")

    if device.type == "cuda":
        peak, peak_source = gpu_peak(bench.precision)
    else:
        peak = measure_cpu_peak(dtype)
        peak_source = f"measured: 2048^3 {bench.precision} matmul, {torch.get_num_threads()} threads"
    log(f"[bench] model={bench.model} batch={bench.batch} text_len={bench.text_len} precision={bench.precision} "
        f"device={device} peak={peak / 1e12:.3f} TFLOP/s ({peak_source})")

    results: dict = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(bench).items()},
        "environment": environment(device),
        "peak_flops": peak, "peak_source": peak_source, "cases": {},
    }
    timer = Timer(bench, device)
    inputs = make_inputs(cfg, bench.batch, bench.text_len, device, bench.seed)
    pre = backbone = runner = None  # the shared model of the backbone and plain pretraining cases
    if any(c.startswith("backbone_") or c in ("pretrain_precomputed", "pretrain_online") for c in bench.cases):
        pre = BEiT3ForPretraining(cfg, codebook_size=8192).to(device)
        configure_model(pre, bench)
        backbone = pre.beit3
        runner = maybe_compile(backbone, bench)

    peaks = [peak]

    def record(name: str, timing: dict, samples: int, tokens: int, flops: float, **extra) -> None:
        step = timing["step_s"]
        entry = {
            "step_s": step, "step_s_all": timing["step_s_all"], "cpu_s": timing["cpu_s"],
            "cpu_s_all": timing["cpu_s_all"], "samples_per_s": samples / step,
            "tokens_per_s": tokens / step, "flops_per_step": flops, "achieved_tflops": flops / step / 1e12,
            "mfu": flops / step / peaks[-1] if flops else 0.0, "peak_mem_mb": timing["peak_mem_mb"], **extra,
        }
        results["cases"][name] = entry
        if device.type == "cpu" and len(peaks) < 8:
            # On a shared CPU one measurement may land in a busy moment: re-measure between cases, keep the best.
            peaks.append(max(peaks[-1], measure_cpu_peak(dtype)))

    # Backbone steps, each interleaved with its same-run baselines.
    twin = torchscale_twin(backbone) if bench.baselines and backbone is not None else None
    vit = timm_vit(cfg).to(device) if bench.baselines and backbone is not None else None
    if twin is not None:
        results["torchscale_max_abs_diff"] = check_twin(backbone, twin, inputs)
        results["torchscale_match_1e-4"] = max(results["torchscale_max_abs_diff"].values()) <= 1e-4
        log(f"[bench] torchscale twin (same weights): max |diff| per modality {results['torchscale_max_abs_diff']}")
    # Pretraining steps (pair stream, precomputed codes / online tokenizer) run interleaved with the backbone pair
    # step, so their ratio is taken under the same load.
    tokenizer = None
    if any(c in bench.cases for c in ("pretrain_online", "tokenizer_encode")):
        tokenizer = build_tokenizer(bench, cfg, device)
    pre_fns, pre_flops = pretraining_cases(pre, cfg, inputs, bench, device, tokenizer)
    for modality in ("image", "text", "pair"):
        fns = {}
        if f"backbone_{modality}" in bench.cases:
            kwargs = backbone_kwargs(inputs, modality)
            fns[f"backbone_{modality}"] = backbone_step(runner, kwargs)
            if twin is not None:
                fns[f"torchscale_{modality}"] = backbone_step(twin, kwargs)
            if bench.precision == "bf16" and modality == "pair":
                # same-run fp32 references for the bf16 targets
                fns["backbone_pair_fp32"] = backbone_step(runner, kwargs)
                if twin is not None:
                    fns["torchscale_pair_fp32"] = backbone_step(twin, kwargs)
            if vit is not None and modality == "image":
                fns["timm_vit_image"] = vit_step(vit, inputs["images"])
        if modality == "pair":
            fns.update(pre_fns)
        if not fns:
            continue
        tokens = tokens_of(cfg, modality, bench.batch, bench.text_len)
        flops = bench.batch * sequence_flops(cfg, tokens // bench.batch)
        for name, timing in timer.run(fns).items():
            record(name, timing, bench.batch, tokens, pre_flops.get(name, flops))
        log_cases(results, list(fns), log)
    twin = vit = None

    variant_fns, variant_flops = variant_cases(cfg, inputs, bench, device)
    for group in (MAE_CASES, FLIP_CASES):  # each option timed beside its own baseline
        fns = {name: variant_fns[name] for name in group if name in variant_fns}
        if fns:
            for name, timing in timer.run(fns).items():
                record(name, timing, bench.batch, bench.batch * (cfg.num_patches + 1), variant_flops[name],
                       note="tokens_per_s counts the input image tokens, whether or not the encoder sees them")
            log_cases(results, list(fns), log)

    if "tokenizer_encode" in bench.cases and tokenizer is not None:
        images = tokenizer_images(tokenizer, bench.batch, device)

        def encode() -> None:
            with torch.no_grad():
                tokenizer.get_codebook_indices(images)

        tcfg = tokenizer.config
        t_tokens = bench.batch * tcfg.num_patches
        t_flops = bench.batch * 2.0 * tcfg.depth * (12 * tcfg.width**2 * (tcfg.num_patches + 1)
                                                    + 2 * tcfg.width * (tcfg.num_patches + 1) ** 2)
        for name, timing in timer.run({"tokenizer_encode": encode}).items():
            record(name, timing, bench.batch, t_tokens, t_flops, note="forward only; FLOPs = encoder forward")
        log_cases(results, ["tokenizer_encode"], log)
    if "data_loading" in bench.cases:
        results["cases"]["data_loading"] = data_loading(bench, cfg)
        log(f"[bench] data_loading: {results['cases']['data_loading']['images_per_s_per_worker']:.1f} img/s/worker")

    if device.type == "cpu":
        peak = max(peaks)
        results["peak_flops"], results["peak_measurements"] = peak, peaks
        results["peak_source"] += f", best of {len(peaks)} measurements spread over the run"
        for c in results["cases"].values():
            if "flops_per_step" in c:
                c["mfu"] = c["flops_per_step"] / c["step_s"] / peak
    results["comparisons"] = comparisons(results["cases"])
    return results


def check_twin(ours: BEiT3, twin: torch.nn.Module, inputs: dict) -> dict:
    diffs = {}
    with torch.no_grad():
        for modality in ("image", "text", "pair"):
            kwargs = backbone_kwargs(inputs, modality)
            a = ours(**kwargs)["encoder_out"].float()
            b = twin(**kwargs)["encoder_out"].float()
            diffs[modality] = float((a - b).abs().max())
    return diffs


def data_loading(bench: BenchConfig, cfg: BEiT3Config) -> dict:

    if bench.data_root is not None:
        return measure_loading(bench.data_root, num_images=bench.loading_images, image_size=cfg.img_size,
                               tokenizer_image_size=cfg.img_size)

    with tempfile.TemporaryDirectory() as root:
        make_demo_data(root, num_images=max(20, bench.loading_images), image_size=64)
        result = measure_loading(root, num_images=bench.loading_images, image_size=cfg.img_size,
                                 tokenizer_image_size=cfg.img_size)
    result["root"] = "generated demo data (64 px JPEGs)"
    return result


def comparisons(cases: dict) -> dict:
    """Speed ratios the targets are stated in (> 1 means the first is faster)."""
    out = {}

    def ratio(name: str, fast: str, slow: str) -> None:
        if fast in cases and slow in cases:
            out[name] = cases[slow]["step_s"] / cases[fast]["step_s"]
            out[name + "_cpu_time"] = cases[slow]["cpu_s"] / cases[fast]["cpu_s"]

    for m in ("image", "text", "pair"):
        ratio(f"speedup_vs_torchscale_{m}", f"backbone_{m}", f"torchscale_{m}")
    ratio("speedup_vs_timm_vit_image", "backbone_image", "timm_vit_image")
    ratio("speedup_mae_visible_only", "pretrain_pixels_visible", "pretrain_pixels_full")
    ratio("speedup_flip_patch_drop", "contrastive_flip", "contrastive_full")
    ratio("speedup_vs_torchscale_fp32_pair", "backbone_pair", "torchscale_pair_fp32")
    ratio("speedup_fp32_vs_torchscale_fp32_pair", "backbone_pair_fp32", "torchscale_pair_fp32")
    ratio("speedup_bf16_vs_own_fp32_pair", "backbone_pair", "backbone_pair_fp32")
    ratio("pretrain_precomputed_vs_backbone_pair", "pretrain_precomputed", "backbone_pair")
    ratio("pretrain_online_vs_backbone_pair", "pretrain_online", "backbone_pair")
    return out


def log_cases(results: dict, names: list[str], log: Callable[[str], None]) -> None:
    for name in names:
        c = results["cases"].get(name)
        if c:
            log(f"[bench] {name:22s} {c['step_s'] * 1e3:10.1f} ms  {c['samples_per_s']:8.2f} samples/s  "
                f"{c['tokens_per_s']:9.1f} tok/s  MFU {100 * c['mfu']:5.1f}%  peak {c['peak_mem_mb']:8.0f} MB")


def format_table(results: dict) -> str:
    """A markdown table of the cases."""
    rows = ["| case | step (ms) | CPU time/step (ms) | samples/s | tokens/s | TFLOP/s | MFU | peak mem (MB) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, c in results["cases"].items():
        if "step_s" not in c:
            rows.append(f"| {name} | – | – | {c.get('images_per_s_per_worker', 0):.1f} img/s/worker | – | – | – | – |")
            continue
        rows.append(f"| {name} | {c['step_s'] * 1e3:.1f} | {c['cpu_s'] * 1e3:.1f} | {c['samples_per_s']:.2f} | {c['tokens_per_s']:.1f} | "
                    f"{c['achieved_tflops']:.3f} | {100 * c['mfu']:.1f}% | {c['peak_mem_mb']:.0f} |")
    lines = ["\n".join(rows)]
    if results.get("comparisons"):
        lines.append("\n".join(f"- {k}: {v:.2f}x" for k, v in results["comparisons"].items()))
    if "torchscale_max_abs_diff" in results:
        lines.append(f"- torchscale (same weights) max |diff|: {results['torchscale_max_abs_diff']}")
    lines.append(f"- peak: {results['peak_flops'] / 1e12:.3f} TFLOP/s ({results['peak_source']})")
    return "\n\n".join(lines)

