"""``BEiT3(output_positions=...)``: the last layer computed for the selected positions only gives exactly the rows
(and the parameter gradients) of the full pass, for every routing variant, masks, drop path and checkpointing."""
import pytest
import torch

import beit3
from beit3.models.pretraining import BEiT3ForPretraining
from beit3.models.registry import model_config

VISION = 17  # CLS + 4x4 patches of the tiny model


def _model(**overrides):
    torch.manual_seed(0)
    return beit3.create_model("beit3_tiny_patch8_32", **overrides)


def _pair(batch=3, text_len=7, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    tokens = torch.randint(4, 1000, (batch, text_len), generator=g)
    padding = torch.zeros(batch, text_len, dtype=torch.bool)
    padding[1, 5:] = True
    positions = torch.rand(batch, VISION + text_len, generator=g) < 0.3
    positions[0, VISION:] = False  # a sample with no text output
    positions[2, :VISION] = False  # and one with no vision output
    positions[1, 3] = True
    return {"visual_tokens": images, "textual_tokens": tokens, "text_padding_position": padding}, positions


def _rows_of_full_pass(model, kwargs, positions, split):
    out = model(**kwargs)["encoder_out"]
    if split <= 0:
        return out[positions]
    return torch.cat([out[:, :split][positions[:, :split]], out[:, split:][positions[:, split:]]])


def _loss_and_grads(model, rows, weights):
    model.zero_grad(set_to_none=True)
    loss = (rows * weights).sum()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same(model, kwargs, positions, split, seed=None):
    def run(selected):
        if seed is not None:
            torch.manual_seed(seed)
        if selected:
            return model(**kwargs, output_positions=positions)["encoder_out"]
        return _rows_of_full_pass(model, kwargs, positions, split)

    full, rows = run(False), run(True)
    assert rows.shape == full.shape == (int(positions.sum()), model.config.embed_dim)
    torch.testing.assert_close(rows, full, atol=2e-6, rtol=1e-5)
    weights = torch.randn(full.shape, generator=torch.Generator().manual_seed(5))
    grads_full = _loss_and_grads(model, run(False), weights)
    grads_rows = _loss_and_grads(model, run(True), weights)
    assert grads_full.keys() == grads_rows.keys()
    for name, expected in grads_full.items():  # fp32 summation-order noise only: 1e-6 of the largest entry
        error = (grads_rows[name] - expected).abs().max().item()
        assert error <= 1e-6 * max(1.0, expected.abs().max().item()), (name, error)


@pytest.mark.parametrize("overrides", [{}, {"share_attention": True}, {"vl_expert_layers": 1}, {"depth": 1}])
def test_selected_rows_and_gradients_equal_the_full_pass(overrides):
    model = _model(**overrides).train()
    kwargs, positions = _pair()
    _assert_same(model, kwargs, positions, VISION)


@pytest.mark.parametrize("modality", ["image", "text"])
def test_single_modality(modality):
    model = _model().train()
    kwargs, positions = _pair()
    if modality == "image":
        kwargs, positions = {"visual_tokens": kwargs["visual_tokens"]}, positions[:, :VISION]
    else:
        kwargs = {k: kwargs[k] for k in ("textual_tokens", "text_padding_position")}
        positions = positions[:, VISION:].clone()
        positions[0, 0] = True
    _assert_same(model, kwargs, positions, -1 if modality == "image" else 0)


def test_attention_mask_rows_drop_path_and_checkpointing():
    model = _model(drop_path_rate=0.5).train()
    kwargs, positions = _pair()
    length = positions.shape[1]
    kwargs["attn_mask"] = torch.ones(length, length).triu(1)  # causal: every query row differs
    _assert_same(model, kwargs, positions, VISION, seed=3)
    model.set_grad_checkpointing(True)
    _assert_same(model, kwargs, positions, VISION, seed=3)


def test_pretraining_logits_come_from_the_masked_positions():
    torch.manual_seed(0)
    model = BEiT3ForPretraining(model_config("beit3_tiny_patch8_32"), codebook_size=32).eval()
    kwargs, _ = _pair()
    g = torch.Generator().manual_seed(2)
    image_mask = torch.rand(3, 16, generator=g) < 0.4
    text_mask = (torch.rand(3, 7, generator=g) < 0.5) & ~kwargs["text_padding_position"]
    logits = model(images=kwargs["visual_tokens"], image_mask=image_mask, text_tokens=kwargs["textual_tokens"],
                   masked_only_last_layer=True,
                   padding_mask=kwargs["text_padding_position"], text_mask=text_mask)
    full = model.beit3(**kwargs, vision_masked_position=image_mask)["encoder_out"]
    torch.testing.assert_close(logits["mim"], model.mim_head(full[:, 1:VISION][image_mask]), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(logits["mlm"], model.mlm_head(full[:, VISION:][text_mask]), atol=2e-6, rtol=1e-5)


def test_bad_output_positions():
    model = _model()
    kwargs, positions = _pair()
    with pytest.raises(ValueError, match=r"output_positions has shape \(3, 23\).*\(3, 24\)"):
        model(**kwargs, output_positions=positions[:, 1:])
    with pytest.raises(ValueError, match="return_all_hiddens"):
        model(**kwargs, output_positions=positions, return_all_hiddens=True)
