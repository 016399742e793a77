"""Masking and the masked-data-modeling objective."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import beit3
from beit3.masking import BlockMaskGenerator, MaskingConfig, mask_text
from beit3.models.pretraining import BEiT3ForPretraining
from beit3.pretrain import MaskedDataModeling, ObjectiveConfig, PretrainInputs, apply_stage


@pytest.mark.parametrize("grid,ratio", [((14, 14), 0.4), ((4, 4), 0.4), ((6, 8), 0.25)])
def test_block_masks_have_the_exact_count_and_are_blocky(grid, ratio):
    gen = BlockMaskGenerator(*grid, ratio)
    rng = np.random.default_rng(0)
    masks = [gen(rng) for _ in range(50)]
    assert all(m.sum() == round(ratio * grid[0] * grid[1]) for m in masks)
    again = BlockMaskGenerator(*grid, ratio)
    assert all(np.array_equal(a, again(np.random.default_rng(0))) for a in masks[:1])
    if grid == (14, 14):
        # blocks, not scattered cells: most masked cells have a masked 4-neighbour
        m = masks[0].reshape(grid)
        neighbours = np.zeros_like(m)
        neighbours[1:] |= m[:-1]
        neighbours[:-1] |= m[1:]
        neighbours[:, 1:] |= m[:, :-1]
        neighbours[:, :-1] |= m[:, 1:]
        assert (m & neighbours).sum() / m.sum() > 0.8


def test_text_masking_counts_and_80_10_10():
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(4, 500, (400, 40), generator=g)
    tokens[:, 0], tokens[:, -1] = 0, 2
    maskable = torch.ones_like(tokens, dtype=torch.bool)
    maskable[:, 0] = maskable[:, -1] = False
    maskable[:200, 30:] = False  # padding
    out, chosen = mask_text(tokens, maskable, 0.15, mask_id=999, random_token_range=(4, 500), generator=g)
    assert not chosen[~maskable].any()
    assert torch.equal(chosen.sum(1)[:200], torch.full((200,), round(29 * 0.15)))
    assert torch.equal(chosen.sum(1)[200:], torch.full((200,), round(38 * 0.15)))
    assert torch.equal(out[~chosen], tokens[~chosen])
    as_mask = (out[chosen] == 999).float().mean().item()
    kept = (out[chosen] == tokens[chosen]).float().mean().item()
    assert 0.76 < as_mask < 0.84 and 0.07 < kept < 0.13


def _model():
    torch.manual_seed(0)
    cfg = beit3.models.model_config("beit3_tiny_patch8_32")
    return BEiT3ForPretraining(cfg, codebook_size=32)


def _step_batch(seed=0, batch=4, text_len=8):
    g = torch.Generator().manual_seed(seed)
    def text():
        tokens = torch.randint(4, 900, (batch, text_len), generator=g)
        tokens[:, 0] = 0
        tokens[:, -1] = 2
        pad = torch.zeros(batch, text_len, dtype=torch.bool)
        pad[0, -3:] = True
        tokens[pad] = 1
        return {"text_tokens": tokens, "padding_mask": pad}
    def image():
        return {"image": torch.randn(batch, 3, 32, 32, generator=g), "codes": torch.randint(0, 32, (batch, 16), generator=g)}
    return {"image": image(), "text": text(), "pair": {**image(), **text()}}


class _Batches:
    def __init__(self):
        self.i = 0

    def __iter__(self):
        while True:
            self.i += 1
            yield _step_batch(self.i)

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, s):
        self.i = s["i"]


def _inputs(seed=0):
    return PretrainInputs(_Batches(), MaskingConfig(), (4, 4), mask_token_id=999, random_token_range=(4, 900),
                          special_token_ids=(0, 1, 2, 3), seed=seed)


def test_objective_matches_an_independent_computation():
    model = _model().eval()
    objective = MaskedDataModeling(model, ObjectiveConfig(image_weight=1.0, text_weight=0.5, pair_weight=2.0))
    batch = next(iter(_inputs()))
    loss, metrics = objective(batch)
    backbone = model.beit3
    img = batch["image"]
    feats = backbone(visual_tokens=img["image"], vision_masked_position=img["image_mask"])["encoder_out"][:, 1:]
    l_img = F.cross_entropy(model.mim_head(feats[img["image_mask"]]), img["codes"][img["image_mask"]])
    txt = batch["text"]
    feats = backbone(textual_tokens=txt["text_tokens"], text_padding_position=txt["padding_mask"])["encoder_out"]
    l_txt = F.cross_entropy(model.mlm_head(feats[txt["text_mask"]]), txt["text_targets"][txt["text_mask"]])
    pair = batch["pair"]
    feats = backbone(visual_tokens=pair["image"], vision_masked_position=pair["image_mask"],
                     textual_tokens=pair["text_tokens"], text_padding_position=pair["padding_mask"])["encoder_out"]
    l_pi = F.cross_entropy(model.mim_head(feats[:, 1:17][pair["image_mask"]]), pair["codes"][pair["image_mask"]])
    l_pt = F.cross_entropy(model.mlm_head(feats[:, 17:][pair["text_mask"]]), pair["text_targets"][pair["text_mask"]])
    expected = l_img + 0.5 * l_txt + 2.0 * (l_pi + l_pt)
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["loss_pair_text"], l_pt, atol=1e-5, rtol=1e-5)
    assert pair["text_mask"].sum(1).tolist()[1:] == [3, 3, 3]  # 50% of 6 maskable tokens
    assert metrics["num_samples"].item() == 12


def test_masked_only_last_layer_gives_the_same_loss():
    model = _model().eval()
    batch = next(iter(_inputs()))
    full, _ = MaskedDataModeling(model, ObjectiveConfig())(batch)
    masked_only, _ = MaskedDataModeling(model, ObjectiveConfig(masked_only_last_layer=True))(batch)
    torch.testing.assert_close(masked_only, full, atol=1e-5, rtol=1e-5)


def test_masks_are_a_function_of_seed_rank_and_step_and_resume_exactly():
    a = _inputs()
    it = iter(a)
    first = [next(it) for _ in range(3)]
    state = a.state_dict()
    fourth = next(it)
    b = _inputs()
    b.load_state_dict(state)
    resumed = next(iter(b))
    for stream in fourth:
        for key in fourth[stream]:
            assert torch.equal(fourth[stream][key], resumed[stream][key]), (stream, key)
    other_rank = next(iter(PretrainInputs(_Batches(), MaskingConfig(), (4, 4), 999, (4, 900), (0, 1, 2, 3), seed=0, rank=1)))
    assert not torch.equal(other_rank["image"]["image_mask"], first[0]["image"]["image_mask"])


def test_a_few_steps_reduce_every_stream_loss():
    model = _model().train()
    objective = MaskedDataModeling(model, ObjectiveConfig())
    opt = torch.optim.AdamW(objective.parameters(), lr=2e-3)
    batch = next(iter(_inputs()))
    history = []
    for _ in range(15):
        opt.zero_grad()
        loss, metrics = objective(batch)
        loss.backward()
        opt.step()
        history.append({k: v.item() for k, v in metrics.items()})
    for key in ("loss_image", "loss_text", "loss_pair"):
        assert history[-1][key] < 0.8 * history[0][key], key


def test_text_stage_trains_only_language_experts_and_copies_attention():
    model = _model()
    apply_stage(model, "text")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "beit3.encoder.layers.0.ffn.B.fc1.weight" in trainable and "mlm_head.weight" in trainable
    assert "beit3.encoder.layers.0.ffn.A.fc1.weight" not in trainable
    assert not any("self_attn" in n for n in trainable) and "mim_head.weight" not in trainable
    attn = model.beit3.encoder.layers[0].self_attn
    assert torch.equal(attn.q_proj.A.weight, attn.q_proj.B.weight)
    apply_stage(model, "joint")
    assert all(p.requires_grad for p in model.parameters())
    with pytest.raises(ValueError, match="unknown pretraining stage"):
        apply_stage(model, "video")
