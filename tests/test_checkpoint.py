"""Official checkpoint layout, position interpolation, safe loading, save_pretrained/from_pretrained."""
import json

import pytest
import torch
import torch.nn.functional as F

import beit3
from beit3.models.checkpoint import CheckpointError, interpolate_vision_positions


def _tiny(**overrides):
    torch.manual_seed(0)
    return beit3.create_model("beit3_tiny_patch8_32", **overrides).eval()


def _official_pretrained_file(model, path, wrapper="model"):
    """The layout of beit3_*_patch16_224.pth: backbone under 'beit3.' plus mlm_head / mim_head."""
    state = {f"beit3.{k}": v for k, v in model.state_dict().items()}
    dim = model.config.embed_dim
    state.update({
        "mlm_head.weight": torch.randn(model.config.vocab_size, dim), "mlm_head.bias": torch.zeros(model.config.vocab_size),
        "mim_head.weight": torch.randn(8192, dim), "mim_head.bias": torch.zeros(8192),
    })
    torch.save({wrapper: state}, path)
    return state


@pytest.mark.parametrize("wrapper", ["model", "module"])
def test_official_pretrained_file_loads_with_no_missing_backbone_key(tmp_path, wrapper):
    source = _tiny()
    _official_pretrained_file(source, tmp_path / "ckpt.pth", wrapper)
    torch.manual_seed(1)
    target = beit3.create_model("beit3_tiny_patch8_32").eval()
    report = beit3.load_checkpoint(target, tmp_path / "ckpt.pth", strict=True)
    assert report.missing == [] and report.unexpected == []
    assert sorted(report.left_for_heads) == ["mim_head.bias", "mim_head.weight", "mlm_head.bias", "mlm_head.weight"]
    for k, v in source.state_dict().items():
        assert torch.equal(v, target.state_dict()[k]), k


def test_position_interpolation_keeps_first_rows_and_resizes_the_grid(tmp_path):
    source = _tiny()
    with torch.no_grad():
        source.encoder.embed_positions.A.weight.normal_()
    _official_pretrained_file(source, tmp_path / "ckpt.pth")
    target = _tiny(img_size=48)  # grid 4x4 -> 6x6
    report = beit3.load_checkpoint(target, tmp_path / "ckpt.pth")
    assert report.interpolated == ["beit3.encoder.embed_positions.A.weight"]
    old = source.encoder.embed_positions.A.weight.detach()
    new = target.encoder.embed_positions.A.weight.detach()
    assert new.shape == (3 + 36, 64)
    assert torch.equal(new[:3], old[:3])
    grid = old[3:].reshape(1, 4, 4, 64).permute(0, 3, 1, 2)
    expected = F.interpolate(grid, size=(6, 6), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(36, 64)
    torch.testing.assert_close(new[3:], expected)
    with torch.no_grad():
        target(visual_tokens=torch.zeros(1, 3, 48, 48))


def test_interpolation_224_to_384_shapes_and_constant_grid():
    table = torch.randn(199, 8)
    table[3:] = torch.arange(8.0)  # a grid constant over space stays constant
    out = interpolate_vision_positions(table, 24 * 24)
    assert out.shape == (579, 8)
    assert torch.equal(out[:3], table[:3])
    torch.testing.assert_close(out[3:], torch.arange(8.0).expand(576, 8))
    with pytest.raises(CheckpointError, match="not square"):
        interpolate_vision_positions(torch.randn(3 + 15, 8), 16)


def test_checkpoint_with_missing_or_misshaped_keys(tmp_path):
    state = {f"beit3.{k}": v for k, v in _tiny().state_dict().items()}
    del state["beit3.encoder.layers.1.ffn.B.fc2.weight"]
    torch.save({"model": state}, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"strict load failed: missing: encoder\.layers\.1\.ffn\.B\.fc2\.weight"):
        beit3.load_checkpoint(_tiny(), tmp_path / "missing.pth", strict=True)
    report = beit3.load_checkpoint(_tiny(), tmp_path / "missing.pth")
    assert report.missing == ["encoder.layers.1.ffn.B.fc2.weight"]

    wide = {f"beit3.{k}": v for k, v in _tiny(embed_dim=32, num_heads=2).state_dict().items()}
    torch.save({"model": wide}, tmp_path / "wide.pth")
    with pytest.raises(CheckpointError, match=r"'beit3\.text_embed\.weight' is \(1000, 32\) in the checkpoint, \(1000, 64\)"):
        beit3.load_checkpoint(_tiny(), tmp_path / "wide.pth")


def test_files_that_are_not_checkpoints(tmp_path):
    (tmp_path / "noise.pth").write_bytes(b"\x00\x01garbage" * 100)
    with pytest.raises(CheckpointError, match="noise.pth' is not a PyTorch checkpoint"):
        beit3.load_checkpoint(_tiny(), tmp_path / "noise.pth")
    with pytest.raises(CheckpointError, match="does not exist"):
        beit3.load_checkpoint(_tiny(), tmp_path / "absent.pth")
    torch.save({"model": {"foo.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="none of its 1 keys"):
        beit3.load_checkpoint(_tiny(), tmp_path / "other.pth")
    torch.save({"model": {"beit3.text_embed.weight": "not a tensor"}}, tmp_path / "str.pth")
    with pytest.raises(CheckpointError, match="not a tensor"):
        beit3.load_checkpoint(_tiny(), tmp_path / "str.pth")


class _Payload:
    def __reduce__(self):
        return (print, ("code ran",))


def test_pickle_with_code_is_refused(tmp_path, capsys):
    torch.save({"model": {"x": _Payload()}}, tmp_path / "evil.pth")
    with pytest.raises(CheckpointError, match="refused"):
        beit3.load_checkpoint(_tiny(), tmp_path / "evil.pth")
    assert "code ran" not in capsys.readouterr().out


def test_save_pretrained_round_trip(tmp_path):
    model = _tiny(depth=1, vl_expert_layers=1)
    beit3.save_pretrained(model, tmp_path / "saved")
    meta = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert meta["model_class"] == "BEiT3" and meta["beit3_config"]["vl_expert_layers"] == 1
    loaded = beit3.from_pretrained(tmp_path / "saved").eval()
    x = torch.randn(2, 3, 32, 32)
    tokens = torch.randint(0, 1000, (2, 5))
    with torch.no_grad():
        assert torch.equal(model(visual_tokens=x, textual_tokens=tokens)["encoder_out"],
                           loaded(visual_tokens=x, textual_tokens=tokens)["encoder_out"])
    # our directories and safetensors files load through load_checkpoint too
    assert beit3.load_checkpoint(_tiny(depth=1, vl_expert_layers=1), tmp_path / "saved", strict=True).missing == []
    with pytest.raises(CheckpointError, match="no config.json"):
        beit3.from_pretrained(tmp_path)
    (tmp_path / "saved" / "config.json").write_text(json.dumps({**meta, "beit3_config": {**meta["beit3_config"], "depht": 3}}))
    with pytest.raises(CheckpointError, match="depht"):
        beit3.from_pretrained(tmp_path / "saved")
