"""Teachers: HOG and pixel targets, timm teacher from a local file, clear errors for mismatched weights."""
import math

import pytest
import timm
import torch
from safetensors.torch import save_file

from beit3.config import ConfigError
from tokenizer.teachers import HOGTeacher, PixelTeacher, TeacherConfig, TeacherWeightsError, build_teacher

TINY_VIT = dict(img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2, num_classes=0)


def test_hog_sees_edge_orientation_per_patch():
    teacher = HOGTeacher(patch_size=8, bins=9, cells_per_side=2)
    assert teacher.feature_dim == 108
    vertical_edge = torch.zeros(1, 3, 32, 32)
    vertical_edge[..., 12:] = 1.0
    features = teacher(vertical_edge)
    assert features.shape == (1, 16, 108)
    assert features[0, 0].abs().sum() == 0  # flat patch: no gradients
    hist = features[0, 1].view(3, 9, 4)  # patch (0,1) holds the edge at x=12
    assert hist.sum(dim=(0, 2)).argmax() == 0  # horizontal gradient -> orientation bin 0
    with pytest.raises(ConfigError, match="divisible"):
        HOGTeacher(patch_size=6, cells_per_side=4)


def test_hog_colour_term_is_the_patch_mean_colour():
    image = torch.rand(2, 3, 16, 16)
    plain = HOGTeacher(8, 9, 1, center=True)(image)
    teacher = HOGTeacher(8, 9, 1, center=True, colour_weight=2.0)
    features = teacher(image)
    assert teacher.feature_dim == 30 and features.shape == (2, 4, 30)
    assert torch.equal(features[..., :27], plain)  # HOG part unchanged (centred before the colour is appended)
    top_right = image[1, :, :8, 8:].mean(dim=(1, 2))  # patch 1 of image 1, row-major
    assert torch.allclose(features[1, 1, 27:], 2.0 * (top_right - 0.5), atol=1e-6)
    cfg = TeacherConfig(kind="hog", hog_cells_per_side=1, hog_colour_weight=1.0)
    assert build_teacher(cfg, patch_size=8).feature_dim == 30
    with pytest.raises(ConfigError, match="hog_colour_weight"):
        HOGTeacher(8, colour_weight=-1.0)


def test_pixel_teacher_normalises_each_patch():
    features = PixelTeacher(patch_size=4)(torch.rand(2, 3, 16, 16))
    assert features.shape == (2, 16, 48)
    assert torch.allclose(features.mean(-1), torch.zeros(2, 16), atol=1e-5)


def test_teacher_is_frozen_and_stays_in_eval():
    teacher = build_teacher(TeacherConfig(kind="hog"), patch_size=8)
    teacher.train()
    assert not teacher.training


def test_timm_teacher_loads_local_weights_and_picks_a_layer(tmp_path):
    reference = timm.create_model("vit_tiny_patch16_224", pretrained=False, **TINY_VIT).eval()
    save_file(reference.state_dict(), str(tmp_path / "teacher.safetensors"))
    cfg = TeacherConfig(kind="timm", model_name="vit_tiny_patch16_224", weights=str(tmp_path / "teacher.safetensors"),
                        model_kwargs=TINY_VIT, layer=-1, final_norm=True)
    teacher = build_teacher(cfg, patch_size=8)
    assert teacher.feature_dim == 32 and teacher.num_patches == 16
    images = torch.rand(2, 3, 32, 32)
    expected = reference.forward_features((images - teacher.mean) / teacher.std)[:, 1:]
    assert torch.allclose(teacher(images), expected, atol=1e-5)
    assert not any(p.requires_grad for p in teacher.parameters())
    first_block = build_teacher(TeacherConfig(**{**cfg.__dict__, "layer": 0, "final_norm": False}), patch_size=8)
    assert not torch.allclose(first_block(images), expected, atol=1e-3)


def test_timm_teacher_with_mismatched_weights_names_file_and_keys(tmp_path):
    wider = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY_VIT, "embed_dim": 48})
    path = tmp_path / "wrong_teacher.pth"
    torch.save({"model": wider.state_dict()}, path)
    cfg = TeacherConfig(kind="timm", model_name="vit_tiny_patch16_224", weights=str(path), model_kwargs=TINY_VIT)
    with pytest.raises(TeacherWeightsError, match=r"wrong_teacher\.pth.*shape mismatches.*blocks\.0\.attn"):
        build_teacher(cfg, patch_size=8)
    shallow = timm.create_model("vit_tiny_patch16_224", pretrained=False, **{**TINY_VIT, "depth": 1})
    torch.save(shallow.state_dict(), path)
    with pytest.raises(TeacherWeightsError, match=r"missing keys.*blocks\.1\."):
        build_teacher(cfg, patch_size=8)
    with pytest.raises(TeacherWeightsError, match="does not exist"):
        build_teacher(TeacherConfig(**{**cfg.__dict__, "weights": str(tmp_path / "nope.pth")}), patch_size=8)


def test_hog_feature_dim_formula():
    for patch, cells in ((4, 1), (8, 2), (16, 4)):
        assert HOGTeacher(patch, 9, cells).feature_dim == 3 * 9 * cells * cells
        assert math.isclose(HOGTeacher(patch, 9, cells)(torch.rand(1, 3, 32, 32)).shape[1], (32 / patch) ** 2)


def test_hog_norm_floor_keeps_weak_gradients_small():
    ramp = torch.linspace(0, 0.02, 32).view(1, 1, 1, 32).expand(1, 3, 32, 32).contiguous()
    plain = HOGTeacher(8, 9, 2)(ramp)
    floored = HOGTeacher(8, 9, 2, norm_floor=0.1)(ramp)
    assert plain[0, 5].view(3, 9, 4).norm(dim=1).min() > 0.99  # MaskFeat: every cell scaled to unit length
    assert floored[0, 5].norm() < 0.2 < plain[0, 5].norm()
