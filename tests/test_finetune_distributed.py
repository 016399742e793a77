"""Two CPU ranks through the real ``deepspeed`` launcher: retrieval fine-tuning with the CLIP loss gathered across
ranks and evaluation sharded over ranks and gathered back (every image and caption scored exactly once)."""
import json
import subprocess
from pathlib import Path

import pytest

from test_finetune import TINY
from helpers import LAUNCHER, free_port, tool_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


def test_two_rank_retrieval_finetuning(demo_root, tmp_path):
    if LAUNCHER is None:
        pytest.skip("deepspeed launcher not found")
    env = tool_env()
    out = tmp_path / "run"
    cmd = [str(LAUNCHER), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "tools/finetune.py"),
           "--task", "coco_retrieval", "--config", str(REPO / "configs/finetune/demo_retrieval.yaml"), "--set",
           f"data.root={demo_root}", f"output_dir={out}", "data.image_size=32", "data.batch_size=4",
           "data.num_workers=0", "eval.batch_size=8", "train.steps=2", "eval.every_steps=2", "train.zero_stage=2",
           "train.tensorboard=false", *TINY]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    final = json.loads((out / "metrics.json").read_text())["final"]["metrics"]
    val = [json.loads(line) for line in (demo_root / "coco_retrieval.val.jsonl").read_text().splitlines()]
    assert final["num_texts"] == len(val) and final["num_images"] == len({v["image_id"] for v in val})
    assert (out / "best" / "model.safetensors").is_file()
