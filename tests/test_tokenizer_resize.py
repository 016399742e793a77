"""A tokenizer trained at one image size codes images of another (the patch-14 giant needs 256 px codes)."""
import pytest
import torch

from tokenizer import VQKD, load_tokenizer, resize_tokenizer, save_tokenizer, vqkd_config
from tokenizer.checkpoint import CheckpointLayoutError


def test_resize_resamples_positions_and_keeps_the_codebook(tmp_path):
    torch.manual_seed(0)
    model = VQKD(vqkd_config("vqkd_tiny")).eval()  # 32 px, patch 8: a 4x4 grid
    with torch.no_grad():
        model.encoder.pos_embed[:, 1:] = 0.25  # a constant grid stays constant under bicubic resampling
    save_tokenizer(model, tmp_path / "tok")
    resized = load_tokenizer(tmp_path / "tok", img_size=48)
    assert resized.config.img_size == 48 and resized.config.num_patches == 36
    assert resized.encoder.pos_embed.shape == (1, 37, 32) and resized.decoder.pos_embed.shape == (1, 37, 32)
    torch.testing.assert_close(resized.encoder.pos_embed[:, 1:], torch.full((1, 36, 32), 0.25))
    assert torch.equal(resized.encoder.pos_embed[:, 0], model.encoder.pos_embed[:, 0])
    assert torch.equal(resized.quantize.embedding.weight, model.quantize.embedding.weight)
    codes = resized.get_codebook_indices(torch.rand(2, 3, 48, 48))
    assert codes.shape == (2, 36) and int(codes.max()) < model.config.codebook_size
    assert resize_tokenizer(model, 32) is model
    with pytest.raises(CheckpointLayoutError, match="cannot resize the tokenizer to 36 px"):
        resize_tokenizer(model, 36)
