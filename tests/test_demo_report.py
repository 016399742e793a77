"""The demo report (beit3.demo.summarize, tools/demo_report.py) and the log plots (beit3.demo.plots, tools/plot_logs.py) on
a fabricated demo run folder: seconds, no training."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import beit3
from beit3.jsonl import read_jsonl
from beit3.demo.report import ROWS, caption_constant_cider, random_ranking_recall, summarize, vqa_question_prior_score
from beit3.demo.plots import image_grid, loss_keys, plot_logs, read_log

REPO = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG"


def _write_log(path: Path, keys: list[str], steps: int = 5) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": s, **{k: 5.0 / s + i for i, k in enumerate(keys)}, "lr": 1e-3}) for s in range(1, steps + 1)]
    path.write_text("\n".join(lines[:2] + ["", "not json"] + lines[2:]) + "\n")
    return path


def _metrics(run: Path, task: str, values: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    final = {"step": 10, "split": "val", "metrics": values}
    (run / "metrics.json").write_text(json.dumps({"task": task, "final": final, "best": final}))


@pytest.fixture()
def demo_run(tmp_path, demo_root):
    run = tmp_path / "run"
    run.mkdir()
    (run / "data").symlink_to(demo_root)
    log = _write_log(run / "pretrain" / "log.jsonl", ["loss", "loss_image", "loss_text", "loss_pair_image", "loss_pair_text"])
    with log.open("a") as f:  # two held-out evaluation rows
        for step, gap in ((2, 0.05), (5, 0.25)):
            f.write(json.dumps({"step": step, "eval_acc_pair_text": 0.6, "eval_acc_pair_text_other": 0.6 - gap / 5,
                                "eval_grounding_gap_text": gap / 5, "eval_probe_colour_acc": 0.2 + gap,
                                "eval_probe_colour_acc_other": 0.2, "eval_probe_colour_gap": gap}) + "\n")
    for init, bump in (("scratch", 0.0), ("pretrained", 10.0)):
        for seed, jitter in ((0, 0.0), (1, 2.0)):
            _metrics(run / "ft" / f"retrieval_{init}_seed{seed}", "coco_retrieval",
                     {"ir_r1": 5.0 + bump + jitter, "tr_r1": 6.0 + bump, "average_score": 9.0 + bump + 8 * jitter})
            _metrics(run / "ft" / f"vqav2_{init}_seed{seed}", "vqav2", {"vqa_score": 40.0 + bump + jitter})
            _metrics(run / "ft" / f"captioning_{init}_seed{seed}", "coco_captioning", {"CIDEr": 0.1 + bump / 10})
            for task in ("retrieval", "vqav2", "captioning"):
                _write_log(run / "ft" / f"{task}_{init}_seed{seed}" / "log.jsonl", ["loss"])
    # a (random) retrieval model as the best checkpoint, and generated captions
    torch.manual_seed(0)
    model = beit3.create_model("beit3_tiny_patch8_32_retrieval", vocab_size=1000)
    beit3.save_pretrained(model, run / "ft" / "retrieval_pretrained_seed0" / "best")
    val = read_jsonl(demo_root / "coco_captioning.val.jsonl")
    best = run / "ft" / "captioning_pretrained_seed0" / "best"
    best.mkdir(parents=True)
    (best / "caption_results_val.json").write_text(json.dumps([{"image_id": i["image_id"], "caption": "a red circle"}
                                                               for i in val]))
    return run


def test_summarize_table_baselines_and_plots(demo_run, demo_root):
    result = summarize(demo_run, timings={"pretraining": 12.0})
    rows = {r["key"]: r for r in result["rows"]}
    assert set(rows) == {key for _, _, key, _ in ROWS}
    assert rows["ir_r1"]["scratch"] == 6.0 and rows["ir_r1"]["pretrained"] == 16.0  # means over two seeds
    assert rows["ir_r1"]["scratch_values"] == [5.0, 7.0] and rows["ir_r1"]["scratch_std"] == pytest.approx(2 ** 0.5)
    assert rows["ir_r1"]["margin"] == pytest.approx(10.0) and rows["ir_r1"]["beyond_noise"]
    assert not rows["average_score"]["beyond_noise"]  # margin 10 < std 11.3 of the seeds
    assert rows["CIDEr"]["pretrained_seeds"] == 2 and rows["CIDEr"]["scratch_std"] == 0.0
    num_val_images = len({i["image_id"] for i in read_jsonl(demo_root / "coco_retrieval.val.jsonl")})
    assert rows["ir_r1"]["baseline"] == pytest.approx(100.0 / num_val_images)
    assert rows["average_score"]["pretrained"] == 27.0
    assert rows["ir_r1"]["baseline"] < rows["average_score"]["baseline"] < 100.0 / num_val_images * 10
    assert 0.0 < rows["vqa_score"]["baseline"] < 100.0
    assert rows["vqa_score"]["baseline"] == pytest.approx(vqa_question_prior_score(demo_root))
    assert rows["CIDEr"]["baseline"] == pytest.approx(caption_constant_cider(demo_root)) and rows["CIDEr"]["baseline"] >= 0
    assert result["plot_errors"] == {}
    for name in ("pretrain_loss", "pretrain_grounding", "finetune_loss", "retrieval_examples", "caption_examples"):
        assert Path(result["files"][name]).read_bytes()[:4] == PNG, name
    md = (demo_run / "results.md").read_text()
    assert "| retrieval | retrieval R@1 text→image (%) | 6.0 ± 1.4 | 16.0 ± 1.4 |" in md and "pretraining 12" in md
    assert "| yes |" in md and "over 2 fine-tuning seeds" in md
    assert "| 5 | 60.0 | 55.0 | +5.0 | 45.0 | 20.0 | +25.0 |" in md  # the pretraining evaluation rows
    assert [r["step"] for r in result["pretrain_eval"]] == [2, 5] and result["pretrain_last"]["step"] == 5
    saved = json.loads((demo_run / "results.json").read_text())
    assert saved["rows"] == result["rows"] and saved["timings"] == {"pretraining": 12.0}


def test_summarize_missing_runs_and_no_plots(tmp_path, demo_root):
    result = summarize(tmp_path, data_root=demo_root, plots=False)
    assert all(r["scratch"] is None and r["pretrained"] is None for r in result["rows"])
    assert "—" in (tmp_path / "results.md").read_text() and result["files"] == {}


def test_plot_logs_and_grid(tmp_path):
    log = _write_log(tmp_path / "a" / "log.jsonl", ["loss", "loss_text", "loss_image"])
    records = read_log(log)
    assert len(records) == 5 and loss_keys(records) == ["loss", "loss_image", "loss_text"]
    assert plot_logs([log, log], tmp_path / "p.png", labels=["x", "y"], log_y=True).read_bytes()[:4] == PNG
    assert plot_logs([log], tmp_path / "q.png", keys=["missing"]).is_file()  # an empty panel, no error
    with pytest.raises(ValueError):
        plot_logs([], tmp_path / "r.png")
    image = torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()
    out = image_grid([{"text": "a long caption " * 6, "images": [image, image], "marks": [True, False]},
                      {"text": "b", "images": [image], "captions": ["c"]}], tmp_path / "g.png", title="t")
    assert out.read_bytes()[:4] == PNG


def test_command_line_tools(demo_run):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    out = demo_run / "cli.png"
    subprocess.run([sys.executable, str(REPO / "tools" / "plot_logs.py"), str(demo_run / "pretrain" / "log.jsonl"),
                    "--out", str(out)], check=True, env=env, capture_output=True)
    assert out.read_bytes()[:4] == PNG
    done = subprocess.run([sys.executable, str(REPO / "tools" / "demo_report.py"), "--run", str(demo_run),
                           "--no-plots"], check=True, env=env, capture_output=True, text=True)
    assert "| vqav2 |" in done.stdout and (demo_run / "results.json").is_file()


def test_vqa_question_prior_hand_computed(tmp_path):
    def write(name, rows):
        (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows))

    # question [5] answered 0 (score 1.0 + 0.3) over 1 (1.0) in training; question [6] only 1; overall top is 1
    write("vqa.train.jsonl", [{"text_segment": [5], "labels": [0, 1], "scores": [1.0, 0.3]},
                              {"text_segment": [5], "labels": [1], "scores": [1.0]},
                              {"text_segment": [5], "labels": [0], "scores": [0.3]},
                              {"text_segment": [6], "labels": [1], "scores": [1.0]},
                              {"text_segment": [6], "labels": [1], "scores": [1.0]},
                              {"text_segment": [7], "labels": [], "scores": []}])
    write("vqa.val.jsonl", [{"text_segment": [5], "labels": [0], "scores": [0.6]},   # prior 0 -> 0.6
                            {"text_segment": [6], "labels": [0], "scores": [1.0]},   # prior 1 -> 0
                            {"text_segment": [9], "labels": [1], "scores": [0.3]}])  # unseen: overall top 1 -> 0.3
    assert vqa_question_prior_score(tmp_path) == pytest.approx(100 * 0.9 / 3)


def test_random_ranking_recall_hand_computed():
    # 2 images with 1 and 2 of the 3 captions: image->text R@1 = mean(1/3, 2/3); R@2 = mean(2/3, 1 - 0) ; R@5 = 100
    got = random_ranking_recall([1, 2], ks=(1, 2, 5))
    assert got["ir_r1"] == pytest.approx(50.0) and got["ir_r2"] == pytest.approx(100.0) and got["ir_r5"] == 100.0
    assert got["tr_r1"] == pytest.approx(50.0)
    assert got["tr_r2"] == pytest.approx(100 * (2 / 3 + 1) / 2)
    assert got["tr_r5"] == pytest.approx(100.0)
