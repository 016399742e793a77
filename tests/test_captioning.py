"""Captioning: the official uni-directional mask and masked-token logits, incremental decoding equal to full
recomputation, beam search identical with and without the cache, greedy = 1 beam, the captioning loss."""
import types

import pytest
import torch
import torch.nn.functional as F

import beit3
from beit3.generation import SpecialTokenIds, beam_search, greedy_search
from beit3.models.tasks import captioning_loss, unidirectional_mask

IMAGE_LEN = 1 + (32 // 8) ** 2
MASK_ID = 49


@pytest.fixture(scope="module")
def model():
    """A tiny captioner in float64 with peaked predictions and a likely </s>, so beams end at different lengths."""
    torch.manual_seed(0)
    m = beit3.create_model("beit3_tiny_patch8_32_captioning", vocab_size=50).double().eval()
    with torch.no_grad():
        m.mlm_head.weight.normal_(0, 0.3)
        m.beit3.text_embed.weight.normal_(0, 1.0)
        m.mlm_head.bias[2] = 2.0
    return m


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.double)


def hand_mask(image_len, text_len):
    """1 = blocked, written entry by entry from the description in reference/beit3.md §3."""
    total = image_len + text_len
    mask = torch.ones(total, total, dtype=torch.bool)
    for q in range(total):
        for k in range(total):
            if q < image_len:
                mask[q, k] = k >= image_len  # image sees only the image
            else:
                mask[q, k] = k >= image_len and k > q  # text sees the image and earlier text incl. itself
    return mask


def test_unidirectional_mask_matches_the_official_rule():
    assert torch.equal(unidirectional_mask(5, 4), hand_mask(5, 4))


def test_masked_logits_follow_the_official_computation(model, images):
    text = torch.randint(3, 49, (3, 6), generator=torch.Generator().manual_seed(2))
    text[:, 0] = 0
    pad = torch.zeros(3, 6, dtype=torch.long)
    pad[2, 4:] = 1
    masked = torch.zeros(3, 6, dtype=torch.long)
    masked[0, 2] = masked[1, 1] = masked[1, 5] = masked[2, 3] = 1
    with torch.no_grad():
        logits, state = model(images, text, pad, masked, image_id=torch.arange(3))
        out = model.beit3(textual_tokens=text, visual_tokens=images, text_padding_position=pad, attn_mask=hand_mask(IMAGE_LEN, 6))
        text_out = out["encoder_out"][:, IMAGE_LEN:]
        rows = [text_out[b, p] for b, p in ((0, 2), (1, 1), (1, 5), (2, 3))]  # (batch, position) order
        want = F.linear(torch.stack(rows), model.mlm_head.weight, model.mlm_head.bias)
        all_logits, _ = model(images, text, pad, None)
    assert state is None
    torch.testing.assert_close(logits, want)
    assert all_logits.shape == (3, 6, 50)
    torch.testing.assert_close(all_logits[1, 5], want[2])


def test_incremental_decoding_equals_full_recomputation(model, images):
    words = [7, 11, 23]
    with torch.no_grad():
        state = {}
        text = torch.tensor([[0, MASK_ID]] * 3)
        logits, state = model(images, text, torch.zeros_like(text), None, text_len=2, incremental_state=state)
        assert set(state) == set(range(model.config.depth))
        assert state[0]["prev_key"].shape == (3, 4, IMAGE_LEN + 2, 16)
        steps = [logits[:, -1]]
        for cur_len, word in enumerate(words, start=3):
            for layer in state.values():  # official: drop the <mask> entry after each step
                layer["prev_key"], layer["prev_value"] = layer["prev_key"][:, :, :-1], layer["prev_value"][:, :, :-1]
            text = torch.tensor([[word, MASK_ID]] * 3)
            logits, state = model(None, text, torch.ones_like(text), None, text_len=cur_len, incremental_state=state)
            steps.append(logits[:, -1])
        for n, cached in enumerate(steps):
            full = torch.tensor([[0] + words[:n] + [MASK_ID]] * 3)
            logits, _ = model(images, full, torch.zeros_like(full), None)
            torch.testing.assert_close(cached, logits[:, -1])
    with pytest.raises(ValueError, match="incremental_state"):
        model(None, text, None, None, text_len=4)
    with pytest.raises(ValueError, match="does not fit the cache"):
        model(None, text, None, None, text_len=9, incremental_state=state)


@pytest.mark.parametrize("max_len", [32, 8])  # 8: the length limit closes the beams
def test_beam_search_is_identical_with_and_without_cache(model, images, max_len):
    cached = beam_search(model, images, mask_id=MASK_ID, max_len=max_len)
    recomputed = beam_search(model, images, mask_id=MASK_ID, max_len=max_len, use_cache=False)
    assert [c.token_ids for c in cached] == [c.token_ids for c in recomputed]
    for a, b in zip(cached, recomputed):
        assert a.score == pytest.approx(b.score, abs=1e-9)
    assert all(2 not in c.token_ids and len(c.token_ids) <= max_len - 2 for c in cached)


def sequence_logprob(model, image, words, eos=True):
    """Sum of log p(word | prefix) computed by full recomputation, for an independent score check."""
    total = 0.0
    targets = words + ([2] if eos else [])
    for n, target in enumerate(targets):
        text = torch.tensor([[0] + words[:n] + [MASK_ID]])
        logits, _ = model(image[None], text, torch.zeros_like(text), None)
        total += F.log_softmax(logits[0, -1], dim=-1)[target].item()
    return total


def test_beam_search_score_is_the_length_normalised_log_probability(model, images):
    with torch.no_grad():
        for image, caption in zip(images, beam_search(model, images, mask_id=MASK_ID, max_len=32)):
            ended = len(caption.token_ids) < 30
            logprob = sequence_logprob(model, image, caption.token_ids, eos=ended)
            length = len(caption.token_ids) + (2 if ended else 1)  # <s> + words (+ </s>) as the official cur_len
            assert caption.score == pytest.approx(logprob / length**0.6, abs=1e-9)


def test_greedy_is_the_argmax_path_scored_by_its_log_probability(model, images):
    tokenizer = types.SimpleNamespace(bos_id=0, pad_id=1, eos_id=2, mask_id=MASK_ID)
    for max_len in (32, 6):
        greedy = greedy_search(model, images, tokenizer, max_len=max_len)
        recomputed = greedy_search(model, images, mask_id=MASK_ID, max_len=max_len, use_cache=False)
        assert [c.token_ids for c in greedy] == [c.token_ids for c in recomputed]
        for image, g, r in zip(images, greedy, recomputed):
            ended = len(g.token_ids) < max_len - 2
            assert g.score == pytest.approx(r.score, abs=1e-9)
            assert g.score == pytest.approx(sequence_logprob(model, image, g.token_ids, eos=ended), abs=1e-6)
    with torch.no_grad():  # independent check of the first image: argmax of the full recomputation, step by step
        words = []
        while len(words) < 30:
            text = torch.tensor([[0] + words + [MASK_ID]])
            logits, _ = model(images[:1], text, torch.zeros_like(text), None)
            word = int(logits[0, -1].argmax())
            if word == 2:
                break
            words.append(word)
    assert greedy_search(model, images[:1], mask_id=MASK_ID)[0].token_ids == words


def test_token_ids_and_bad_arguments(model, images):
    assert SpecialTokenIds.resolve(mask_id=5) == SpecialTokenIds(0, 1, 2, 5)
    with pytest.raises(ValueError, match="mask"):
        beam_search(model, images)
    with pytest.raises(TypeError, match="mask_id"):
        beam_search(model, images, types.SimpleNamespace(bos_id=0, pad_id=1, eos_id=2))
    with pytest.raises(ValueError, match="max_len"):
        greedy_search(model, images, mask_id=MASK_ID, max_len=2)


def test_captioning_loss_equals_hand_computation():
    torch.manual_seed(0)
    logits, targets, eps = torch.randn(5, 7), torch.tensor([0, 3, 6, 2, 2]), 0.1
    per_token = []
    for row, t in zip(logits, targets):
        logp = F.log_softmax(row, dim=0)
        q = torch.full((7,), eps / 6)
        q[t] = 1 - eps
        per_token.append(float((q * (q.log() - logp)).sum()))
    assert captioning_loss(logits, targets, eps).item() == pytest.approx(sum(per_token) / 5, rel=1e-5)
    kept = sorted(per_token)[:4]  # drop the worst 20%
    assert captioning_loss(logits, targets, eps, drop_worst_ratio=0.2).item() == pytest.approx(sum(kept) / 4, rel=1e-5)
