"""Masking and the masked-data-modeling objective."""
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import beit3
from beit3.masking import BlockMaskGenerator, MaskingConfig, mask_text
from beit3.models.pretraining import BEiT3ForPretraining
from beit3.masked_data_modeling import MaskedDataModeling, ObjectiveConfig, apply_stage
from beit3.masking import PretrainInputs

from helpers import loss_and_grads_on_two_ranks


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


def test_pair_mlm_focal_weighting_matches_a_hand_computation():
    model = _model().eval()
    with torch.no_grad():
        model.mlm_head.weight.mul_(30)  # confident, unequal predictions: the weights differ from token to token
    batch = next(iter(_inputs()))
    plain, _ = MaskedDataModeling(model, ObjectiveConfig(image_weight=0, text_weight=0))(batch)
    focal, metrics = MaskedDataModeling(model, ObjectiveConfig(image_weight=0, text_weight=0,
                                                               pair_mlm_focal_gamma=2.0))(batch)
    pair = batch["pair"]
    feats = model.beit3(visual_tokens=pair["image"], vision_masked_position=pair["image_mask"],
                        textual_tokens=pair["text_tokens"], text_padding_position=pair["padding_mask"])["encoder_out"]
    l_pi = F.cross_entropy(model.mim_head(feats[:, 1:17][pair["image_mask"]]), pair["codes"][pair["image_mask"]])
    logits = model.mlm_head(feats[:, 17:][pair["text_mask"]])
    targets = pair["text_targets"][pair["text_mask"]]
    p_target = logits.softmax(-1).gather(1, targets[:, None]).squeeze(1)
    weight = (1 - p_target) ** 2
    l_pt = (weight * -p_target.log()).sum() / weight.sum()
    torch.testing.assert_close(focal, l_pi + l_pt, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["loss_pair_text"], l_pt, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(focal, plain)  # the weighting changes the pair loss (image/text streams: weight 0)
    with pytest.raises(ValueError, match="pair_mlm_focal_gamma"):
        ObjectiveConfig(pair_mlm_focal_gamma=-1.0)


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


def _vlmo_objective(seed=0, itm=1.0):
    torch.manual_seed(seed)
    cfg = beit3.models.model_config("beit3_tiny_patch8_32")
    model = BEiT3ForPretraining(cfg, codebook_size=32, contrastive=True, matching=itm > 0)
    return MaskedDataModeling(model, ObjectiveConfig(itc_weight=1.0, itm_weight=itm))


def _pairs(seed, batch):
    pair = _step_batch(seed, batch=batch)["pair"]
    pair["image_mask"] = torch.zeros(batch, 16, dtype=torch.bool)
    pair["image_mask"][:, :6] = True
    pair["text_targets"] = pair["text_tokens"].clone()
    pair["text_mask"] = torch.zeros_like(pair["text_tokens"], dtype=torch.bool)
    pair["text_mask"][:, 1:3] = True
    pair["image_id"] = torch.arange(batch) + 100 * seed
    return pair


def test_hard_negatives_are_never_a_positive():
    from beit3.models.contrastive import sample_hard_negatives

    torch.manual_seed(0)
    ids = torch.tensor([0, 0, 1, 2, 2, 2, 3, 4])  # several captions of one image are all positives of it
    same = ids[:, None] == ids[None, :]
    for trial in range(200):
        sim = torch.randn(8, 8) * (1 + trial % 5) * 10
        sim[same] += 50.0  # positives are the most similar: the sampler must still skip them
        negative_text, negative_image = sample_hard_negatives(sim, same)
        assert not same[torch.arange(8), negative_text].any()
        assert not same[negative_image, torch.arange(8)].any()
    with pytest.raises(ValueError, match="another image"):
        sample_hard_negatives(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool))


def test_itc_and_itm_losses_are_logged_and_train_their_heads():
    objective = _vlmo_objective()
    pair = _pairs(0, 4)
    loss, metrics = objective({"pair": pair})
    for key in ("loss_itc", "acc_itc", "loss_itm", "acc_itm", "loss_pair_text", "loss_pair_image"):
        assert key in metrics, key
    assert loss.item() == pytest.approx((metrics["loss_pair"] + metrics["loss_itc"] + metrics["loss_itm"]).item(), rel=1e-5)
    loss.backward()
    model = objective.model
    for param in (model.logit_scale, model.vision_head.weight, model.language_head.weight, model.itm_head.classifier.weight):
        assert param.grad is not None and param.grad.abs().sum() > 0
    assert "logit_scale" in model.no_weight_decay()
    # the contrastive loss is CLIP's on the unmasked pairs, encoded separately
    with torch.no_grad():
        out = model(images=pair["image"], text_tokens=pair["text_targets"], padding_mask=pair["padding_mask"], head="contrastive")
        logits = out["logit_scale"] * out["image_features"] @ out["text_features"].T
        expected = (F.cross_entropy(logits, torch.arange(4)) + F.cross_entropy(logits.T, torch.arange(4))) / 2
    assert metrics["loss_itc"].item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="itc_weight > 0"):
        ObjectiveConfig(itm_weight=1.0)
    # itm_pairs: ITM on the first K pairs only (3K fused passes), negatives drawn from the whole batch
    seen = []
    original = model.beit3.forward
    model.beit3.forward = lambda **kw: seen.append(kw["textual_tokens"].shape[0] if kw.get("visual_tokens") is not None
                                                   and kw.get("textual_tokens") is not None else 0) or original(**kw)
    objective.itm_pairs = 2
    objective({"pair": pair})
    assert seen[-1] == 6 and seen[0] == 4  # the masked pair pass (4), then ITM on 2 pairs: 2 + 2 + 2


def _itc_loss(pairs, rank):
    objective = _vlmo_objective(itm=0.0).eval()
    local = {k: v[rank * 3:(rank + 1) * 3] for k, v in pairs.items()}
    return objective._image_text_losses(local, {}), objective


def test_itc_gathered_over_two_ranks_equals_one_process_on_the_whole_batch(tmp_path):
    pairs = _pairs(1, 6)
    objective = _vlmo_objective(itm=0.0).eval()
    single = objective._image_text_losses(pairs, {})
    single.backward()
    single_grads = torch.cat([p.grad.flatten() for p in objective.parameters() if p.grad is not None])
    loss, grads = loss_and_grads_on_two_ranks(partial(_itc_loss, pairs), tmp_path / "rank0.pt")
    assert loss.item() == pytest.approx(single.item(), rel=1e-5)
    torch.testing.assert_close(grads, single_grads, atol=1e-6, rtol=1e-4)
