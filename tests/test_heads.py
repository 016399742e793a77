"""Task models: official checkpoint layout, outputs against a by-hand computation of the official heads, training
steps, the CLIP loss (single process and across 2 gloo ranks), ITM re-ranking, zero-shot use, training hooks."""
import math
from functools import partial

import pytest
import torch
import torch.nn.functional as F

import beit3
from beit3.text import TextTokenizer
from beit3.models.tasks import clip_loss, pad_token_ids, retrieval_scores, vqa_loss, zero_shot_classifier, zero_shot_logits

from helpers import loss_and_grads_on_two_ranks

TINY = "beit3_tiny_patch8_32_{}"
D, V = 64, 1000  # tiny width and vocabulary


def head_shapes(task, num_classes):
    """Official head keys and shapes (reference/beit3.md §2-3), written out independently of the model code."""
    if task == "imageclassification":
        return {"fc_norm.weight": (D,), "fc_norm.bias": (D,), "head.weight": (num_classes, D), "head.bias": (num_classes,)}
    if task == "vqav2":
        return {
            "pooler.norm.weight": (D,), "pooler.norm.bias": (D,), "pooler.dense.weight": (D, D), "pooler.dense.bias": (D,),
            "head.0.weight": (2 * D, D), "head.0.bias": (2 * D,), "head.1.weight": (2 * D,), "head.1.bias": (2 * D,),
            "head.3.weight": (num_classes, 2 * D), "head.3.bias": (num_classes,),
        }
    if task == "nlvr2":
        return {
            "head.norm1.weight": (4 * D,), "head.norm1.bias": (4 * D,), "head.dense1.weight": (2 * D, 4 * D),
            "head.dense1.bias": (2 * D,), "head.norm2.weight": (2 * D,), "head.norm2.bias": (2 * D,),
            "head.dense2.weight": (num_classes, 2 * D), "head.dense2.bias": (num_classes,),
        }
    if task == "retrieval":
        return {"vision_head.weight": (D, D), "language_head.weight": (D, D), "logit_scale": ()}
    return {"mlm_head.weight": (V, D), "mlm_head.bias": (V,)}


NUM_CLASSES = {"imageclassification": 10, "vqav2": 7, "nlvr2": 2, "retrieval": None, "captioning": None}
NORMALIZE_OUTPUT = {"imageclassification": False, "vqav2": False, "nlvr2": True, "retrieval": True, "captioning": True}


def official_checkpoint(task, path):
    """A file laid out like an official fine-tuned checkpoint: backbone under ``beit3.`` + head keys, random values."""
    torch.manual_seed(1)
    backbone = beit3.create_model("beit3_tiny_patch8_32", normalize_output=NORMALIZE_OUTPUT[task])
    state = {f"beit3.{k}": torch.randn_like(v) * 0.5 for k, v in backbone.state_dict().items()}
    state.update({k: torch.randn(shape) * 0.5 for k, shape in head_shapes(task, NUM_CLASSES[task]).items()})
    torch.save({"model": state}, path)
    return state


def build(task, **overrides):
    torch.manual_seed(0)
    if NUM_CLASSES[task] and task != "nlvr2":
        overrides.setdefault("num_classes", NUM_CLASSES[task])
    return beit3.create_model(TINY.format(task), **overrides)


@pytest.fixture(scope="module")
def inputs():
    g = torch.Generator().manual_seed(3)
    text = torch.randint(3, V, (3, 6), generator=g)
    text[:, 0] = 0
    padding = torch.zeros(3, 6, dtype=torch.long)
    padding[1, 4:] = 1
    padding[2, 2:] = 1
    return {
        "image": torch.randn(3, 3, 32, 32, generator=g),
        "image2": torch.randn(3, 3, 32, 32, generator=g),
        "text": text,
        "padding": padding,
    }


def ln(x, state, prefix):
    return F.layer_norm(x, x.shape[-1:], state[f"{prefix}.weight"], state[f"{prefix}.bias"], eps=1e-5)


def lin(x, state, prefix, bias=True):
    return F.linear(x, state[f"{prefix}.weight"], state[f"{prefix}.bias"] if bias else None)


def expected_outputs(task, model, state, inputs):
    """The official head formulas applied by hand to the backbone's own output."""
    image, image2, text, pad = inputs["image"], inputs["image2"], inputs["text"], inputs["padding"]
    backbone = model.beit3
    if task == "imageclassification":
        x = backbone(visual_tokens=image)["encoder_out"]
        return lin(ln(x[:, 1:].mean(1), state, "fc_norm"), state, "head")
    if task == "vqav2":
        x = backbone(textual_tokens=text, visual_tokens=image, text_padding_position=pad)["encoder_out"]
        pooled = torch.tanh(lin(ln(x[:, 0], state, "pooler.norm"), state, "pooler.dense"))
        h = F.gelu(ln(lin(pooled, state, "head.0"), state, "head.1"))
        return lin(h, state, "head.3")
    if task == "nlvr2":
        image_tokens = 1 + (32 // 8) ** 2
        feats = []
        for img in (image, image2):  # each pair encoded on its own
            x = backbone(textual_tokens=text, visual_tokens=img, text_padding_position=pad)["encoder_out"]
            feats += [x[:, 0], x[:, image_tokens]]
        h = lin(ln(torch.cat(feats, -1), state, "head.norm1"), state, "head.dense1")
        return lin(F.gelu(ln(h, state, "head.norm2")), state, "head.dense2")
    if task == "retrieval":
        v = backbone(visual_tokens=image)["encoder_out"][:, 0]
        t = backbone(textual_tokens=text, text_padding_position=pad)["encoder_out"][:, 0]
        v = lin(v, state, "vision_head", bias=False)
        t = lin(t, state, "language_head", bias=False)
        return v / v.norm(dim=-1, keepdim=True), t / t.norm(dim=-1, keepdim=True)
    raise AssertionError(task)


def run(task, model, inputs):
    image, image2, text, pad = inputs["image"], inputs["image2"], inputs["text"], inputs["padding"]
    if task == "imageclassification":
        return model(image=image, unused_key="ignored")
    if task == "vqav2":
        return model(image=image, question=text, padding_mask=pad, qid=None)
    if task == "nlvr2":
        return model(image_a=image, image_b=image2, text_description=text, padding_mask=pad, label=None)
    if task == "retrieval":
        return model(image=image, text_description=text, padding_mask=pad, only_infer=True, image_id=None)
    raise AssertionError(task)


@pytest.mark.parametrize("task", ["imageclassification", "vqav2", "nlvr2", "retrieval", "captioning"])
def test_official_checkpoint_loads_with_no_missing_keys(task, tmp_path):
    state = official_checkpoint(task, tmp_path / "ckpt.pth")
    model = build(task).eval()
    report = beit3.load_checkpoint(model, tmp_path / "ckpt.pth", strict=True)
    assert report.missing == [] and report.unexpected == [] and report.dropped_mismatched == []
    assert model.config.normalize_output is NORMALIZE_OUTPUT[task]
    loaded = model.state_dict()
    for key, value in state.items():
        assert torch.equal(loaded[key], value), key


@pytest.mark.parametrize("task", ["imageclassification", "vqav2", "nlvr2", "retrieval"])
def test_outputs_follow_the_official_heads(task, tmp_path, inputs):
    state = official_checkpoint(task, tmp_path / "ckpt.pth")
    model = build(task).eval()
    beit3.load_checkpoint(model, tmp_path / "ckpt.pth", strict=True)
    with torch.no_grad():
        got = run(task, model, inputs)
        want = expected_outputs(task, model, state, inputs)
    if task == "retrieval":
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)
        assert torch.allclose(got[0].norm(dim=-1), torch.ones(3))
    else:
        assert got.shape == (3, NUM_CLASSES[task])
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_head_key_of_another_class_count_is_dropped(tmp_path):
    official_checkpoint("imageclassification", tmp_path / "ckpt.pth")  # 10 classes
    model = build("imageclassification", num_classes=5)
    report = beit3.load_checkpoint(model, tmp_path / "ckpt.pth")
    assert sorted(report.dropped_mismatched) == ["head.bias", "head.weight"]


def _loss(task, model, inputs):
    image, image2, text, pad = inputs["image"], inputs["image2"], inputs["text"], inputs["padding"]
    if task == "imageclassification":
        return F.cross_entropy(model(image), torch.tensor([0, 3, 9]))
    if task == "vqav2":
        targets = torch.zeros(3, 7)
        targets[0, 1], targets[1, 4], targets[2, 0] = 1.0, 0.6, 0.3
        return vqa_loss(model(image, text, pad), targets)
    if task == "nlvr2":
        return F.cross_entropy(model(image, image2, text, pad), torch.tensor([1, 0, 1]))
    if task == "retrieval":
        return model(image=image, text_description=text, padding_mask=pad)[0]
    masked = torch.zeros_like(text)
    masked[:, 2] = 1
    logits, _ = model(image, text, pad, masked)
    return F.cross_entropy(logits, text[:, 2])


HEAD_PARAM = {
    "imageclassification": "head.weight", "vqav2": "head.3.weight", "nlvr2": "head.dense2.weight",
    "retrieval": "language_head.weight", "captioning": "mlm_head.weight",
}
# The expert the task's loss must reach: vision (A) for image-only, language (B) wherever text is encoded.
BACKBONE_PARAM = {
    "imageclassification": "beit3.encoder.layers.0.ffn.A.fc1.weight",
    **{t: "beit3.encoder.layers.0.ffn.B.fc1.weight" for t in ("vqav2", "nlvr2", "retrieval", "captioning")},
}


@pytest.mark.parametrize("task", ["imageclassification", "vqav2", "nlvr2", "retrieval", "captioning"])
def test_each_head_trains_a_step(task, inputs):
    model = build(task, drop_path_rate=0.1).train()
    params = dict(model.named_parameters())
    before = {k: params[k].detach().clone() for k in (HEAD_PARAM[task], BACKBONE_PARAM[task])}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loss = _loss(task, model, inputs)
    assert torch.isfinite(loss)
    loss.backward()
    for key in before:
        assert params[key].grad is not None and params[key].grad.abs().sum() > 0, key
    optimizer.step()
    for key, value in before.items():
        assert not torch.equal(params[key].detach(), value), key


def test_clip_loss_equals_hand_computation():
    torch.manual_seed(0)
    img = F.normalize(torch.randn(4, 8), dim=-1)
    txt = F.normalize(torch.randn(4, 8), dim=-1)
    scale = torch.tensor(1 / 0.07)
    total = 0.0
    for i in range(4):
        row = [float(scale * img[i] @ txt[j]) for j in range(4)]
        col = [float(scale * txt[i] @ img[j]) for j in range(4)]
        total += -row[i] + math.log(sum(math.exp(r) for r in row))
        total += -col[i] + math.log(sum(math.exp(c) for c in col))
    assert clip_loss(img, txt, scale).item() == pytest.approx(total / 8, rel=1e-5)


def _retrieval_loss(image, text, pad, rank):
    model = build("retrieval").train()
    part = slice(rank * 2, rank * 2 + 2)
    loss, _, _ = model(image=image[part], text_description=text[part], padding_mask=pad[part])
    return loss, model


def test_gathered_clip_loss_across_two_ranks_equals_single_process(tmp_path):
    torch.manual_seed(5)
    image, text = torch.randn(4, 3, 32, 32), torch.randint(3, V, (4, 5))
    pad = torch.zeros(4, 5, dtype=torch.long)
    pad[3, 3:] = 1
    model = build("retrieval").train()
    loss, _, _ = model(image=image, text_description=text, padding_mask=pad)
    loss.backward()
    single_grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    dist_loss, dist_grads = loss_and_grads_on_two_ranks(partial(_retrieval_loss, image, text, pad), tmp_path / "rank0.pt")
    assert dist_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    # Averaged over ranks the gradients are those of the global batch: they flowed through the gather (a gather
    # without gradients would leave out every cross-rank term and differ).
    torch.testing.assert_close(dist_grads, single_grads, atol=1e-6, rtol=1e-4)


def test_itm_loss_trains_and_rerank_rescores_the_contrastive_top_k(inputs):
    model = build("retrieval", itm=True).train()
    assert model.init_kwargs == {"itm": True}
    image, text, pad = inputs["image"], inputs["text"], inputs["padding"]
    torch.manual_seed(0)
    loss, v, t = model(image=image, text_description=text, padding_mask=pad)
    itc_only = clip_loss(v, t, model.logit_scale.exp())
    assert loss.item() > itc_only.item()  # the ITM term (BCE >= 0) was added
    loss.backward()
    assert model.itm_head.classifier.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="another image"):
        model(image=image, text_description=text, padding_mask=pad, image_id=torch.zeros(3, dtype=torch.long))

    model.eval()
    itc = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3], [0.4, 0.6, 0.7]])
    i2t, t2i = model.rerank(image, text, pad, itc, top_k=2, batch_size=4)
    with torch.no_grad():
        for i in range(3):
            for j in range(3):
                itm = model.itm_score(image[i : i + 1], text[j : j + 1], pad[j : j + 1]).item()
                in_row_top2 = j in itc[i].topk(2).indices.tolist()
                in_col_top2 = i in itc[:, j].topk(2).indices.tolist()
                want_i2t = itc[i, j] + itm if in_row_top2 else itc[i, j] - 1e4
                want_t2i = itc[i, j] + itm if in_col_top2 else itc[i, j] - 1e4
                assert i2t[i, j].item() == pytest.approx(float(want_i2t), abs=1e-4)
                assert t2i[i, j].item() == pytest.approx(float(want_t2i), abs=1e-4)
    with pytest.raises(RuntimeError, match="itm=True"):
        build("retrieval").itm_score(image, text, pad)


def test_zero_shot_retrieval_and_classification(inputs):
    model = build("retrieval").eval()
    image, text, pad = inputs["image"], inputs["text"], inputs["padding"]
    scores = retrieval_scores(model, image, text, pad, batch_size=2)
    with torch.no_grad():
        v, t = model(image=image, text_description=text, padding_mask=pad, only_infer=True)
    torch.testing.assert_close(scores, v @ t.T)

    class StandIn:  # a stand-in text tokenizer: one id per word, wrapped <s> ... </s> by TextTokenizer.pad_ids
        bos_id, pad_id, eos_id = 0, 1, 2
        pad_ids = TextTokenizer.pad_ids
        encode_padded = TextTokenizer.encode_padded

        @staticmethod
        def encode(sentence):
            return [3 + sum(map(ord, w)) % (V - 3) for w in sentence.split()]

    names = ["cat", "golden retriever"]
    templates = ("a photo of a {}.", "a drawing of a {}.")
    classifier = zero_shot_classifier(model, names, templates, tokenizer=StandIn())
    with torch.no_grad():
        rows = []
        for name in names:
            ids, mask = pad_token_ids([[0, *StandIn.encode(t.format(name)), 2] for t in templates], pad_id=1)
            _, feats = model(text_description=ids, padding_mask=mask, only_infer=True)
            rows.append(F.normalize(feats.mean(0), dim=-1))
        expected = model.logit_scale.exp() * v @ torch.stack(rows).T
    torch.testing.assert_close(zero_shot_logits(model, image, classifier), expected)


def test_training_hooks():
    model = build("retrieval")
    assert model.no_weight_decay() == {"beit3.encoder.embed_positions.A.weight", "beit3.vision_embed.cls_token", "logit_scale"}
    depth = model.config.depth
    assert model.num_layers_for_lr_decay() == depth  # engine scale decay ** (depth + 1 - id): 1 at the top
    assert model.get_layer_id("beit3.text_embed.weight") == 0
    assert model.get_layer_id("beit3.encoder.embed_positions.B.weight") == 0
    assert model.get_layer_id("beit3.encoder.layers.1.ffn.A.fc1.weight") == 2
    assert model.get_layer_id("beit3.encoder.layer_norm.A.weight") == depth + 1
    assert model.get_layer_id("vision_head.weight") == depth + 1
    assert model.get_layer_id("logit_scale") == depth + 1
    assert model.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    model.set_grad_checkpointing(True)
    assert model.beit3.encoder.grad_checkpointing


def test_head_init_scale():
    cls_model = build("imageclassification")
    assert cls_model.head.weight.abs().max() <= 0.02 * 0.001 + 1e-12
    assert cls_model.head.weight.abs().max() > 0
    nlvr = build("nlvr2")
    for layer in (nlvr.head.dense1, nlvr.head.dense2):
        assert 0 < layer.weight.abs().max() <= 0.02 * 0.001 + 1e-12
    vqa = build("vqav2")
    assert 0.001 < vqa.head[3].weight.abs().max() <= 0.02 + 1e-9  # not scaled


def test_save_and_from_pretrained_round_trip(tmp_path, inputs):
    model = build("vqav2", num_classes=7).eval()
    beit3.save_pretrained(model, tmp_path / "vqa")
    loaded = beit3.from_pretrained(tmp_path / "vqa").eval()
    assert type(loaded).__name__ == "BEiT3ForVisualQuestionAnswering" and loaded.head[3].out_features == 7
    with torch.no_grad():
        torch.testing.assert_close(run("vqav2", loaded, inputs), run("vqav2", model, inputs))


def test_registry_names_and_clear_errors(inputs):
    names = set(beit3.list_models("beit3_*_patch16_*_*"))
    expected = {
        "beit3_base_patch16_224_imageclassification", "beit3_large_patch16_224_imageclassification",
        "beit3_base_patch16_384_vqav2", "beit3_base_patch16_480_vqav2", "beit3_large_patch16_384_vqav2",
        "beit3_large_patch16_480_vqav2", "beit3_large_patch16_768_vqav2", "beit3_base_patch16_224_nlvr2",
        "beit3_large_patch16_224_nlvr2", "beit3_base_patch16_224_retrieval", "beit3_base_patch16_384_retrieval",
        "beit3_large_patch16_384_retrieval", "beit3_base_patch16_224_captioning", "beit3_base_patch16_480_captioning",
        "beit3_large_patch16_480_captioning",
    }
    assert expected <= names
    assert beit3.models.model_config("beit3_large_patch16_768_vqav2").img_size == 768
    assert beit3.models.model_config("beit3_base_patch16_224_imageclassification").normalize_output is False
    assert build("vqav2", num_classes=3129).head[3].out_features == 3129
    model = build("vqav2")
    with pytest.raises(ValueError, match="question"):
        model(inputs["image"], inputs["text"][0], None)
    with pytest.raises(ValueError, match="num_classes"):
        build("nlvr2", num_classes=0)
    with pytest.raises(ValueError, match="both image and text"):
        build("retrieval")(image=inputs["image"])
