"""Converters: tiny files in each public raw layout -> BEiT-3 data root read back by the same readers."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from beit3.data.convert import convert_dataset
from beit3.data.indexes import build_answer_vocab, normalize_answer, vqa_soft_score
from beit3.data.pretrain import PretrainDataConfig, build_pretrain_batches
from beit3.jsonl import read_jsonl
from beit3.text import TextTokenizer, train_text_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = "a man riding horse dog on the beach two people red car what color is it yes no".split()


@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    (root / "c.txt").write_text("\n".join(" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))) * 20)
    return train_text_tokenizer([root / "c.txt"], root / "tok", vocab_size=60)


def _image(path, size=12):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), (90, 30, 200)).save(path)


def test_coco_karpathy(tmp_path, spm_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    images = []
    for k, (split, folder) in enumerate([("train", "train2014"), ("restval", "val2014"), ("val", "val2014"),
                                          ("test", "val2014")]):
        name = f"COCO_{folder}_{k:012d}.jpg"
        _image(src / folder / name)
        images.append({"filepath": folder, "filename": name, "cocoid": 100 + k, "split": split,
                       "sentences": [{"raw": "a man riding a horse "}, {"raw": "two people on the beach"}]})
    src.mkdir(exist_ok=True)
    (src / "dataset_coco.json").write_text(json.dumps({"images": images}))
    counts = convert_dataset("coco_karpathy", src, out, spm_path)
    assert counts["coco_retrieval.train.jsonl"] == 4 and counts["coco_retrieval.test.jsonl"] == 2
    train = read_jsonl(out / "coco_retrieval.train.jsonl")
    assert [i["image_id"] for i in train] == [0, 0, 1, 1]
    tok = TextTokenizer.from_file(out / "beit3.spm")
    assert tok.decode(train[0]["text_segment"]) == "a man riding a horse"
    assert all((out / i["image_path"]).is_file() for i in train)
    assert [i["image_id"] for i in read_jsonl(out / "coco_captioning.train.jsonl")] == [100, 100, 101, 101]
    assert read_jsonl(out / "coco_captioning.test.jsonl") == [
        {"image_path": "val2014/COCO_val2014_000000000003.jpg", "text_segment": None, "image_id": 103}]
    gt = json.loads((out / "coco_karpathy_val_gt.json").read_text())
    assert len(gt["annotations"]) == 2 and gt["images"][0]["id"] == 102
    # the captions as plain corpora: the pretraining text stream and its held-out counterpart
    assert (out / "coco_captions.txt").read_text().splitlines() == ["a man riding a horse", "two people on the beach"] * 2
    assert len((out / "coco_captions.val.txt").read_text().splitlines()) == 2
    cfg = PretrainDataConfig(root=str(out), image_batch=0, text_batch=0, pair_batch=2, image_size=8,
                             tokenizer_image_size=8, num_workers=0, max_skip_fraction=0.0)
    batch = next(iter(build_pretrain_batches(cfg, tok)))
    assert batch["pair"]["image"].shape == (2, 3, 8, 8)


def test_flickr30k_karpathy(tmp_path, spm_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    _image(src / "flickr30k-images" / "1.jpg")
    images = [{"filename": "1.jpg", "split": s, "sentences": [{"raw": "a dog on the beach"}]} for s in ("train", "val")]
    (src / "dataset_flickr30k.json").write_text(json.dumps({"images": images}))
    counts = convert_dataset("flickr30k_karpathy", src, out, spm_path)
    assert counts == {"flickr30k.train.jsonl": 1, "flickr30k.val.jsonl": 1, "flickr30k.test.jsonl": 0,
                      "flickr30k_captions.txt": 1, "flickr30k_captions.val.txt": 1}
    item = read_jsonl(out / "flickr30k.val.jsonl")[0]
    assert item["image_path"] == "flickr30k-images/1.jpg" and (out / item["image_path"]).is_file()


def test_vqav2(tmp_path, spm_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    src.mkdir()
    questions = {"train2014": [(1, 11), (1, 12)], "val2014": [(2, 21), (3, 31)], "test2015": [(4, 41)]}
    answers = {11: ["Yes"] * 8 + ["no"] * 2, 12: ["two"] * 3 + ["2"] + ["red"] * 6, 21: ["blue"] * 10,
               31: ["red"] * 2 + ["no"] * 8}
    mc = {11: "no", 12: "red", 21: "blue", 31: "No."}
    for folder, qs in questions.items():
        name = "test2015" if folder == "test2015" else folder
        (src / f"v2_OpenEnded_mscoco_{name}_questions.json").write_text(json.dumps({"questions": [
            {"image_id": img, "question": "what color is it?", "question_id": qid} for img, qid in qs]}))
        if folder != "test2015":
            (src / f"v2_mscoco_{folder}_annotations.json").write_text(json.dumps({"annotations": [
                {"question_id": qid, "image_id": img, "multiple_choice_answer": mc[qid],
                 "answers": [{"answer": a, "answer_id": k} for k, a in enumerate(answers[qid])]} for img, qid in qs]}))
    counts = convert_dataset("vqav2", src, out, spm_path, min_answer_count=2, rest_val_images=1)
    answer2label = {a["answer"]: a["label"] for a in read_jsonl(out / "answer2label.txt")}
    assert answer2label == {"no": 0}  # "no"/"No." twice as multiple_choice_answer; red, blue once
    train = read_jsonl(out / "vqa.train.jsonl")
    assert [(i["qid"], i["labels"], i["scores"]) for i in train] == [(11, [0], [0.6])]  # qid 12: no vocab answer
    val = read_jsonl(out / "vqa.val.jsonl")
    assert [(i["qid"], i["labels"], i["scores"]) for i in val] == [(31, [0], [1.0])]
    assert val[0]["image_path"] == "val2014/COCO_val2014_000000000003.jpg"
    assert counts["vqa.rest_val.jsonl"] + counts["vqa.trainable_val.jsonl"] == 1
    assert read_jsonl(out / "vqa.test.jsonl")[0]["labels"] == [] and "vqa.test-dev.jsonl" not in counts


def test_answer_normalisation_and_scores():
    assert normalize_answer("Two dogs!") == "2 dogs" and normalize_answer("The  Yes.") == "yes"
    assert [vqa_soft_score(c) for c in range(6)] == [0.0, 0.3, 0.6, 0.9, 1.0, 1.0]
    assert build_answer_vocab(["two", "2", "2", "red", "blue", "blue"], 2) == {"2": 0, "blue": 1}


def test_nlvr2(tmp_path, spm_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    src.mkdir()
    for raw in ("train", "dev", "test1"):
        row = {"identifier": f"{raw}-10-1-0", "sentence": "two dogs on the beach", "label": "True" if raw != "dev" else "False",
               "directory": 3}
        (src / f"{raw}.json").write_text(json.dumps(row) + "\n")
    _image(src / "images/train/3/train-10-1-img0.png")
    _image(src / "images/train/3/train-10-1-img1.png")
    counts = convert_dataset("nlvr2", src, out, spm_path)
    assert counts == {"nlvr2.train.index.jsonl": 1, "nlvr2.dev.index.jsonl": 1, "nlvr2.test-P.index.jsonl": 1}
    train = read_jsonl(out / "nlvr2.train.index.jsonl")[0]
    assert train["label"] == 1 and (out / train["image_path"]).is_file() and (out / train["image2_path"]).is_file()
    dev = read_jsonl(out / "nlvr2.dev.index.jsonl")[0]
    assert dev["label"] == 0 and dev["image_path"] == "dev/dev-10-1-img0.png" and dev["identifier"] == "dev-10-1-0"
    (src / "dev.json").write_text('{"identifier": "dev-1-1-0"}\n')
    with pytest.raises(ValueError, match="dev.json' line 1"):
        convert_dataset("nlvr2", src, tmp_path / "out2", spm_path)


def test_imagenet_via_tool(tmp_path):
    src, out = tmp_path / "raw", tmp_path / "out"
    for split, n in (("train", 2), ("val", 1)):
        for wnid in ("n02", "n01"):
            for i in range(n):
                _image(src / split / wnid / f"{wnid}_{i}.JPEG")
    subprocess.run([sys.executable, str(REPO / "tools/convert_dataset.py"), "imagenet", "--src", str(src), "--out",
                    str(out)], check=True, capture_output=True, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    train = read_jsonl(out / "imagenet.train.index.jsonl")
    assert [(i["image_path"], i["label"]) for i in train][:2] == [("train/n01/n01_0.JPEG", 0), ("train/n01/n01_1.JPEG", 0)]
    assert {i["label"] for i in read_jsonl(out / "imagenet.val.index.jsonl")} == {0, 1}
    assert all((out / i["image_path"]).is_file() for i in train)
    cfg = PretrainDataConfig(root=str(out), image_batch=2, text_batch=0, pair_batch=0, image_size=8,
                             tokenizer_image_size=8, num_workers=0)
    assert next(iter(build_pretrain_batches(cfg, None)))["image"]["image"].shape == (2, 3, 8, 8)


def test_photo_release_is_a_coco_karpathy_release(tmp_path):
    """Real photographs (scikit-image / scikit-learn) in the raw Karpathy layout, read by the converter."""
    pytest.importorskip("skimage")
    from beit3.demo.photos import make_photo_release

    raw, out = tmp_path / "raw", tmp_path / "out"
    summary = make_photo_release(raw, num_images=20, image_size=32, seed=1)
    assert summary["splits"] == {"train": 16, "val": 2, "test": 2} and len(summary["nouns"]) == 10
    spm = train_text_tokenizer([raw / "captions.txt", raw / "words.txt"], tmp_path / "spm", vocab_size=60,
                               hard_vocab_limit=False)
    counts = convert_dataset("coco_karpathy", raw, out, spm)
    assert counts["coco_retrieval.train.jsonl"] == 80 and counts["coco_retrieval.val.jsonl"] == 10
    item = read_jsonl(out / "coco_retrieval.val.jsonl")[0]
    tok = TextTokenizer.from_file(out / "beit3.spm")
    caption = tok.decode(item["text_segment"])
    assert any(noun in caption for noun in summary["nouns"])
    with Image.open(out / item["image_path"]) as image:
        assert image.size == (32, 32)
    again = tmp_path / "again"
    make_photo_release(again, num_images=20, image_size=32, seed=1)
    assert (again / "dataset_coco.json").read_text() == (raw / "dataset_coco.json").read_text()
