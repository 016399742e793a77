"""The backbone computes what the official torchscale BEiT3 computes, and behaves as reference/beit3.md §1 says."""
from pathlib import Path

import numpy as np
import pytest
import torch

import beit3

GOLDEN = Path(__file__).parent / "data" / "golden_tiny"


@pytest.fixture(scope="module")
def golden_model():
    model = beit3.create_model("beit3_tiny_patch8_32").eval()
    report = beit3.load_checkpoint(model, GOLDEN / "checkpoint.pth", strict=True)
    assert not report.missing and not report.unexpected
    return model


@pytest.mark.parametrize("case", ["image", "text", "image_text"])
def test_golden_equivalence_with_torchscale(golden_model, case):
    io = np.load(GOLDEN / "io.npz")
    kwargs = {}
    if f"{case}.visual_tokens" in io:
        kwargs["visual_tokens"] = torch.from_numpy(io[f"{case}.visual_tokens"])
    if f"{case}.textual_tokens" in io:
        kwargs["textual_tokens"] = torch.from_numpy(io[f"{case}.textual_tokens"])
        kwargs["text_padding_position"] = torch.from_numpy(io[f"{case}.text_padding_position"])
    with torch.no_grad():
        out = golden_model(**kwargs, return_all_hiddens=True)
    assert out["multiway_split_position"] == int(io[f"{case}.multiway_split_position"])
    assert torch.equal(out["encoder_padding_mask"], torch.from_numpy(io[f"{case}.encoder_padding_mask"]))
    for key in ("encoder_out", "encoder_embedding"):
        np.testing.assert_allclose(out[key].numpy(), io[f"{case}.{key}"], atol=1e-5, rtol=0)
    hidden = torch.stack(out["encoder_states"]).numpy()
    assert hidden.shape == io[f"{case}.hidden_states"].shape
    np.testing.assert_allclose(hidden, io[f"{case}.hidden_states"], atol=1e-5, rtol=0)


def _meta_model(name, **overrides):
    with torch.device("meta"):
        return beit3.create_model(name, **overrides)


def test_parameter_counts_match_the_official_models():
    assert sum(p.numel() for p in _meta_model("beit3_base_patch16_224").parameters()) == 220_987_392
    large = sum(p.numel() for p in _meta_model("beit3_large_patch16_224").parameters())
    assert round(large / 1e6, 2) == 672.70


def test_state_dict_keys_follow_the_official_layout():
    model = _meta_model("beit3_base_patch16_224")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    d, f = 768, 3072
    expected = {
        "text_embed.weight": (64010, d),
        "vision_embed.mask_token": (1, 1, d),
        "vision_embed.cls_token": (1, 1, d),
        "vision_embed.proj.weight": (d, 3, 16, 16),
        "vision_embed.proj.bias": (d,),
        "encoder.embed_positions.A.weight": (199, d),
        "encoder.embed_positions.B.weight": (1024, d),
    }
    for ab in "AB":
        expected[f"encoder.layer_norm.{ab}.weight"] = (d,)
        expected[f"encoder.layer_norm.{ab}.bias"] = (d,)
        for i in range(12):
            p = f"encoder.layers.{i}."
            for proj in "qkv":
                expected[f"{p}self_attn.{proj}_proj.{ab}.weight"] = (d, d)
                expected[f"{p}self_attn.{proj}_proj.{ab}.bias"] = (d,)
            expected[f"{p}self_attn.out_proj.{ab}.weight"] = (d, d)
            expected[f"{p}self_attn.out_proj.{ab}.bias"] = (d,)
            for ln in ("self_attn.inner_attn_ln", "self_attn_layer_norm", "final_layer_norm"):
                expected[f"{p}{ln}.{ab}.weight"] = (d,)
                expected[f"{p}{ln}.{ab}.bias"] = (d,)
            expected[f"{p}ffn.{ab}.fc1.weight"] = (f, d)
            expected[f"{p}ffn.{ab}.fc1.bias"] = (f,)
            expected[f"{p}ffn.{ab}.fc2.weight"] = (d, f)
            expected[f"{p}ffn.{ab}.fc2.bias"] = (d,)
            expected[f"{p}ffn.{ab}.ffn_layernorm.weight"] = (f,)
            expected[f"{p}ffn.{ab}.ffn_layernorm.bias"] = (f,)
    assert shapes == expected


@pytest.mark.parametrize("res,rows", [(224, 199), (384, 579), (480, 903), (768, 2307)])
def test_registry_sizes_and_vision_position_rows(res, rows):
    model = _meta_model(f"beit3_base_patch16_{res}")
    assert model.encoder.embed_positions.A.weight.shape[0] == rows
    giant = _meta_model("beit3_giant_patch14_224").config
    assert (giant.depth, giant.embed_dim, giant.ffn_dim, giant.num_heads, giant.patch_size) == (40, 1408, 6144, 16, 14)


def test_create_model_overrides_and_errors():
    model = beit3.create_model(
        "beit3_tiny_patch8_32", embed_dim=32, depth=1, num_heads=2, ffn_dim=64, img_size=16, patch_size=4,
        vocab_size=50, normalize_output=False, drop_path_rate=0.1,
    )
    cfg = model.config
    assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.ffn_dim, cfg.img_size, cfg.patch_size) == (32, 1, 2, 64, 16, 4)
    assert model.encoder.layer_norm is None and model.text_embed.num_embeddings == 50
    assert "beit3_large_patch16_480" in beit3.list_models("beit3_large_*")
    with pytest.raises(TypeError, match="colour"):
        beit3.create_model("beit3_tiny_patch8_32", colour=3)
    with pytest.raises(KeyError, match="beit3_huge"):
        beit3.create_model("beit3_huge_patch16_224")
    with pytest.raises(ValueError, match="num_heads"):
        beit3.create_model("beit3_tiny_patch8_32", num_heads=5)


def _tiny(**overrides):
    torch.manual_seed(0)
    return beit3.create_model("beit3_tiny_patch8_32", **overrides).eval()


def _inputs(batch=2, text_len=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=g)
    tokens = torch.randint(4, 1000, (batch, text_len), generator=g)
    return images, tokens


def test_vision_masked_position_uses_the_mask_token():
    model = _tiny()
    with torch.no_grad():
        model.vision_embed.mask_token.normal_()
    images, _ = _inputs()
    masked = torch.zeros(2, 16, dtype=torch.bool)
    masked[0, [1, 5]] = True
    with torch.no_grad():
        plain = model(visual_tokens=images)["encoder_embedding"]
        emb = model(visual_tokens=images, vision_masked_position=masked)["encoder_embedding"]
    token = model.vision_embed.mask_token[0, 0]
    assert torch.allclose(emb[0, 2], token) and torch.allclose(emb[0, 6], token)  # +1 for the CLS token
    unmasked = torch.ones(2, 17, dtype=torch.bool)
    unmasked[0, [2, 6]] = False
    assert torch.equal(emb[unmasked], plain[unmasked])


@pytest.mark.parametrize("mask_dtype", [torch.bool, torch.long, torch.float32])
def test_attention_mask_nonzero_blocks(mask_dtype):
    """Image rows that may not see the text give exactly the image-only result, whatever the text is."""
    model = _tiny()
    images, tokens = _inputs()
    n_img, n_txt = 17, tokens.shape[1]
    mask = torch.zeros(n_img + n_txt, n_img + n_txt, dtype=mask_dtype)
    mask[:n_img, n_img:] = 1
    with torch.no_grad():
        alone = model(visual_tokens=images)["encoder_out"]
        joint = model(visual_tokens=images, textual_tokens=tokens, attn_mask=mask)["encoder_out"]
        other = model(visual_tokens=images, textual_tokens=(tokens + 7) % 1000, attn_mask=mask)["encoder_out"]
        unmasked = model(visual_tokens=images, textual_tokens=tokens)["encoder_out"]
    torch.testing.assert_close(joint[:, :n_img], alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(other[:, :n_img], alone, atol=1e-5, rtol=0)
    assert not torch.allclose(unmasked[:, :n_img], alone, atol=1e-3)


def test_padding_rows_zeroed_and_padded_keys_ignored():
    model = _tiny()
    images, tokens = _inputs()
    pad = torch.zeros_like(tokens, dtype=torch.bool)
    pad[:, -2:] = True
    changed = tokens.clone()
    changed[:, -2:] = 1
    with torch.no_grad():
        a = model(visual_tokens=images, textual_tokens=tokens, text_padding_position=pad, return_all_hiddens=True)
        b = model(visual_tokens=images, textual_tokens=changed, text_padding_position=pad)
    assert a["encoder_states"][0][:, -2:].abs().max() == 0
    keep = ~a["encoder_padding_mask"]
    torch.testing.assert_close(a["encoder_out"][keep], b["encoder_out"][keep], atol=1e-6, rtol=0)
    assert a["encoder_padding_mask"][:, :17].sum() == 0 and a["encoder_padding_mask"][:, 17:].equal(pad)


def test_explicit_positions_and_incremental_decoding_match_the_full_pass():
    model = _tiny()
    images, tokens = _inputs(text_len=5)
    n_img, n_txt = 17, 5
    total = n_img + n_txt
    causal = torch.ones(total, total, dtype=torch.long)
    causal[:n_img, :n_img] = 0
    causal[n_img:, :n_img] = 0
    causal[n_img:, n_img:] = 1 - torch.tril(torch.ones(n_txt, n_txt, dtype=torch.long))
    with torch.no_grad():
        full = model(visual_tokens=images, textual_tokens=tokens, attn_mask=causal)["encoder_out"]
        default = model(textual_tokens=tokens)["encoder_out"]
        explicit = model(textual_tokens=tokens, positions=torch.arange(2, 7).unsqueeze(0))["encoder_out"]
        torch.testing.assert_close(default, explicit, atol=0, rtol=0)
        state: dict = {}
        first = model(visual_tokens=images, textual_tokens=tokens[:, :1], attn_mask=causal[: n_img + 1, : n_img + 1],
                      incremental_state=state)["encoder_out"]
        steps = [first[:, -1]]
        for t in range(1, n_txt):
            out = model(textual_tokens=tokens[:, t : t + 1], attn_mask=causal[n_img + t : n_img + t + 1, : n_img + t + 1],
                        incremental_state=state, positions=torch.tensor([[t + 2]]))["encoder_out"]
            steps.append(out[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), full[:, n_img:], atol=1e-5, rtol=0)
    assert state[0]["prev_key"].shape == (2, 4, total, 16)


def _loss_and_grads(model, images, tokens):
    model.zero_grad()
    out = model(visual_tokens=images, textual_tokens=tokens)["encoder_out"]
    loss = out.pow(2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = _tiny().train()
    images, tokens = _inputs()
    loss_a, grads_a = _loss_and_grads(model, images, tokens)
    model.set_grad_checkpointing(True)
    loss_b, grads_b = _loss_and_grads(model, images, tokens)
    assert torch.equal(loss_a, loss_b) and grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], atol=1e-7, rtol=1e-5)


def test_drop_path_is_stochastic_in_training_only():
    model = _tiny(drop_path_rate=0.5)
    images, _ = _inputs()
    with torch.no_grad():
        assert torch.equal(model(visual_tokens=images)["encoder_out"], model(visual_tokens=images)["encoder_out"])
        model.train()
        torch.manual_seed(0)
        a = model(visual_tokens=images)["encoder_out"]
        torch.manual_seed(1)
        b = model(visual_tokens=images)["encoder_out"]
    assert not torch.allclose(a, b)


def _train_step(model, images, tokens):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(3):
        opt.zero_grad()
        out = model(visual_tokens=images, textual_tokens=tokens)["encoder_out"]
        loss = (out - 1).pow(2).mean()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_paper_variant_shared_attention():
    model = _tiny(share_attention=True).train()
    keys = model.state_dict().keys()
    assert "encoder.layers.0.self_attn.q_proj.module.weight" in keys
    assert not any(".self_attn.q_proj.A." in k for k in keys)
    decoupled = sum(p.numel() for p in _tiny().parameters())
    assert sum(p.numel() for p in model.parameters()) < decoupled
    losses = _train_step(model, *_inputs())
    assert losses[-1] < losses[0]


def test_paper_variant_vision_language_experts_in_top_layers():
    model = _tiny(vl_expert_layers=1).train()
    keys = model.state_dict().keys()
    assert "encoder.layers.1.ffn.C.fc1.weight" in keys and "encoder.layers.0.ffn.C.fc1.weight" not in keys
    images, tokens = _inputs()
    model.eval()
    with torch.no_grad():
        pair_before = model(visual_tokens=images, textual_tokens=tokens)["encoder_out"]
        image_before = model(visual_tokens=images)["encoder_out"]
        model.encoder.layers[1].ffn.C.fc2.bias.add_(1.0)
        pair_after = model(visual_tokens=images, textual_tokens=tokens)["encoder_out"]
        image_after = model(visual_tokens=images)["encoder_out"]
    assert torch.equal(image_before, image_after) and not torch.allclose(pair_before, pair_after)
    model.train()
    losses = _train_step(model, images, tokens)
    assert losses[-1] < losses[0]
    assert model.encoder.layers[1].ffn.C.fc1.weight.grad is not None


def test_bad_inputs_get_clear_errors():
    model = _tiny()
    with pytest.raises(ValueError, match=r"img_size=32"):
        model(visual_tokens=torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="longer than the text position table"):
        model(textual_tokens=torch.zeros(1, 1023, dtype=torch.long))
    with pytest.raises(ValueError, match="needs textual_tokens"):
        model()
    with pytest.raises(ValueError, match="attn_mask has shape"):
        model(textual_tokens=torch.zeros(1, 4, dtype=torch.long), attn_mask=torch.zeros(3, 3))



def test_initialisation_options_official_by_default():
    torch.manual_seed(0)
    official = beit3.create_model("beit3_tiny_patch8_32", embed_dim=128, ffn_dim=512)
    q = official.encoder.layers[0].self_attn.q_proj.A.weight
    assert q.abs().max() <= 0.02 + 1e-7 and 0.009 < q.std() < 0.012  # trunc-normal(0.02) cut at ±1 std
    assert 0.9 < official.encoder.embed_positions.B.weight.std() < 1.1  # nn.Embedding's N(0, 1)
    torch.manual_seed(0)
    scaled = beit3.create_model("beit3_tiny_patch8_32", embed_dim=128, ffn_dim=512, init_truncation=2.0,
                                position_init_std=0.02)
    q = scaled.encoder.layers[0].self_attn.q_proj.A.weight
    assert q.abs().max() <= 0.04 + 1e-7 and 0.016 < q.std() < 0.019
    for table in (scaled.encoder.embed_positions.A, scaled.encoder.embed_positions.B):
        assert 0.018 < table.weight.std() < 0.022
    vqa = beit3.create_model("beit3_tiny_patch8_32_vqav2", embed_dim=128, ffn_dim=512, num_classes=10, head_init="xavier")
    bound = (6 / (128 + 256)) ** 0.5
    assert vqa.head[0].weight.abs().max() > 0.5 * bound and vqa.head[0].weight.abs().max() <= bound
    with pytest.raises(ValueError, match="head_init"):
        beit3.create_model("beit3_tiny_patch8_32", head_init="kaiming")
