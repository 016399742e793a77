"""code_informativeness: held-out reconstruction with true vs. shuffled codes (do the codes mean anything?)."""
import pytest
import torch
from helpers import shape_images

from beit3.config import from_dict
from beit3.engine import OptimConfig, param_groups
from tokenizer.train import TokenizerObjectiveConfig, build_tokenizer_objective, code_informativeness


def tiny_objective(teacher: dict, **model):
    return build_tokenizer_objective(from_dict(TokenizerObjectiveConfig,
                                               {"arch": "vqkd_tiny", "model": model, "teacher": teacher}))


def test_decoder_that_ignores_codes_has_zero_gap():
    torch.manual_seed(0)
    objective = tiny_objective({"kind": "hog"})
    with torch.no_grad():  # decoder input projection zeroed: its output cannot depend on the codes
        objective.tokenizer.decoder.patch_embed.proj.weight.zero_()
    objective.train()
    info = code_informativeness(objective, shape_images(12, 32, seed=3))
    assert info["rec_loss_true"] == pytest.approx(info["rec_loss_shuffled"], abs=1e-6)
    assert abs(info["relative_gap"]) < 1e-5
    assert info["code_stability"] == 1.0 and 0 < info["codebook_usage"] <= 1
    assert objective.training  # mode restored
    with pytest.raises(ValueError, match="at least 2"):
        code_informativeness(objective, shape_images(1, 32))
    with pytest.raises(ValueError, match="teacher"):
        code_informativeness(objective.tokenizer, shape_images(4, 32))


def train(objective, images, steps, lr=2e-3, batch=16):
    optimizer = torch.optim.AdamW(param_groups(objective, OptimConfig(lr=lr, weight_decay=1e-4)), lr=lr, betas=(0.9, 0.99))
    for step in range(steps):
        loss, _ = objective(images[(step * batch) % len(images):][:batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_pixel_teacher_codes_are_informative():
    torch.manual_seed(0)
    objective = tiny_objective({"kind": "pixels"}, codebook_size=64, restart_after_steps=5)
    train(objective, shape_images(64, 32, seed=1), 30)
    info = code_informativeness(objective, shape_images(32, 32, seed=2))
    assert info["relative_gap"] > 0.1, info
