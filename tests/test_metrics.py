"""Metrics against hand-worked values: top-k, VQA accuracy and answer normalisation, recall@K, BLEU, CIDEr-D."""
import importlib.util
import math
import random

import pytest
import torch

from beit3.metrics import (
    accuracy,
    bleu,
    caption_scores,
    cider_d,
    normalize_vqa_answer,
    ptb_tokenize,
    pycocoevalcap_available,
    retrieval_recall,
    topk_accuracy,
    vqa_accuracy,
    vqa_accuracy_single,
    vqa_soft_score,
)


def test_topk_and_plain_accuracy():
    logits = torch.tensor([[0.1, 0.9, 0.0, 0.3], [0.8, 0.1, 0.06, 0.04], [0.2, 0.3, 0.4, 0.1]])
    target = torch.tensor([1, 2, 0])  # row 0 top-1 hit; row 1 target ranked 3rd of 4; row 2 ranked 3rd
    assert topk_accuracy(logits, target, topk=(1, 2, 3)) == pytest.approx([100 / 3, 100 / 3, 100.0])
    assert accuracy(logits, torch.tensor([1, 0, 0])) == pytest.approx(200 / 3)
    with pytest.raises(ValueError, match="classes"):
        topk_accuracy(logits, target, topk=(5,))


def test_vqa_answer_normalisation():
    assert normalize_vqa_answer("Two") == "2"
    assert normalize_vqa_answer("the dog.") == "dog"
    assert normalize_vqa_answer("a man's hat!") == "man's hat"
    assert normalize_vqa_answer("dont") == "don't"
    assert normalize_vqa_answer("black/white") == "black white"
    assert normalize_vqa_answer("1,000") == "1000"  # digit comma digit: punctuation removed, not spaced
    assert normalize_vqa_answer("3.5") == "3.5"
    assert normalize_vqa_answer("yes.\n") == "yes"


@pytest.mark.parametrize("matches, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)])
def test_vqa_leave_one_out_accuracy(matches, expected):
    # 10 leave-one-out subsets of 9: a matching annotator left out leaves matches-1, another leaves matches.
    answers = ["red"] * matches + ["blue", "green"] * 5
    answers = answers[:10]
    want = (matches * min(1, (matches - 1) / 3) + (10 - matches) * min(1, matches / 3)) / 10
    assert want == pytest.approx(expected, abs=0.005)
    assert vqa_accuracy_single("red", answers) == pytest.approx(want)


def test_vqa_accuracy_normalises_only_when_humans_disagree():
    answers = {1: ["two"] * 3 + ["2"] * 3 + ["Two."] + ["three"] * 3, 2: ["two"] * 10}
    # q1: every answer normalises to "2" except three "3": 7 matches -> 1.0; q2: humans agree, "2" != "two" -> 0.
    assert vqa_accuracy_single("2", answers[1]) == 1.0
    assert vqa_accuracy_single("2", answers[2]) == 0.0
    assert vqa_accuracy({1: "2", 2: "2"}, answers) == pytest.approx(50.0)
    with pytest.raises(KeyError):
        vqa_accuracy({3: "x"}, answers)


def test_vqa_soft_score():
    logits = torch.tensor([[0.1, 2.0, 0.3], [1.0, 0.0, -1.0]])
    targets = torch.tensor([[0.0, 0.6, 1.0], [0.3, 1.0, 0.0]])
    assert vqa_soft_score(logits, targets) == pytest.approx((0.6 + 0.3) / 2 * 100)


def test_retrieval_recall_both_directions():
    # 2 images, 4 texts (texts 0,1 of image 10; texts 2,3 of image 20).
    scores = torch.tensor([[0.1, 0.9, 0.2, 0.3], [0.8, 0.1, 0.3, 0.2]])
    text_image_ids = torch.tensor([10, 10, 20, 20])
    r = retrieval_recall(scores, text_image_ids, image_ids=torch.tensor([10, 20]), ks=(1, 2, 3))
    # image 10: best text 1 (its own) -> hit@1; image 20: ranking 0,2,3,1 -> own text first at rank 2.
    assert (r["tr_r1"], r["tr_r2"], r["tr_r3"]) == pytest.approx((50.0, 100.0, 100.0))
    # text->image: t0 -> image 20 first (miss@1); t1 -> 10 hit; t2 -> 20 hit; t3 -> 10 first (miss@1).
    assert (r["ir_r1"], r["ir_r2"], r["ir_r3"]) == pytest.approx((50.0, 100.0, 100.0))
    assert r["average_score"] == pytest.approx((50 + 100 + 100) * 2 / 6)


def test_ptb_like_tokenizer():
    assert ptb_tokenize("A Dog's toy, isn't it?  3.5 m.") == "a dog 's toy is n't it 3.5 m"


def test_bleu_on_a_worked_example():
    hyp = {1: ["a cat on the mat"]}
    refs = {1: ["the cat is on the mat", "there is a cat here"]}
    # closest reference length to 5 words: 5 ("there is a cat here") -> no brevity penalty.
    # clipped matches against the max count over refs: 1-grams a,cat,on,the,mat = 5/5; 2-grams "on the","the mat",
    # "a cat" = 3/4; 3-grams "on the mat" = 1/3; 4-grams 0/2.
    p = [5 / 5, 3 / 4, 1 / 3, 1e-15 / 2]
    want = [math.prod(p[: n + 1]) ** (1 / (n + 1)) for n in range(4)]
    assert bleu(hyp, refs) == pytest.approx(want, rel=1e-6)
    # with only the 6-word reference the brevity penalty exp(1 - 6/5) applies.
    p = [4 / 5, 2 / 4, 1 / 3]
    want = [math.prod(p[: n + 1]) ** (1 / (n + 1)) * math.exp(1 - 6 / 5) for n in range(3)]
    assert bleu(hyp, {1: ["the cat is on the mat"]})[:3] == pytest.approx(want, rel=1e-6)


def test_cider_d_on_a_worked_example():
    hyps = {1: ["a b c"], 2: ["e e f"], 3: ["a x"]}
    refs = {1: ["a b d"], 2: ["e f", "e f g h"], 3: ["a y"]}
    u = math.log(3)  # idf of an n-gram in at most one reference set (3 images)
    v = math.log(3) - math.log(2)  # idf of "a", in two reference sets
    pen = math.exp(-1 / 72)  # bigram-length difference 1, sigma 6
    s1 = ((v * v + u * u) / (v * v + 2 * u * u) + 1 / 2) / 4 * 10
    ref_a = (2 / math.sqrt(10) + 1 / math.sqrt(2)) * pen  # clipping: min(2u, u) for "e"
    ref_b = (1 / math.sqrt(5) + 1 / math.sqrt(6)) * pen
    s2 = (ref_a + ref_b) / 4 / 2 * 10
    s3 = (v * v / (v * v + u * u)) / 4 * 10
    mean, per_image = cider_d(hyps, refs)
    assert per_image == pytest.approx([s1, s2, s3], rel=1e-9)
    assert mean == pytest.approx((s1 + s2 + s3) / 3, rel=1e-9)


def test_caption_scores_tokenises_and_names_like_pycocoevalcap():
    preds = {7: "A cat on the mat.", 8: "Two dogs!"}
    refs = {7: ["The cat is on the mat.", "There is a cat here"], 8: ["two dogs", "Two brown dogs."]}
    got = caption_scores(preds, refs, backend="python")
    assert set(got) == {"Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "CIDEr"}
    tok = lambda d: {k: [ptb_tokenize(c) for c in v] for k, v in d.items()}  # noqa: E731
    assert got["Bleu_2"] == pytest.approx(bleu(tok({k: [v] for k, v in preds.items()}), tok(refs))[1])
    with pytest.raises(ValueError, match="backend"):
        caption_scores(preds, refs, backend="java")


@pytest.mark.skipif(not pycocoevalcap_available(), reason="pycocoevalcap and Java not installed")
def test_python_scores_equal_pycocoevalcap():
    preds = {1: "a man riding a horse on a beach", 2: "a plate of food with broccoli", 3: "two cats sleeping on a couch"}
    refs = {
        1: ["a man rides a horse along the beach", "a person riding a brown horse on sand", "man on horse at the beach"],
        2: ["a plate with broccoli and meat", "food on a white plate", "a dish of broccoli and rice"],
        3: ["two cats asleep on a sofa", "cats sleeping on the couch", "a pair of cats lying on a couch"],
    }
    ours = caption_scores(preds, refs, backend="python")
    theirs = caption_scores(preds, refs, backend="pycocoevalcap")
    for key in ours:
        assert ours[key] == pytest.approx(theirs[key], rel=1e-6), key


@pytest.mark.skipif(importlib.util.find_spec("pycocoevalcap") is None, reason="pycocoevalcap not installed")
def test_bleu_and_cider_d_equal_pycocoevalcap_scorers():
    """The pure-Python scorers against pycocoevalcap's Bleu and Cider classes (pure Python too: only its PTB
    tokenizer needs Java) on already tokenised captions, random corpora with repeated n-grams and length spread."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    words = "a the red blue star circle on left of two cats dog sits mat".split()
    rng = random.Random(0)
    sentence = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 12)))  # noqa: E731
    for _ in range(5):
        refs = {i: [sentence() for _ in range(rng.randint(1, 5))] for i in range(rng.randint(2, 12))}
        preds = {i: [sentence()] for i in refs}
        theirs_bleu, _ = Bleu(4).compute_score(refs, preds, verbose=0)
        theirs_cider, theirs_per_image = Cider().compute_score(refs, preds)
        assert bleu(preds, refs) == pytest.approx(theirs_bleu, rel=1e-9, abs=1e-12)
        mean, per_image = cider_d(preds, refs)
        assert mean == pytest.approx(theirs_cider, rel=1e-9)
        assert per_image == pytest.approx(list(theirs_per_image), rel=1e-9)
