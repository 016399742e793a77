"""Held-out pretraining evaluation and the grounding probe (beit3.probing, tools/probe_pretrained.py)."""
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn


from beit3.masking import MaskingConfig
from beit3.models.pretraining import BEiT3ForPretraining
from beit3.models.registry import model_config
from beit3.data.eval_set import (EvalSet, PretrainEvalConfig, build_eval_set, other_sample, probe_mask,
                                 resolve_eval_sources, val_counterpart)
from beit3.probing import evaluate_pretraining
from beit3.text import TextTokenizer

ROOT = Path(__file__).resolve().parents[1]
PROBES = {"colour": ["red", "green", "blue", "yellow", "purple", "white"], "shape": ["circle", "square", "triangle", "star"]}


def test_val_counterparts_of_training_sources():
    assert val_counterpart("coco_retrieval.train.jsonl") == "coco_retrieval.val.jsonl"
    assert val_counterpart("imagenet.train.index.jsonl") == "imagenet.val.index.jsonl"
    assert val_counterpart("corpus.txt") == "corpus.val.txt"
    assert val_counterpart("laion/{00000..00009}.tar") == "" and val_counterpart("shards") == ""


def test_eval_sources_default_to_existing_val_files_and_explicit_ones_must_exist(tmp_path):
    (tmp_path / "pairs.val.jsonl").write_text("")
    cfg = PretrainEvalConfig()
    found = resolve_eval_sources(cfg, tmp_path, "images.train.jsonl", "pairs.train.jsonl", ["corpus.txt"],
                                 ("image", "text", "pair"))
    assert found == {"pair": "pairs.val.jsonl"}
    cfg = PretrainEvalConfig(image_index="missing.jsonl", pair_index="none")
    with pytest.raises(FileNotFoundError, match="eval.image_index"):
        resolve_eval_sources(cfg, tmp_path, "", "pairs.train.jsonl", [], ("image", "pair"))
    assert resolve_eval_sources(PretrainEvalConfig(pair_index="none"), tmp_path, "", "pairs.train.jsonl", [], ("pair",)) == {}


def test_other_sample_is_a_bijection_onto_other_images():
    keys = [f"img{i // 5}" for i in range(30)]  # five captions per image, as a retrieval index
    other = other_sample(keys)
    assert sorted(other.tolist()) == list(range(30))
    assert all(keys[i] != keys[j] for i, j in enumerate(other.tolist()))
    with pytest.raises(ValueError, match="more than half"):
        other_sample(["a"] * 6 + ["b"] * 2)


def test_probe_mask_matches_whole_multi_token_words():
    tokens = torch.tensor([[0, 7, 8, 9, 7, 8, 2, 1], [0, 8, 7, 9, 9, 2, 1, 1]])
    mask = probe_mask(tokens, [[7, 8], [9]])
    assert mask.tolist() == [[False, True, True, True, True, True, False, False],
                             [False, False, False, True, True, False, False, False]]


class TaggedModel(nn.Module):
    """MLM logits predict the tag of the image (pixel [0, 0, 0]); MIM logits predict the tag of the text (its first
    token). Logits are 5 at the prediction, 0 elsewhere, so losses and accuracies can be computed by hand."""

    vocab, codebook = 10, 10

    def forward(self, images=None, image_mask=None, text_tokens=None, padding_mask=None, text_mask=None):
        out = {}
        if text_mask is not None:
            tags = images[:, 0, 0, 0].long()
            rows = tags[:, None].expand_as(text_tokens)[text_mask]
            out["mlm"] = 5.0 * nn.functional.one_hot(rows, self.vocab).float()
        if image_mask is not None:
            tags = text_tokens[:, 0]
            rows = tags[:, None].expand(-1, image_mask.shape[1])[image_mask]
            out["mim"] = 5.0 * nn.functional.one_hot(rows, self.codebook).float()
        return out

    def parameters(self, recurse=True):
        yield torch.zeros(1)


def test_metrics_equal_a_hand_computation():
    # 4 pairs; image i has tag i; text i starts with token 4 + (i % 2); masked targets are listed below
    images = torch.zeros(4, 3, 2, 2)
    images[:, 0, 0, 0] = torch.arange(4.0)
    targets = torch.tensor([[4, 0, 1], [5, 1, 1], [4, 2, 3], [5, 3, 3]])
    text_mask = torch.tensor([[False, True, True], [False, True, True], [False, True, False], [False, True, True]])
    codes = torch.tensor([[4, 4], [5, 0], [4, 5], [9, 5]])
    image_mask = torch.tensor([[True, True], [True, False], [True, True], [False, True]])
    pair = {"image": images, "codes": codes, "image_mask": image_mask, "text_tokens": targets.clone(),
            "padding_mask": torch.zeros(4, 3, dtype=torch.bool), "text_mask": text_mask, "text_targets": targets}
    other = torch.tensor([2, 3, 0, 1])
    probe_text_mask = torch.tensor([[False, True, False], [False, False, False], [False, True, False], [False, False, True]])
    probes = {"tag": {"text_tokens": targets, "text_mask": probe_text_mask, "samples": torch.tensor([0, 2, 3])}}
    eval_set = EvalSet({"pair": pair}, other, probes)
    metrics = evaluate_pretraining(TaggedModel(), eval_set, batch_size=3)

    def ce(correct: bool) -> float:  # logits 5 at one class of 10, 0 elsewhere
        return math.log(math.exp(5) + 9) - (5 if correct else 0)

    # pair MLM, own image: predictions = own tag; masked targets (0,1),(1,1),(2),(3,3) -> hits 1+2+1+2 = 6 of 7
    assert metrics["acc_pair_text"] == pytest.approx(6 / 7)
    assert metrics["loss_pair_text"] == pytest.approx((6 * ce(True) + ce(False)) / 7)
    # other image (tags 2,3,0,1): hits 0 + 0 + 0 + 0
    assert metrics["acc_pair_text_other"] == 0.0
    assert metrics["grounding_gap_text"] == pytest.approx(6 / 7)
    # pair MIM, own text (text tags 4,5,4,5): image 0 codes (4,4) both hit, image 1 (5) hit, image 2 (4,5) one, image 3 (5) one
    assert metrics["acc_pair_image"] == pytest.approx(5 / 6)
    # other pass: image other[i] with text i: image 2 (4,5) with tag 4 -> 1; image 3 (5) with 5 -> 1; image 0 (4,4)
    # with 4 -> 2; image 1 (5) with 5 -> 1: 5 of 6 (the text tags do not tell these images apart)
    assert metrics["acc_pair_image_other"] == pytest.approx(5 / 6) and metrics["grounding_gap_image"] == pytest.approx(0.0)
    # probe: sample 0 target 0 (own tag 0: hit), sample 2 target 2 (hit), sample 3 target 3 (hit); other images miss
    assert metrics["probe_tag_acc"] == 1.0 and metrics["probe_tag_acc_other"] == 0.0 and metrics["probe_tag_gap"] == 1.0
    assert metrics["probe_tag_tokens"] == 3


def _tokenizer(root):
    return TextTokenizer.from_file(root / "beit3.spm")


def _codes(images):
    """A deterministic stand-in tokenizer: 4x4 mean-colour cells quantised into 64 codes."""
    cells = nn.functional.adaptive_avg_pool2d(images, 4)  # (B, 3, 4, 4) in [0, 1]
    q = (cells * 3.999).long().clamp(0, 3)
    return (q[:, 0] * 16 + q[:, 1] * 4 + q[:, 2]).flatten(1)


def _eval_set(root, **kw):
    return build_eval_set({"image": "imagenet.val.index.jsonl", "text": "corpus.val.txt", "pair": "coco_retrieval.val.jsonl"},
                          root, _tokenizer(root), image_size=32, tokenizer_image_size=32, patch_grid=(4, 4),
                          masking=MaskingConfig(min_block_patches=2), codes_fn=_codes, max_samples=40, max_text_len=40,
                          seed=0, probe_words=PROBES, **kw)


def _model(root, seed=0):
    torch.manual_seed(seed)
    cfg = model_config("beit3_tiny_patch8_32", vocab_size=_tokenizer(root).vocab_size)
    return BEiT3ForPretraining(cfg, codebook_size=64)


class CrossModalBlocked(nn.Module):
    """A pretraining model whose image and text positions cannot attend to each other (attn_mask)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, images=None, text_tokens=None, **kw):
        mask = None
        if images is not None and text_tokens is not None:
            vision = self.model.beit3.vision_embed.num_position_embeddings()
            length = vision + text_tokens.shape[1]
            mask = torch.zeros(length, length, dtype=torch.bool)
            mask[:vision, vision:] = True
            mask[vision:, :vision] = True
        return self.model(images=images, text_tokens=text_tokens, attn_mask=mask, **kw)


def test_eval_set_is_fixed_and_held_out(demo_root):
    a, b = _eval_set(demo_root), _eval_set(demo_root)
    for stream in ("image", "text", "pair"):
        for key, value in a.streams[stream].items():
            assert torch.equal(value, b.streams[stream][key]), (stream, key)
    pair = a.streams["pair"]
    assert pair["text_mask"].any() and (pair["text_tokens"][pair["text_mask"]] == _tokenizer(demo_root).mask_id).all()
    assert not torch.equal(pair["text_tokens"], pair["text_targets"])
    assert pair["image_mask"].sum(1).tolist() == [round(0.4 * 16)] * pair["image_mask"].shape[0]
    colour = a.probes["colour"]
    words = {_tokenizer(demo_root).decode([t]) for t in pair["text_targets"][colour["text_mask"]].tolist()}
    assert words <= set(PROBES["colour"]) and len(words) > 2
    assert len(colour["samples"]) == a.num_samples()["pair"]  # every demo caption names a colour


def test_gap_is_exactly_zero_when_text_cannot_see_the_image(demo_root):
    eval_set = _eval_set(demo_root)
    model = _model(demo_root)
    with torch.no_grad():  # make the untrained model's outputs depend strongly on what it attends to
        for layer in model.beit3.encoder.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                for expert in (proj.A, proj.B):
                    expert.weight.normal_(0, 0.3)
    blind = evaluate_pretraining(CrossModalBlocked(model), eval_set, batch_size=8)
    for key in ("grounding_gap_text", "grounding_gap_image", "probe_colour_gap", "probe_shape_gap"):
        assert blind[key] == 0.0, key
    assert blind["loss_pair_text"] == blind["loss_pair_text_other"]
    seeing = evaluate_pretraining(model, eval_set, batch_size=8)  # the same weights, attention unblocked
    assert seeing["loss_pair_text"] != seeing["loss_pair_text_other"]
    assert seeing["loss_pair_image"] != seeing["loss_pair_image_other"]


def test_evaluations_repeat_exactly_and_do_not_depend_on_the_batch_size(demo_root):
    eval_set = _eval_set(demo_root)
    model = _model(demo_root)
    first = evaluate_pretraining(model, eval_set, batch_size=8)
    assert evaluate_pretraining(model, eval_set, batch_size=8) == first
    other = evaluate_pretraining(model, eval_set, batch_size=5)
    assert other.keys() == first.keys()
    for key, value in first.items():
        assert other[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    expected = {"loss_image", "acc_image", "loss_text", "acc_text", "acc_pair_text", "acc_pair_text_other",
                "acc_pair_image", "acc_pair_image_other", "grounding_gap_text", "grounding_gap_image",
                "probe_colour_acc", "probe_colour_acc_other", "probe_colour_gap", "probe_colour_tokens"}
    assert expected <= first.keys()
    assert model.training  # evaluation puts the model back in train mode


def test_probe_tool_on_an_export_and_on_an_official_layout_file(demo_root, tmp_path, capsys):
    from beit3.cli.commands import probe_pretrained_main
    from beit3.models import save_pretrained

    model = _model(demo_root)
    export = save_pretrained(model, tmp_path / "export")
    official = tmp_path / "beit3_tiny.pth"
    torch.save({"model": model.state_dict()}, official)
    args = ["--data-root", str(demo_root), "--config", str(ROOT / "configs/pretrain/demo.yaml"),
            "--set", "objective.masking.min_block_patches=2", "eval.max_samples=40"]
    assert probe_pretrained_main(["--checkpoint", str(export), *args, "--out", str(tmp_path / "a.json")]) == 0
    assert probe_pretrained_main(["--checkpoint", str(official), "--model", "beit3_tiny_patch8_32", *args,
                                  "--out", str(tmp_path / "b.json")]) == 0
    a, b = (json.loads((tmp_path / f"{n}.json").read_text()) for n in "ab")
    assert a["metrics"] == b["metrics"] and a["sources"] == {"text": "corpus.val.txt", "pair": "coco_retrieval.val.jsonl"}
    assert {"probe_colour_gap", "probe_shape_gap", "grounding_gap_text"} <= a["metrics"].keys()
    assert "no visual tokenizer" in a["notes"][0]
    out = capsys.readouterr().out
    assert "colour words" in out and "pair-MLM" in out
    assert probe_pretrained_main(["--checkpoint", str(official), *args, "--out", str(tmp_path / "c.json")]) == 2
    assert "name its architecture" in capsys.readouterr().err
    assert probe_pretrained_main(["--checkpoint", str(export), "--data-root", str(tmp_path / "nowhere"),
                                  "--out", str(tmp_path / "d.json")]) == 2
    assert "nowhere" in capsys.readouterr().err
