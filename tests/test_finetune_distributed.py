"""Two CPU ranks through the real ``deepspeed`` launcher: retrieval fine-tuning with the CLIP loss gathered across
ranks and evaluation sharded over ranks and gathered back (every image and caption scored exactly once)."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))  # works with any pytest import mode
from data_fixtures import demo_root  # noqa: F401  (fixture)
from test_finetune import TINY

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
LAUNCHER = BIN / "deepspeed" if (BIN / "deepspeed").exists() else shutil.which("deepspeed")


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_rank_retrieval_finetuning(demo_root, tmp_path):  # noqa: F811
    if LAUNCHER is None:
        pytest.skip("deepspeed launcher not found")
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    out = tmp_path / "run"
    cmd = [str(LAUNCHER), "--num_gpus", "2", "--master_port", str(_free_port()), str(REPO / "tools/finetune.py"),
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
