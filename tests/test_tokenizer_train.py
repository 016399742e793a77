"""Training objective: config resolution, param groups, usage tracking, histogram, and a short real training loop."""
import pytest
import torch
from helpers import shape_images

from beit3.config import ConfigError, from_dict
from beit3.engine import OptimConfig, param_groups
from tokenizer.train import CodeUsageTracker, TokenizerObjectiveConfig, build_tokenizer_objective, save_usage_histogram


def tiny_objective_config(**model) -> TokenizerObjectiveConfig:
    return from_dict(TokenizerObjectiveConfig, {"arch": "vqkd_tiny", "model": model, "teacher": {"kind": "hog"}})


def test_config_resolution_and_errors():
    objective = build_tokenizer_objective(tiny_objective_config(codebook_size=32))
    assert objective.tokenizer.config.codebook_size == 32
    assert objective.tokenizer.config.target_dim == objective.teacher.feature_dim == 108
    with pytest.raises(ConfigError, match="model.code_dimension"):
        build_tokenizer_objective(tiny_objective_config(code_dimension=4))
    with pytest.raises(ConfigError, match="model.target_dim"):
        build_tokenizer_objective(tiny_objective_config(target_dim=512))
    with pytest.raises(ConfigError, match="unknown VQ-KD config"):
        build_tokenizer_objective(TokenizerObjectiveConfig(arch="vqkd_huge"))
    with pytest.raises(ConfigError, match="teacher.kind"):
        from_dict(TokenizerObjectiveConfig, {"teacher": {"kind": "clip"}})


def test_param_groups_exclude_norms_biases_tokens_and_codebook():
    objective = build_tokenizer_objective(tiny_objective_config())
    groups = param_groups(objective, OptimConfig(weight_decay=1e-4))
    decay = next(g for g in groups if g["weight_decay"] > 0)
    no_decay = next(g for g in groups if g["weight_decay"] == 0)
    assert len(groups) == 2
    names = {id(p): n for n, p in objective.named_parameters()}
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    decay_names = {names[id(p)] for p in decay["params"]}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 1e-4
    assert {"tokenizer.encoder.cls_token", "tokenizer.encoder.pos_embed", "tokenizer.decoder.pos_embed",
            "tokenizer.encoder.blocks.0.attn.q_bias", "tokenizer.encoder.fc_norm.weight"} <= no_decay_names
    assert "tokenizer.encoder.blocks.0.attn.qkv.weight" in decay_names
    assert not any("quantize" in n or "teacher" in n for n in decay_names | no_decay_names)
    assert len(decay_names | no_decay_names) == sum(1 for p in objective.tokenizer.parameters())


def test_usage_tracker_window_and_histogram(tmp_path):
    tracker = CodeUsageTracker(num_codes=8, window=2)
    tracker.update(torch.tensor([0, 0, 1]))
    tracker.update(torch.tensor([2, 3]))
    assert tracker.usage() == pytest.approx(4 / 8)
    tracker.update(torch.tensor([[4, 5], [6, 7]]))  # the first update leaves the window
    assert tracker.counts().tolist() == [0, 0, 1, 1, 1, 1, 1, 1]
    assert tracker.perplexity() == pytest.approx(6.0)
    png = save_usage_histogram(tracker.counts(), tmp_path / "plots" / "usage.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_short_training_loop_learns_without_collapse():
    torch.manual_seed(0)
    objective = build_tokenizer_objective(tiny_objective_config(codebook_size=64, restart_after_steps=5))
    optimizer = torch.optim.AdamW(param_groups(objective, OptimConfig(lr=2e-3, weight_decay=1e-4)), lr=2e-3, betas=(0.9, 0.99))
    images = shape_images(64, 32, seed=1)
    history = []
    for step in range(30):
        loss, metrics = objective(images[(step * 16) % 64:][:16])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(metrics["rec_loss"].item())
    assert set(metrics) >= {"rec_loss", "quant_loss", "total_loss", "codebook_usage", "code_perplexity"}
    assert objective.last_codes.shape == (16, 16)
    assert sum(history[-5:]) / 5 < 0.8 * sum(history[:5]) / 5
    objective.eval()
    codes = objective.tokenizer.get_codebook_indices(shape_images(32, 32, seed=2))
    assert codes.unique().numel() >= 16  # far from collapse (1 code) on held-out images
