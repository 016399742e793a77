"""ONNX export of the retrieval dual encoder: ``image_encoder.onnx`` (image (B, 3, S, S) -> embedding (B, D)) and
``text_encoder.onnx`` (text (B, T) int64 ids, padding_mask (B, T) bool -> embedding (B, D)), batch and text length
dynamic, each checked against PyTorch with onnxruntime on the CPU.

The TorchScript-based exporter (``torch.onnx.export(dynamo=False)``) is used: ``torch.export`` does not trace the
Multiway routing (``torch.onnx.export(dynamo=True)`` fails in its first step, torch 2.14).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Union

import torch
from torch import nn

from .models import BEiT3ForRetrieval

PathLike = Union[str, os.PathLike]
OPSET = 17


class _ImageEncoder(nn.Module):
    def __init__(self, model: BEiT3ForRetrieval):
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(image)


class _TextEncoder(nn.Module):
    def __init__(self, model: BEiT3ForRetrieval):
        super().__init__()
        self.model = model

    def forward(self, text: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(text, padding_mask)


def sample_inputs(model: BEiT3ForRetrieval, batch: int, length: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random images and texts (with padding) of the model's shapes, for export and verification."""
    gen = torch.Generator().manual_seed(seed)
    size = model.config.img_size
    text = torch.randint(4, model.config.vocab_size - 1, (batch, length), generator=gen)
    text[:, 0] = 0
    padding = torch.zeros(batch, length, dtype=torch.bool)
    for row in range(1, batch):
        padding[row, max(2, length - row) :] = True
    text[padding] = 1
    return {"image": torch.randn(batch, 3, size, size, generator=gen), "text": text, "padding_mask": padding}


@torch.no_grad()
def export_onnx(model: BEiT3ForRetrieval, out_dir: PathLike, verify: bool = True) -> dict:
    """Write both encoders to ``out_dir`` (plus ``onnx_export.json``: shapes, opset, the measured max |diff| against
    PyTorch on inputs of other batch sizes and lengths than the export's)."""
    model = model.eval().float()
    out_dir = Path(out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    example = sample_inputs(model, batch=2, length=8)
    files = {"image_encoder": out_dir / "image_encoder.onnx", "text_encoder": out_dir / "text_encoder.onnx"}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer warnings
        torch.onnx.export(_ImageEncoder(model), (example["image"],), str(files["image_encoder"]),
                          input_names=["image"], output_names=["embedding"], opset_version=OPSET, dynamo=False,
                          dynamic_axes={"image": {0: "batch"}, "embedding": {0: "batch"}})
        torch.onnx.export(_TextEncoder(model), (example["text"], example["padding_mask"]), str(files["text_encoder"]),
                          input_names=["text", "padding_mask"], output_names=["embedding"], opset_version=OPSET,
                          dynamo=False, dynamic_axes={"text": {0: "batch", 1: "length"},
                                                      "padding_mask": {0: "batch", 1: "length"},
                                                      "embedding": {0: "batch"}})
    report = {"files": {k: str(v) for k, v in files.items()}, "opset": OPSET, "image_size": model.config.img_size,
              "embed_dim": model.config.embed_dim, "inputs": {"image": "float32 (batch, 3, S, S), mean = std = 0.5",
                                                             "text": "int64 (batch, length): <s> ids </s> <pad>...",
                                                             "padding_mask": "bool (batch, length), True at pads"}}
    if verify:
        report["max_abs_diff"] = verify_onnx(model, out_dir)
    (out_dir / "onnx_export.json").write_text(json.dumps(report, indent=2) + "\n")
    return report


@torch.no_grad()
def verify_onnx(model: BEiT3ForRetrieval, out_dir: PathLike, batch: int = 5, length: int = 11) -> dict[str, float]:
    """Max |onnxruntime - PyTorch| of each encoder's embeddings on fresh random inputs (``batch`` x ``length``)."""
    import onnxruntime

    out_dir = Path(out_dir)
    inputs = sample_inputs(model, batch=batch, length=length, seed=1)
    image = onnxruntime.InferenceSession(str(out_dir / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    text = onnxruntime.InferenceSession(str(out_dir / "text_encoder.onnx"), providers=["CPUExecutionProvider"])
    got_image = image.run(None, {"image": inputs["image"].numpy()})[0]
    got_text = text.run(None, {"text": inputs["text"].numpy(), "padding_mask": inputs["padding_mask"].numpy()})[0]
    want_image = model.encode_image(inputs["image"]).numpy()
    want_text = model.encode_text(inputs["text"], inputs["padding_mask"]).numpy()
    return {"image_encoder": float(abs(got_image - want_image).max()),
            "text_encoder": float(abs(got_text - want_text).max())}
