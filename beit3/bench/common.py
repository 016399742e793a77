"""Shared pieces of the benchmark cases: the benchmark config, case lists and suites, peaks and FLOPs, timing
and memory probes, synthetic inputs and the backbone step (used by :mod:`beit3.bench.run` and
:mod:`beit3.bench.pretraining`)."""
from __future__ import annotations

import contextlib
import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from beit3.models.backbone import BEiT3, BEiT3Config

# Dense peak TFLOP/s per GPU (bf16 tensor cores; fp32 runs as TF32 with torch.backends.cuda.matmul.allow_tf32).
GPU_PEAK_TFLOPS = {
    "H100 SXM": {"bf16": 989.4, "fp32": 494.7},
    "H100 PCIe": {"bf16": 756.0, "fp32": 378.0},
    "H100 NVL": {"bf16": 835.0, "fp32": 417.5},
    "H200": {"bf16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp32": 156.0},
}

SUITES = {
    # CI smoke test: a tiny model, one warm-up, two repeats; baselines skipped.
    "quick": dict(model="beit3_tiny_patch8_32", batch=2, text_len=8, steps=1, repeats=2, warmup=1, baselines=False,
                  tokenizer="vqkd_tiny", loading_images=4),
    "full": dict(model="beit3_base_patch16_224", batch=8, text_len=64, steps=1, repeats=3, warmup=1, baselines=True,
                 tokenizer="vqkd_base_decoder_1x768x12", loading_images=50),
}

ALL_CASES = ("backbone_image", "backbone_text", "backbone_pair", "pretrain_precomputed", "pretrain_online",
             "pretrain_deepspeed", "pretrain_pixels_visible", "pretrain_pixels_full", "contrastive_flip",
             "contrastive_full", "tokenizer_encode", "data_loading")
# cases that set their own precision (DeepSpeed's bf16 mode): never run under autocast
NO_AUTOCAST_CASES = ("pretrain_deepspeed",)


@dataclass
class BenchConfig:
    model: str = "beit3_base_patch16_224"
    batch: int = 8
    text_len: int = 64
    precision: str = "fp32"  # fp32 | bf16 (autocast, fp32 master weights)
    device: str = "cpu"
    steps: int = 1  # training steps per timed repeat
    repeats: int = 3
    warmup: int = 1
    compile: bool = False
    checkpointing: str = "none"  # none | all | every_k
    checkpoint_every: int = 2
    baselines: bool = True
    tokenizer: str = "vqkd_base_decoder_1x768x12"
    loading_images: int = 50
    data_root: Optional[str] = None  # for data_loading; a small demo root is generated when None
    cases: tuple = ALL_CASES
    seed: int = 0
    model_overrides: dict = field(default_factory=dict)
    zero_stage: int = 1  # pretrain_deepspeed: ZeRO stage 0-3
    deepspeed_config: str = ""  # pretrain_deepspeed: a DeepSpeed JSON (e.g. configs/deepspeed/zero3.json); "" = defaults


# -- FLOPs and peaks ----------------------------------------------------------------------------------------------
def sequence_flops(cfg: BEiT3Config, tokens: int) -> float:
    """Training FLOPs (fwd + bwd) of the trunk on one sequence of ``tokens`` tokens."""
    L, d, f = cfg.depth, cfg.embed_dim, cfg.ffn_dim
    active = L * (4 * d * d + 2 * d * f)
    return 6.0 * active * tokens + 12.0 * L * d * tokens**2


def measure_cpu_peak(dtype: torch.dtype, size: int = 2048, repeats: int = 5) -> float:
    """Best observed matmul FLOP/s on this CPU for ``dtype`` (the MFU denominator on CPU)."""
    a = torch.randn(size, size).to(dtype)
    b = torch.randn(size, size).to(dtype)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * size**3 / best


def gpu_peak(precision: str) -> tuple[float, str]:
    name = torch.cuda.get_device_name()
    key = next((k for k in GPU_PEAK_TFLOPS if all(w in name for w in k.split())), None)
    if key is None and "H100" in name:
        key = "H100 SXM"
    if key is None:
        return float("nan"), f"{name} (no table entry)"
    return GPU_PEAK_TFLOPS[key][precision] * 1e12, f"{key} table ({name})"


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return rss / (2**20 if sys.platform == "darwin" else 2**10)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# -- timing --------------------------------------------------------------------------------------------------------
class Timer:
    """Times several step functions with interleaved repeats (A, B, A, B, ...) so shared-machine load hits all."""

    def __init__(self, bench: BenchConfig, device: torch.device):
        self.bench, self.device = bench, device

    def autocast(self):
        if self.bench.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def autocast_for(self, name: str):
        if name.endswith("_fp32") or name in NO_AUTOCAST_CASES:
            return contextlib.nullcontext()
        return self.autocast()

    def run(self, fns: dict[str, Callable[[], None]]) -> dict[str, dict]:
        """Time ``fns``; a name ending in ``_fp32`` runs without autocast (same-run fp32 reference of a bf16 run)."""
        times = {name: [] for name in fns}
        cpu_times = {name: [] for name in fns}
        memory = {}
        for name, fn in fns.items():
            reset_peak_memory(self.device)
            for _ in range(self.bench.warmup):
                with self.autocast_for(name):
                    fn()
            synchronize(self.device)
            memory[name] = peak_memory_mb(self.device)
        for _ in range(self.bench.repeats):
            for name, fn in fns.items():
                synchronize(self.device)
                start, cpu_start = time.perf_counter(), time.process_time()
                for _ in range(self.bench.steps):
                    with self.autocast_for(name):
                        fn()
                synchronize(self.device)
                times[name].append((time.perf_counter() - start) / self.bench.steps)
                cpu_times[name].append((time.process_time() - cpu_start) / self.bench.steps)
        # cpu_s: process CPU time per step (all threads); with --threads 1 on a shared CPU it is the load-robust
        # measure of the work a step costs, while step_s (wall clock) is what a user sees.
        return {name: {"step_s": statistics.median(t), "step_s_all": t, "cpu_s": statistics.median(cpu_times[name]),
                       "cpu_s_all": cpu_times[name], "peak_mem_mb": memory[name]}
                for name, t in times.items()}


# -- inputs --------------------------------------------------------------------------------------------------------
def make_inputs(cfg: BEiT3Config, batch: int, text_len: int, device: torch.device, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g)
    tokens = torch.randint(4, cfg.vocab_size, (batch, text_len), generator=g)
    lengths = torch.randint(max(1, text_len // 2), text_len + 1, (batch,), generator=g)
    lengths[0] = text_len  # at least one full row
    padding = torch.arange(text_len)[None, :] >= lengths[:, None]
    return {"images": images.to(device), "tokens": tokens.to(device), "padding": padding.to(device)}


def backbone_kwargs(inputs: dict, modality: str) -> dict:
    if modality == "image":
        return {"visual_tokens": inputs["images"]}
    if modality == "text":
        return {"textual_tokens": inputs["tokens"], "text_padding_position": inputs["padding"]}
    return {"visual_tokens": inputs["images"], "textual_tokens": inputs["tokens"],
            "text_padding_position": inputs["padding"]}


def backbone_step(model: torch.nn.Module, kwargs: dict) -> Callable[[], None]:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        out = model(**kwargs)["encoder_out"]
        out.float().square().mean().backward()
    return step


def tokens_of(cfg: BEiT3Config, modality: str, batch: int, text_len: int) -> int:
    vision = cfg.num_patches + 1
    return batch * {"image": vision, "text": text_len, "pair": vision + text_len}[modality]


# -- the benchmark -------------------------------------------------------------------------------------------------
def configure_model(model: torch.nn.Module, bench: BenchConfig) -> None:
    backbone = model if isinstance(model, BEiT3) else model.beit3
    if bench.checkpointing == "none":
        backbone.set_grad_checkpointing(False)
    elif bench.checkpointing == "all":
        backbone.set_grad_checkpointing(True, every=1)
    elif bench.checkpointing == "every_k":
        backbone.set_grad_checkpointing(True, every=bench.checkpoint_every)
    else:
        raise ValueError(f"checkpointing must be none, all or every_k; got '{bench.checkpointing}'")


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """``torch.compile`` with data-dependent shapes traced rather than split off: the masked positions a
    pretraining step selects and their counts would otherwise each break the graph (tests/test_gpu.py)."""
    torch._dynamo.config.capture_scalar_outputs = True
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    return torch.compile(model)


def maybe_compile(model: torch.nn.Module, bench: BenchConfig) -> torch.nn.Module:
    return compile_model(model) if bench.compile else model


def environment(device: torch.device) -> dict:
    env = {
        "torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
        "processor": cpu_name(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def write_json(results: dict, path) -> None:
    """``results`` as indented JSON at ``path`` (its folder created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2) + "\n")
