"""Fine-tuning: every task end to end on generated demo data (tiny model, a few steps + evaluation), metrics.json,
best/, exact resume, config errors (exit 2 naming the key) and the evaluate tool's submission / results files."""
import json
import shutil
from pathlib import Path

import pytest
import torch

from beit3.models import create_model
from beit3.cli.finetune import evaluate_main, main

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"imagenet": "demo_imagenet", "vqav2": "demo_vqav2", "nlvr2": "demo_nlvr2",
           "coco_retrieval": "demo_retrieval", "coco_captioning": "demo_captioning"}
# the registry's tiny backbone at 32 px (the demo configs use the 64 px pretraining-demo backbone)
TINY = ["model.overrides.img_size=32", "model.overrides.embed_dim=64", "model.overrides.depth=2",
        "model.overrides.num_heads=4", "model.overrides.ffn_dim=256"]
METRIC = {"imagenet": "acc1", "vqav2": "vqa_score", "nlvr2": "accuracy", "coco_retrieval": "average_score",
          "coco_captioning": "CIDEr"}


def finetune(task, root, out, *extra, steps=3):
    args = ["--task", task, "--config", str(REPO / "configs/finetune" / f"{CONFIGS[task]}.yaml"), "--set",
            f"data.root={root}", f"output_dir={out}", "data.image_size=32", "data.batch_size=8", "data.num_workers=0",
            "eval.batch_size=16", f"train.steps={steps}", f"eval.every_steps={steps}", "train.log_every=1",
            "train.tensorboard=false", "optim.warmup_steps=1", *TINY, *extra]
    return main(args)


@pytest.fixture(scope="module")
def runs(demo_root, tmp_path_factory):
    base = tmp_path_factory.mktemp("finetune_runs")
    for task in CONFIGS:
        assert finetune(task, demo_root, base / task) == 0, task
    return base


@pytest.mark.parametrize("task", sorted(CONFIGS))
def test_each_task_trains_evaluates_and_keeps_the_best(task, runs):
    out = runs / task
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == task and metrics["steps"] == 3 and metrics["metric"] == METRIC[task]
    value = metrics["final"]["metrics"][METRIC[task]]
    assert 0.0 <= value <= (10.0 if task == "coco_captioning" else 100.0)
    assert metrics["best"]["metrics"][METRIC[task]] == value  # one evaluation: it is the best
    assert (out / "best" / "config.json").is_file() and (out / "best" / "model.safetensors").is_file()
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3] and all(r["loss"] == r["loss"] for r in log)  # finite


def test_retrieval_evaluation_deduplicates_images(runs, demo_root):
    final = json.loads((runs / "coco_retrieval" / "metrics.json").read_text())["final"]["metrics"]
    val = [json.loads(line) for line in (demo_root / "coco_retrieval.val.jsonl").read_text().splitlines()]
    assert final["num_texts"] == len(val) and final["num_images"] == len({v["image_id"] for v in val}) < len(val)


def test_evaluate_tool_writes_vqa_submission(runs, demo_root, tmp_path):
    out = tmp_path / "vqa" / "metrics.json"
    assert evaluate_main(["--task", "vqav2", "--checkpoint", str(runs / "vqav2"), "--split", "test",
                          "--out", str(out), "--set", f"data.root={demo_root}"]) == 0
    report = json.loads(out.read_text())
    submission = json.loads((out.parent / "vqa_submission_test.json").read_text())
    questions = [json.loads(line) for line in (demo_root / "vqa.test.jsonl").read_text().splitlines()]
    answers = {json.loads(line)["answer"] for line in (demo_root / "answer2label.txt").read_text().splitlines()}
    assert sorted(s["question_id"] for s in submission) == sorted(q["qid"] for q in questions)
    assert all(set(s) == {"question_id", "answer"} and s["answer"] in answers for s in submission)
    assert report["split"] == "test" and "vqa_score" in report["metrics"]


def test_evaluate_tool_writes_caption_results(runs, demo_root, tmp_path):
    out = tmp_path / "cap" / "metrics.json"
    assert evaluate_main(["--task", "coco_captioning", "--checkpoint", str(runs / "coco_captioning" / "best"),
                          "--config", str(runs / "coco_captioning" / "config.yaml"), "--split", "test",
                          "--out", str(out), "--set", f"data.root={demo_root}", "eval.max_len=8"]) == 0
    results = json.loads((out.parent / "caption_results_test.json").read_text())
    gt = json.loads((demo_root / "coco_karpathy_test_gt.json").read_text())
    assert sorted(r["image_id"] for r in results) == sorted(i["id"] for i in gt["images"])
    assert all(set(r) == {"image_id", "caption"} and isinstance(r["caption"], str) for r in results)
    metrics = json.loads(out.read_text())["metrics"]
    assert {"Bleu_4", "CIDEr"} <= set(metrics)


def test_zero_shot_retrieval_from_a_checkpoint_file(demo_root, tmp_path):
    torch.manual_seed(0)
    model = create_model("beit3_tiny_patch8_32_retrieval")
    torch.save({"model": model.state_dict()}, tmp_path / "itc.pth")
    out = tmp_path / "zs.json"
    assert evaluate_main(["--task", "coco_retrieval", "--config", str(REPO / "configs/finetune/demo_retrieval.yaml"),
                          "--checkpoint", str(tmp_path / "itc.pth"), "--out", str(out), "--set",
                          f"data.root={demo_root}", "data.num_workers=0", "data.image_size=32", *TINY]) == 0
    metrics = json.loads(out.read_text())["metrics"]
    assert {"tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "average_score"} <= set(metrics)


def test_resume_reproduces_the_uninterrupted_run(demo_root, tmp_path):
    full = tmp_path / "full"
    assert finetune("coco_retrieval", demo_root, full, "train.save_every=2", "train.keep_last=2", steps=4) == 0
    resumed = tmp_path / "resumed"
    shutil.copytree(full, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step00000004")
    (resumed / "checkpoints" / "latest").write_text("step00000002")
    (resumed / "best_metrics.json").unlink()
    shutil.rmtree(resumed / "best")
    assert finetune("coco_retrieval", demo_root, resumed, "train.save_every=2", "train.keep_last=2", steps=4) == 0
    logs = [[json.loads(line) for line in (d / "log.jsonl").read_text().splitlines()] for d in (full, resumed)]
    assert [r["loss"] for r in logs[0]] == [r["loss"] for r in logs[1]] and len(logs[0]) == 4
    stamps = [[r["timestamp"] for r in log] for log in logs]
    assert stamps[0][:2] == stamps[1][:2] and stamps[0][2] != stamps[1][2]  # steps 1-2 kept: it resumed at step 2
    a, b = (json.loads((d / "metrics.json").read_text())["final"]["metrics"] for d in (full, resumed))
    assert a == b


@pytest.mark.parametrize("override, named", [
    ("data.batch_sise=4", "data.batch_sise"),
    ("train.steps=many", "train.steps"),
    ("data.root=/nonexistent/dir", "data.root"),
    ("data.val_index=missing.jsonl", "data.val_index"),
    ("eval.split=train", "eval.split"),
    ("model.init_from=/nonexistent.pth", "model.init_from"),
])
def test_bad_config_exits_2_naming_the_key(override, named, demo_root, tmp_path, capsys):
    assert finetune("nlvr2", demo_root, tmp_path / "bad", override) == 2
    assert named in capsys.readouterr().err


def test_task_mismatch_between_flag_and_config_is_an_error(demo_root, tmp_path, capsys):
    args = ["--task", "vqav2", "--config", str(REPO / "configs/finetune/demo_nlvr2.yaml"), "--set",
            f"data.root={demo_root}", f"output_dir={tmp_path}"]
    assert main(args) == 2 and "nlvr2" in capsys.readouterr().err


def test_evaluate_refuses_a_checkpoint_without_the_task_head(demo_root, tmp_path, capsys):
    """A pretraining export (no VQA head) evaluated as VQA would score random weights: exit 2 saying to fine-tune."""
    tok_vocab = json.loads((demo_root / "manifest.json").read_text())["text_vocab_size"]
    backbone = create_model("beit3_tiny_patch8_32", vocab_size=max(1000, tok_vocab + 1))
    torch.save({"model": {f"beit3.{k}": v for k, v in backbone.state_dict().items()}}, tmp_path / "pretrained.pth")
    assert evaluate_main(["--task", "vqav2", "--config", str(REPO / "configs/finetune/demo_vqav2.yaml"),
                          "--checkpoint", str(tmp_path / "pretrained.pth"), "--out", str(tmp_path / "m.json"),
                          "--set", f"data.root={demo_root}", "data.num_workers=0", "data.image_size=32", *TINY]) == 2
    err = capsys.readouterr().err
    assert "has no trained vqav2 head (missing: head." in err and "Fine-tune it first" in err
    assert not (tmp_path / "m.json").exists()


def test_evaluate_refuses_retrieval_without_trained_contrastive_heads(demo_root, tmp_path, capsys):
    backbone = create_model("beit3_tiny_patch8_32")
    torch.save({"model": {f"beit3.{k}": v for k, v in backbone.state_dict().items()}}, tmp_path / "backbone.pth")
    assert evaluate_main(["--task", "coco_retrieval", "--config", str(REPO / "configs/finetune/demo_retrieval.yaml"),
                          "--checkpoint", str(tmp_path / "backbone.pth"), "--out", str(tmp_path / "zs.json"), "--set",
                          f"data.root={demo_root}", "data.num_workers=0", "data.image_size=32", *TINY]) == 2
    assert "has no trained retrieval heads" in capsys.readouterr().err
