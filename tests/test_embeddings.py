"""Using a checkpoint: create_model_and_transforms / get_tokenizer / encode_image / encode_text on PIL images and raw
strings, zero-shot classification and retrieval, feature extraction (resumable, bad images skipped) and ONNX export
checked with onnxruntime."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import beit3
from beit3.cli.use import export_onnx_main, extract_features_main
from beit3.embeddings import extract_features, load_dual_encoder
from beit3.text import TextTokenizer

from helpers import shape_image


@pytest.fixture(scope="module")
def folder(demo_root, tmp_path_factory):
    """A tiny retrieval model saved with the demo data's text tokenizer."""
    tok = TextTokenizer.from_file(demo_root / "beit3.spm")
    torch.manual_seed(0)
    model = beit3.create_model("beit3_tiny_patch8_32_retrieval", vocab_size=tok.mask_id + 1).eval()
    out = tmp_path_factory.mktemp("models") / "retrieval"
    beit3.save_pretrained(model, out, text_tokenizer=demo_root / "beit3.spm")
    return out


@pytest.fixture()
def image_dir(tmp_path):
    import numpy as np
    rng = np.random.default_rng(0)
    (tmp_path / "imgs" / "sub").mkdir(parents=True)
    for i in range(5):
        shape_image(rng, 40).save(tmp_path / "imgs" / ("sub" if i % 2 else "") / f"{i}.png")
    (tmp_path / "imgs" / "broken.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "texts.txt").write_text("a red circle\n\na blue square\na green star on the left\n")
    return tmp_path


def test_raw_inputs_give_the_tensors_embeddings(folder, demo_root):
    model, train_tf, eval_tf = beit3.create_model_and_transforms(folder)
    assert not model.training and (folder / "beit3.spm").is_file()
    tok = beit3.get_tokenizer(folder)
    images = [shape_image(__import__("numpy").random.default_rng(i), 48) for i in range(3)]
    texts = ["a red circle", "two blue squares and a star"]
    with torch.no_grad():
        got_images = model.encode_image(images)
        want_images = model.encode_image(torch.stack([eval_tf(im) for im in images]))
        got_texts = model.encode_text(texts)
        ids = [tok.encode(t) for t in texts]
        tokens, pad = tok.pad_ids(ids, max(map(len, ids)) + 2)
        want_texts = model.encode_text(tokens, pad)
        inferred = model.encode_text(tokens)  # <pad> ids are the padding when no mask is given
    assert torch.equal(got_images, want_images) and torch.allclose(got_texts, want_texts)
    assert torch.allclose(inferred, want_texts)
    assert tokens[0, 0] == tok.bos_id and tokens[0, len(ids[0]) + 1] == tok.eos_id
    assert torch.allclose(got_images.norm(dim=-1), torch.ones(3)) and train_tf is not eval_tf
    # the eval transform is a bicubic resize and mean = std = 0.5
    assert eval_tf(Image.new("RGB", (7, 9), (255, 0, 127))).shape == (3, 32, 32)
    assert torch.allclose(eval_tf(Image.new("RGB", (32, 32), (255, 0, 0)))[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_zero_shot_classifier_wraps_prompts_like_training(folder):
    model, _, _ = beit3.create_model_and_transforms(folder)
    tok = beit3.get_tokenizer(folder)
    names, templates = ["red", "blue"], ["a {} circle", "an image of a {} object"]
    classifier = beit3.zero_shot_classifier(model, names, templates)
    assert torch.allclose(classifier, beit3.zero_shot_classifier(model, names, templates, tokenizer=tok))
    with torch.no_grad():
        rows = []
        for name in names:
            ids = [[tok.bos_id, *tok.encode(t.format(name)), tok.eos_id] for t in templates]
            width = max(map(len, ids))
            tokens = torch.tensor([i + [tok.pad_id] * (width - len(i)) for i in ids])
            rows.append(F.normalize(model.encode_text(tokens, tokens == tok.pad_id).mean(0), dim=-1))
    assert torch.allclose(classifier, torch.stack(rows), atol=1e-6)
    images = torch.randn(2, 3, 32, 32)
    logits = beit3.zero_shot_logits(model, images, classifier)
    assert torch.allclose(logits, model.logit_scale.exp() * model.encode_image(images) @ classifier.T)
    with pytest.raises(TypeError, match="list of strings"):
        beit3.zero_shot_classifier(model, names, "a {} circle")


def test_checkpoint_without_trained_retrieval_heads_is_refused(tmp_path):
    beit3.save_pretrained(beit3.create_model("beit3_tiny_patch8_32"), tmp_path / "backbone")
    with pytest.raises(beit3.CheckpointError, match="no trained retrieval heads.*retrieval fine-tuned model"):
        beit3.create_model_and_transforms("beit3_tiny_patch8_32_retrieval", pretrained=tmp_path / "backbone")
    with pytest.raises(beit3.CheckpointError, match="no trained retrieval heads"):
        load_dual_encoder(tmp_path / "backbone")
    assert load_dual_encoder(tmp_path / "backbone", features="cls").features == "cls"  # backbone features: fine


def test_token_ids_past_the_vocabulary_are_a_clear_error():
    model = beit3.create_model("beit3_tiny_patch8_32_retrieval").eval()
    with pytest.raises(ValueError, match=r"id 1000, outside this model's vocabulary \[0, 1000\)"):
        model.encode_text(torch.tensor([[0, 5, 1000, 2]]))
    with pytest.raises(TypeError, match="need a processor"):
        model.encode_text(["a red circle"])


def test_zero_shot_retrieval_over_a_folder_and_a_text_file(folder, image_dir):
    model = load_dual_encoder(folder)
    result = beit3.zero_shot_retrieval(model, image_dir / "imgs", image_dir / "texts.txt", top_k=2)
    assert result["images"] == ["0.png", "2.png", "4.png", "sub/1.png", "sub/3.png"]
    assert result["texts"] == ["a red circle", "a blue square", "a green star on the left"]
    assert [s["image"] for s in result["skipped"]] == ["broken.jpg"]
    assert result["scores"].shape == (5, 3)
    assert result["text_to_image"][1] == result["scores"][:, 1].topk(2).indices.tolist()
    assert result["image_to_text"][0] == result["scores"][0].topk(2).indices.tolist()


def test_extract_features_tool_and_resume(folder, image_dir, monkeypatch, capsys):
    out = image_dir / "feats.safetensors"
    assert extract_features_main(["--checkpoint", str(folder), "--images", str(image_dir / "imgs"), "--texts",
                                  str(image_dir / "texts.txt"), "--out", str(out), "--chunk-size", "2",
                                  "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "skipped 1 unreadable image(s)" in printed and "broken.jpg" in printed
    from safetensors.torch import load_file
    full = load_file(str(out))
    report = json.loads((image_dir / "feats.safetensors.json").read_text())
    assert full["image_features"].shape == (5, 64) and full["text_features"].shape == (3, 64)
    kept = [report["images"][i] for i in full["image_index"].tolist()]
    assert "broken.jpg" in report["images"] and "broken.jpg" not in kept
    assert not (image_dir / "feats.safetensors.parts").exists()
    model = load_dual_encoder(folder)
    with torch.no_grad():
        want = model.encode_image([image_dir / "imgs" / p for p in kept])
    assert torch.allclose(full["image_features"], want, atol=1e-6)

    # interrupted after the first chunk of images: the rerun computes only the rest and gives the same file
    calls = []
    real = model.encode_image

    def failing(images):
        calls.append(len(images))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(images)

    monkeypatch.setattr(model, "encode_image", failing)
    second = image_dir / "again.safetensors"
    with pytest.raises(KeyboardInterrupt):
        extract_features(model, second, image_dir / "imgs", image_dir / "texts.txt", chunk_size=2, progress=False)
    assert sorted(p.name for p in (image_dir / "again.safetensors.parts").glob("*.safetensors")) == ["image_000000.safetensors"]
    calls.clear()
    monkeypatch.setattr(model, "encode_image", lambda images: calls.append(len(images)) or real(images))
    extract_features(model, second, image_dir / "imgs", image_dir / "texts.txt", chunk_size=2, progress=False)
    assert sum(calls) == 3  # 6 files, the first chunk's 2 done before, broken.jpg skipped
    again = load_file(str(second))
    assert all(torch.allclose(again[k].float(), full[k].float(), atol=1e-6) for k in full)


def test_extract_features_errors_are_one_line(folder, tmp_path, capsys):
    assert extract_features_main(["--checkpoint", str(folder), "--images", str(tmp_path / "nowhere"),
                                  "--out", str(tmp_path / "f.safetensors")]) == 2
    assert capsys.readouterr().err.startswith("error: images '")


def test_onnx_export_matches_pytorch(folder, tmp_path, capsys):
    pytest.importorskip("onnxruntime")
    assert export_onnx_main(["--checkpoint", str(folder), "--out", str(tmp_path / "onnx")]) == 0
    report = json.loads((tmp_path / "onnx" / "onnx_export.json").read_text())
    assert max(report["max_abs_diff"].values()) <= 1e-4
    import onnxruntime
    session = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "text_encoder.onnx"))
    model = load_dual_encoder(folder)
    tokens, pad = model.processor.texts(["a red circle", "a blue square and a green star on the left", "two"])
    got = session.run(None, {"text": tokens.numpy(), "padding_mask": pad.numpy()})[0]
    with torch.no_grad():
        want = model.encode_text(tokens, pad).numpy()
    assert abs(got - want).max() <= 1e-4 and got.shape == (3, 64)
    image = onnxruntime.InferenceSession(str(tmp_path / "onnx" / "image_encoder.onnx"))
    batch = torch.randn(7, 3, 32, 32)
    with torch.no_grad():
        assert abs(image.run(None, {"image": batch.numpy()})[0] - model.encode_image(batch).numpy()).max() <= 1e-4


def test_paths_with_a_tilde_are_expanded(folder, monkeypatch, tmp_path):
    home = Path(folder).parent
    monkeypatch.setenv("HOME", str(home))
    model, _, _ = beit3.create_model_and_transforms("~/retrieval")
    assert model.processor.tokenizer is not None
    from beit3.cli.finetune import FinetuneConfig
    from beit3.config import load_config
    assert load_config(FinetuneConfig, None, ["data.root=~/data"]).data.root == str(home / "data")
