"""CapFilt (tools/capfilt.py, beit3.capfilt): nucleus sampling, the keep rule, resuming over units, bad samples
counted, the shard layout, planted-noise accounting and the same result on 2 ranks as on 1."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beit3.capfilt import CapFiltConfig, CapFilter, merge_units, plant_noise, run_units, work_units
from beit3.cli.capfilt import main as capfilt_main
from beit3.data.readers import TarShardIndex
from beit3.generation import greedy_search, nucleus_sampling, sample_top_p
from beit3.jsonl import read_jsonl, write_jsonl
from beit3.models import model_config, save_pretrained
from beit3.models.tasks.captioning import BEiT3ForCaptioning
from beit3.models.tasks.retrieval import BEiT3ForRetrieval
from beit3.text import TextTokenizer
from helpers import free_port, tool_env

ROOT = Path(__file__).resolve().parents[1]


def test_top_p_keeps_the_smallest_nucleus_and_samples_it_in_proportion():
    logprobs = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().expand(6000, -1)
    words = sample_top_p(logprobs, 0.6, generator=torch.Generator().manual_seed(0))
    counts = torch.bincount(words, minlength=4).float() / len(words)
    assert counts[2] == 0 and counts[3] == 0  # 0.5 + 0.3 already reach 0.6
    assert abs(counts[0].item() - 0.5 / 0.8) < 0.02
    assert sample_top_p(logprobs[:3], 1e-6).tolist() == [0, 0, 0]  # a tiny nucleus is the argmax
    with pytest.raises(ValueError, match="top_p"):
        sample_top_p(logprobs, 0.0)


@pytest.fixture(scope="module")
def models(demo_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("capfilt_models")
    spm = demo_root / "beit3.spm"
    vocab = TextTokenizer.from_file(spm).vocab_size
    cfg = model_config("beit3_tiny_patch8_32", vocab_size=vocab, depth=2)
    torch.manual_seed(0)
    captioner, matcher = BEiT3ForCaptioning(cfg), BEiT3ForRetrieval(cfg, itm=True)
    save_pretrained(captioner, base / "captioner", text_tokenizer=spm)
    save_pretrained(matcher, base / "matcher", text_tokenizer=spm)
    return {"captioner": captioner.eval(), "matcher": matcher.eval(), "dirs": base,
            "tokenizer": TextTokenizer.from_file(spm)}


def test_nucleus_sampling_with_a_tiny_nucleus_is_greedy_decoding(models, demo_root):
    from beit3.data.transforms import build_finetune_transform
    from beit3.data.readers import load_image

    items = read_jsonl(demo_root / "coco_retrieval.train.jsonl")[:3]
    transform = build_finetune_transform(32, train=False)
    images = torch.stack([transform(load_image(demo_root / i["image_path"])) for i in items])
    tok = models["tokenizer"]
    sampled = nucleus_sampling(models["captioner"], images, tok, top_p=1e-6, max_len=8)
    greedy = greedy_search(models["captioner"], images, tok, max_len=8)
    assert [c.token_ids for c in sampled] == [c.token_ids for c in greedy]
    again = nucleus_sampling(models["captioner"], images, tok, max_len=8, generator=torch.Generator().manual_seed(1))
    assert all(len(c.token_ids) <= 6 for c in again)


def _filter(models, **cfg):
    return CapFilter(models["captioner"], models["matcher"], models["tokenizer"], CapFiltConfig(**cfg))


def test_keep_rule_resume_over_units_and_bad_samples(models, demo_root, tmp_path):
    items = read_jsonl(demo_root / "coco_retrieval.train.jsonl")[:12]
    items[3] = {**items[3], "image_path": "images/does_not_exist.jpg"}
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    items[5] = {**items[5], "image_path": os.path.relpath(tmp_path / "broken.jpg", demo_root)}
    units = work_units("x.jsonl", demo_root, 5, items)
    assert [len(u.items) for u in units] == [5, 5, 2]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    capfilter = _filter(models, threshold=0.0, batch_size=4, chunk_size=5)
    assert run_units(units, capfilter, demo_root, whole) == 3
    report = merge_units(units, "x.jsonl", whole, capfilter.cfg)
    assert report["skipped"] == {"missing_file": 1, "corrupt_image": 1} and report["samples"] == 10
    assert report["kept_original"] == 10 and report["kept_synthetic"] == 10  # threshold 0 keeps every caption
    assert sum(report["original_histogram"]) == 10
    new = read_jsonl(whole / "x.capfilt.jsonl")
    assert len(new) == 20 and all((whole / item["image_path"]).is_file() for item in new)
    # a run stopped after some units resumes with the others only and ends with the same new source
    assert run_units(units, capfilter, demo_root, parts, rank=0, world_size=2) == 2
    with pytest.raises(RuntimeError, match="not done"):
        merge_units(units, "x.jsonl", parts, capfilter.cfg)
    assert run_units(units, capfilter, demo_root, parts) == 1
    merge_units(units, "x.jsonl", parts, capfilter.cfg)
    assert read_jsonl(parts / "x.capfilt.jsonl") == new
    # a threshold between two of the scores keeps exactly the captions above it
    scores = sorted({item["capfilt"]["score"] for item in new})
    assert len(scores) > 2
    middle = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    capfilter.cfg.threshold = middle
    run_units(units, capfilter, demo_root, tmp_path / "middle")
    merge_units(units, "x.jsonl", tmp_path / "middle", capfilter.cfg)
    above = [(i["image_path"], i["text_segment"]) for i in new if i["capfilt"]["score"] > middle]
    assert [(i["image_path"], i["text_segment"]) for i in read_jsonl(tmp_path / "middle" / "x.capfilt.jsonl")] == above
    # nothing reaches a match probability of 1: the strictest threshold keeps nothing
    capfilter.cfg.threshold = 1.0
    run_units(units, capfilter, demo_root, tmp_path / "strict")
    assert merge_units(units, "x.jsonl", tmp_path / "strict", capfilter.cfg)["pairs_written"] == 0


def test_planted_noise_and_the_command_line(models, demo_root, tmp_path):
    items = read_jsonl(demo_root / "coco_retrieval.train.jsonl")[:20]
    noisy = plant_noise(items, 0.25, seed=0)
    assert sum(i["noisy"] for i in noisy) == 5
    assert all(i["text_segment"] != o["text_segment"] for i, o in zip(noisy, items) if i["noisy"])
    write_jsonl(tmp_path / "pairs.jsonl", items)
    dirs = models["dirs"]
    out = tmp_path / "out"
    args = ["--source", "pairs.jsonl", "--root", str(tmp_path), "--captioner", str(dirs / "captioner"),
            "--matcher", str(dirs / "matcher"), "--out", str(out), "--plant-noise", "0.25", "--threshold", "0",
            "--batch-size", "8", "--chunk-size", "8"]
    (tmp_path / "images").symlink_to(demo_root / "images")
    assert capfilt_main(args) == 0
    report = json.loads((out / "capfilt_report.json").read_text())
    planted = report["planted_noise"]
    assert planted["noisy"] == 5 and planted["clean"] == 15 and planted["wrong_fraction_before"] == 0.25
    assert planted["wrong_fraction_after"] == 0.25 and planted["wrong_removed"] == 0.0  # threshold 0 keeps all
    assert (out / "capfilt_scores.png").is_file() and (out / "capfilt_examples.png").is_file()
    assert sum(planted["noisy_histogram"]) == 5 and sum(planted["clean_histogram"]) == 15
    assert capfilt_main(args[:-4] + ["--batch-size", "0"]) == 2
    assert capfilt_main([*args[:6], "--matcher", str(dirs / "captioner"), *args[8:]]) == 2  # no ITM head
    itc = tmp_path / "itc"
    assert capfilt_main([*args[:8], "--out", str(itc), *args[10:], "--scorer", "itc"]) == 0
    scores = [i["capfilt"]["score"] for i in read_jsonl(itc / "pairs.capfilt.jsonl")]
    assert len(scores) == 40 and all(0.0 <= v <= 1.0 for v in scores)  # (1 + cosine) / 2


def test_shards_in_the_img2dataset_layout_and_two_ranks_equal_one(models, demo_root, tmp_path):
    dirs = models["dirs"]
    common = ["--source", "shards", "--root", str(demo_root), "--captioner", str(dirs / "captioner"), "--matcher",
              str(dirs / "matcher"), "--threshold", "0", "--batch-size", "16"]
    one = tmp_path / "one"
    assert capfilt_main([*common, "--out", str(one)]) == 0
    two = tmp_path / "two"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(ROOT / "tools/capfilt.py"), *common, "--out", str(two)]
    proc = subprocess.run(cmd, env=tool_env(OMP_NUM_THREADS="1"), cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report_one = json.loads((one / "capfilt_report.json").read_text())
    report_two = json.loads((two / "capfilt_report.json").read_text())
    assert report_one["units"] == 2 and report_one["samples"] > 0
    for key in ("samples", "kept_original", "kept_synthetic", "original_histogram", "synthetic_histogram"):
        assert report_one[key] == report_two[key], key
    written = 0
    for shard in sorted((one / "shards").glob("*.tar")):
        index = TarShardIndex([shard], required=("jpg", "txt", "json"))
        written += len(index)
        again = TarShardIndex([two / "shards" / shard.name], required=("jpg", "txt", "json"))
        assert len(index) == len(again)
        for i in range(len(index)):
            sample = index[i]
            assert sample == again[i]
            assert json.loads(sample["json"])["capfilt"]["caption"] in ("original", "synthetic0") and sample["txt"]
    assert written == 2 * report_one["samples"]  # threshold 0: each image's original and synthetic caption
