"""VQ-KD model: official key layout and parameter counts, checkpoint loading, shape inference, inference behaviour."""
import argparse

import pytest
import torch

from tokenizer import CheckpointLayoutError, VQKD, infer_vqkd_config, load_tokenizer, save_tokenizer, vqkd_config

BLOCK_KEYS = ("norm1.weight", "norm1.bias", "attn.q_bias", "attn.v_bias", "attn.qkv.weight", "attn.proj.weight",
              "attn.proj.bias", "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight",
              "mlp.fc2.bias")


def official_keys(depth: int, decoder_depth: int) -> set[str]:
    """The key set of an official VQ-KD state dict (reference §3), written out independently of our model."""
    keys = {"quantize.embedding.weight", "quantize.embedding.cluster_size", "quantize.embedding.embed_avg",
            "quantize.embedding.initted", "quantize.cluster_size"}
    for part, n in (("encoder", depth), ("decoder", decoder_depth)):
        keys |= {f"{part}.{k}" for k in ("cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias",
                                          "fc_norm.weight", "fc_norm.bias")}
        keys |= {f"{part}.blocks.{i}.{k}" for i in range(n) for k in BLOCK_KEYS}
    for layer in ("encode_task_layer", "decode_task_layer"):
        keys |= {f"{layer}.{i}.{k}" for i in (0, 2) for k in ("weight", "bias")}
    return keys


@pytest.mark.parametrize("name, decoder_depth, target_dim, params", [
    ("vqkd_base_decoder_3x768x12", 3, 512, 108_829_216),
    ("vqkd_base_decoder_1x768x12", 1, 512, 94_655_008),
    ("vqkd_base_decoder_1x768x12_dino", 1, 768, 94_851_872),
])
def test_base_configs_match_official_layout(name, decoder_depth, target_dim, params):
    with torch.device("meta"):
        model = VQKD(vqkd_config(name))
    state = model.state_dict()
    assert set(state) == official_keys(12, decoder_depth)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == params
    shapes = {"encoder.pos_embed": (1, 197, 768), "encoder.patch_embed.proj.weight": (768, 3, 16, 16),
              "encoder.blocks.0.attn.qkv.weight": (2304, 768), "decoder.patch_embed.proj.weight": (768, 32, 1, 1),
              "decoder.pos_embed": (1, 197, 768), "quantize.embedding.weight": (8192, 32),
              "encode_task_layer.2.weight": (32, 768), "decode_task_layer.2.weight": (target_dim, 768)}
    assert {k: tuple(state[k].shape) for k in shapes} == shapes
    assert infer_vqkd_config(state) == vqkd_config(name)


def small_official_state(**overrides) -> tuple[dict, VQKD]:
    model = VQKD(vqkd_config("vqkd_tiny", width=96, depth=2, decoder_depth=2, mlp_ratio=2.0, **overrides)).eval()
    model.quantize.embedding.initted.fill_(1.0)
    return model.state_dict(), model


def test_official_pth_loads_strictly_with_inferred_config(tmp_path):
    state, model = small_official_state()
    assert set(state) == official_keys(2, 2)
    extra = {"teacher_model.visual.proj": torch.zeros(4, 2), "scaling_layer.shift": torch.zeros(1, 3, 1, 1)}
    path = tmp_path / "vqkd_small.pth"
    torch.save({"model": {**state, **extra}, "epoch": 3, "args": argparse.Namespace(lr=2e-4)}, path)
    loaded = load_tokenizer(path)
    assert loaded.config == model.config
    assert not loaded.training and loaded.quantize.embedding.initted.item() == 1.0
    images = torch.rand(3, 3, 32, 32)
    codes = loaded.get_codebook_indices(images)
    assert codes.dtype == torch.long and codes.shape == (3, 16)
    assert 0 <= codes.min() and codes.max() < 64
    assert torch.equal(codes, model.get_codebook_indices(images))


def test_state_dict_fallback_and_initted_forced(tmp_path):
    state, _ = small_official_state()
    state["quantize.embedding.initted"] = torch.zeros(1)
    torch.save({"state_dict": state}, tmp_path / "ckpt.pth")
    loaded = load_tokenizer(tmp_path / "ckpt.pth").train()
    before = loaded.quantize.embedding.weight.clone()
    loaded(torch.rand(2, 3, 32, 32))  # a training step: EMA may move codes, but k-means must not re-run
    assert loaded.quantize.embedding.initted.item() == 1.0
    assert torch.allclose(before, loaded.quantize.embedding.weight, atol=0.05)


def test_save_and_load_roundtrip_including_run_directory(tmp_path):
    model = VQKD(vqkd_config("vqkd_tiny")).eval()
    save_tokenizer(model, tmp_path / "run" / "tokenizer")
    images = torch.rand(2, 3, 32, 32)
    for path in (tmp_path / "run" / "tokenizer", tmp_path / "run", tmp_path / "run" / "tokenizer" / "model.safetensors"):
        loaded = load_tokenizer(path)
        assert loaded.config == model.config
        assert torch.equal(loaded.get_codebook_indices(images), model.get_codebook_indices(images))


def test_other_layouts_are_rejected_by_name(tmp_path):
    torch.save({"model": {"cls_token": torch.zeros(1, 1, 8), "blocks.0.attn.qkv.weight": torch.zeros(24, 8)}},
               tmp_path / "beit3.pth")
    with pytest.raises(CheckpointLayoutError, match="missing encoder.cls_token"):
        load_tokenizer(tmp_path / "beit3.pth")
    state, _ = small_official_state()
    del state["decoder.blocks.1.mlp.fc2.bias"]
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(CheckpointLayoutError, match="decoder.blocks.1.mlp.fc2.bias"):
        load_tokenizer(tmp_path / "broken.pth")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointLayoutError, match="no tokenizer"):
        load_tokenizer(tmp_path / "empty")


def test_wrong_image_size_is_a_clear_error():
    model = VQKD(vqkd_config("vqkd_tiny")).eval()
    with pytest.raises(ValueError, match="built for 32x32 images but got 48x48"):
        model.get_codebook_indices(torch.rand(1, 3, 48, 48))
    with pytest.raises(ValueError, match=r"\[B, 3, 32, 32\]"):
        model.get_codebook_indices(torch.rand(3, 32, 32))


def test_eval_codes_are_deterministic_and_leave_the_codebook_alone():
    model = VQKD(vqkd_config("vqkd_tiny")).eval()  # initted = 0: eval must not run k-means either
    before = {k: v.clone() for k, v in model.state_dict().items()}
    images = torch.rand(4, 3, 32, 32)
    codes = model.get_codebook_indices(images)
    out = model(images)
    assert torch.equal(out.codes, codes) and torch.equal(model.get_codebook_indices(images), codes)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_preprocessing_matches_official_and_projection_runs_in_fp32():
    model = VQKD(vqkd_config("vqkd_tiny")).eval()
    images = torch.rand(2, 3, 32, 32)
    assert torch.allclose(model.preprocess(images), images * 255 / 127.5 - 1)
    assert torch.allclose(model.preprocess(images * 255), images * 255 / 127.5 - 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = model.encode(images)
    assert z.dtype == torch.float32
