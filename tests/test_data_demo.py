"""Demo data generator: official file names and fields, determinism by seed, learnability of its classes."""
import hashlib
import json

import numpy as np
import torch
import webdataset as wds
from PIL import Image

from beit3.demo.data import make_demo_data
from beit3.jsonl import read_jsonl
from beit3.text import TextTokenizer

INDEX_FILES = [f"coco_retrieval.{s}.jsonl" for s in ("train", "val", "test")] + \
    [f"coco_captioning.{s}.jsonl" for s in ("train", "val", "test")] + \
    [f"vqa.{s}.jsonl" for s in ("train", "val", "test")] + \
    [f"nlvr2.{s}.index.jsonl" for s in ("train", "dev", "test-P")] + \
    ["imagenet.train.index.jsonl", "imagenet.val.index.jsonl"]


def _digest(root):
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_layout_and_fields(demo_root):
    manifest = json.loads((demo_root / "manifest.json").read_text())
    assert (demo_root / "README.md").is_file()
    tok = TextTokenizer.from_file(demo_root / "beit3.spm")
    for name in INDEX_FILES:
        items = read_jsonl(demo_root / name)
        assert items and manifest["index_lines"][name] == len(items)
        for item in items:
            assert (demo_root / item["image_path"]).is_file()
    retrieval = read_jsonl(demo_root / "coco_retrieval.train.jsonl")
    assert sorted({i["image_id"] for i in retrieval}) == list(range(len({i["image_path"] for i in retrieval})))
    assert all(tok.decode(i["text_segment"]) for i in retrieval)
    assert all(i["text_segment"] is None for i in read_jsonl(demo_root / "coco_captioning.val.jsonl"))
    answers = read_jsonl(demo_root / "answer2label.txt")
    assert [a["label"] for a in answers] == list(range(len(answers)))
    vqa = read_jsonl(demo_root / "vqa.train.jsonl")
    assert all(set(i["scores"]) <= {0.3, 0.6, 0.9, 1.0} and len(i["labels"]) == len(i["scores"]) for i in vqa)
    assert any(len(i["labels"]) > 1 for i in vqa), "simulated annotators never disagree"
    nlvr = read_jsonl(demo_root / "nlvr2.train.index.jsonl")
    assert {i["label"] for i in nlvr} == {0, 1} and all((demo_root / i["image2_path"]).is_file() for i in nlvr)
    labels = {i["label"] for i in read_jsonl(demo_root / "imagenet.train.index.jsonl")}
    assert labels == set(range(len(manifest["classes"])))
    assert len((demo_root / "corpus.txt").read_text().splitlines()) > 100


def test_shards_follow_img2dataset_layout(demo_root):
    shards = sorted((demo_root / "shards").glob("*.tar"))
    assert [s.name for s in shards] == ["00000.tar", "00001.tar"]
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert len(samples) == 32  # the 80% train images
    for sample in samples:
        assert {"jpg", "txt", "json"} <= set(sample)
        assert json.loads(sample["json"])["caption"] == sample["txt"].decode()
        assert sample["__key__"].isdigit() and len(sample["__key__"]) == 9


def test_deterministic_by_seed(tmp_path):
    a, b, c = (make_demo_data(tmp_path / n, num_images=20, image_size=24, seed=s, num_shards=1) and tmp_path / n
               for n, s in (("a", 5), ("b", 5), ("c", 6)))
    assert _digest(a) == _digest(b)
    assert _digest(a) != _digest(c)


def _load_classification(root, split):
    items = read_jsonl(root / f"imagenet.{split}.index.jsonl")
    x = np.stack([np.asarray(Image.open(root / i["image_path"]).convert("RGB"), np.float32) / 255 for i in items])
    return torch.from_numpy(x).permute(0, 3, 1, 2), torch.tensor([i["label"] for i in items])


def _orientation_histograms(x, cells=4, bins=9):
    """HOG-like features: gradient-orientation histograms (weighted by magnitude) over a cells x cells grid."""
    gx = (x[..., :, 2:] - x[..., :, :-2])[..., 1:-1, :]
    gy = (x[..., 2:, :] - x[..., :-2, :])[..., :, 1:-1]
    magnitude = (gx ** 2 + gy ** 2).sum(1).sqrt()
    angle = torch.atan2(gy.sum(1), gx.sum(1)) % np.pi
    bin_of = (angle / np.pi * bins).long().clamp(max=bins - 1)
    votes = torch.nn.functional.one_hot(bin_of, bins).float() * magnitude[..., None]
    features = torch.nn.functional.adaptive_avg_pool2d(votes.permute(0, 3, 1, 2), cells).flatten(1)
    return features / (features.norm(dim=1, keepdim=True) + 1e-6)


def test_classification_classes_are_learnable(tmp_path):
    """Logistic regression on orientation histograms of held-out 32 px images beats chance by far."""
    root = tmp_path / "learn"
    manifest = make_demo_data(root, num_images=400, image_size=32, seed=1, num_shards=1)
    x_train, y_train = _load_classification(root, "train")
    x_val, y_val = _load_classification(root, "val")
    f_train, f_val = _orientation_histograms(x_train), _orientation_histograms(x_val)
    mean, std = f_train.mean(0), f_train.std(0) + 1e-6
    f_train, f_val = (f_train - mean) / std, (f_val - mean) / std
    torch.manual_seed(0)
    classifier = torch.nn.Linear(f_train.shape[1], len(manifest["classes"]))
    opt = torch.optim.Adam(classifier.parameters(), lr=0.01, weight_decay=1e-3)
    for _ in range(300):
        loss = torch.nn.functional.cross_entropy(classifier(f_train), y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        accuracy = (classifier(f_val).argmax(1) == y_val).float().mean().item()
    chance = 1 / len(manifest["classes"])
    assert accuracy > chance + 0.5, f"held-out accuracy {accuracy:.2f} vs chance {chance:.2f}"


def test_measure_loading_writes_json(demo_root, tmp_path):
    from beit3.bench.data_loading import measure_loading

    result = measure_loading(demo_root, num_images=8, image_size=16, tokenizer_image_size=8, out_json=tmp_path / "b.json")
    assert result["images_per_s_per_worker"] > 0 and result["num_images"] == 8
    assert json.loads((tmp_path / "b.json").read_text()) == result


def test_text_tokenizer_keeps_words_whole(demo_root):
    # trained on the templated corpus alone, SentencePiece spelled colour words out (b-l-u-e); words.txt prevents it
    tok = TextTokenizer.from_file(demo_root / "beit3.spm")
    words = (demo_root / "words.txt").read_text().split()
    assert {"blue", "purple", "star", "what", ","} <= set(words)
    for word in ("blue", "purple", "yellow", "triangle", "what", "left"):
        assert len(tok.encode(word)) == 1, (word, tok.encode(word))
    assert tok.vocab_size < 200


def test_data_pipeline_benchmark_covers_every_source_and_the_torchvision_baseline(tmp_path):
    from beit3.bench.data_loading import benchmark_data_pipeline
    result = benchmark_data_pipeline(tmp_path / "photos", workers=(0,), num_images=12, batch_size=4, batches=1,
                                     image_size=32, repeats=2, out_json=tmp_path / "d.json")
    import json
    from PIL import Image
    assert json.loads((tmp_path / "d.json").read_text())["results"] == result["results"]
    sources = [(r["loader"], r["source"], r.get("views_in_process")) for r in result["results"]]
    assert sources == [("beit3 two-view", "images", False), ("beit3 two-view", "images.jsonl", False),
                       ("beit3 two-view", "shards/{00000..00001}.tar", False), ("beit3 two-view", "images.jsonl", True),
                       ("torchvision ImageFolder one view", "images/", None)]
    assert all(r["images_per_s"] > 0 and len(r["runs_images_per_s_per_worker"]) == 2 for r in result["results"])
    sizes = {Image.open(p).size for p in (tmp_path / "photos" / "images").rglob("*.jpg")}
    assert sizes == {(500, 375), (640, 480), (375, 500)}
