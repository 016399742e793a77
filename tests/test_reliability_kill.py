"""Kill tolerance of the REAL pretraining tool under the deepspeed launcher (2 CPU ranks, gloo, fp32, ZeRO-2).

Four launches in all (each ~10-15 s of start-up):
  A  uninterrupted reference run of 12 steps;
  B  rank 1 dies in the middle of the save of step 4 (``BEIT3_TEST_CRASH_IN_SAVE=1:4``, ``os._exit``);
  C  the same command again: resumes from step 2 (the save of 4 never got published); SIGKILL of rank 1 once a later
     checkpoint appears in ``checkpoints/latest``;
  D  the same command again: resumes from the last complete checkpoint and finishes.
The per-step losses in ``log.jsonl`` of B+C+D must equal A's to 1e-6.
"""
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from helpers import LAUNCHER, free_port, tool_env

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
STEPS = 12
TINY = ["model.overrides.depth=1", "model.overrides.embed_dim=64", "model.overrides.img_size=32",
        "model.overrides.ffn_dim=128", "model.overrides.num_heads=2", "data.image_size=32",
        "data.tokenizer_image_size=32", "data.image_batch=4", "data.text_batch=4", "data.pair_batch=4",
        "data.num_workers=0", 'train.progress="off"', "train.tensorboard=false", "train.precision=fp32",
        "train.keep_last=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if LAUNCHER is None:
        pytest.skip("deepspeed launcher not found")
    from beit3.demo.data import make_demo_data
    from tokenizer import VQKD, save_tokenizer, vqkd_config

    tmp = tmp_path_factory.mktemp("kill")
    make_demo_data(tmp / "data", num_images=24, image_size=32, seed=1, num_shards=2)
    save_tokenizer(VQKD(vqkd_config("vqkd_tiny")), tmp / "tok")
    return tmp


def start(env, out, extra_env=None):
    cmd = [str(LAUNCHER), "--num_gpus", "2", "--master_port", str(free_port()), str(REPO / "tools/pretrain.py"),
           "--config", str(REPO / "configs/pretrain/demo.yaml"), "--set", f"data.root={env / 'data'}",
           f"tokenizer.path={env / 'tok'}", f"train.steps={STEPS}", f"output_dir={out}", "train.save_every=2",
           "train.log_every=1", *TINY]
    run_env = tool_env(**(extra_env or {}))
    log = open(env / f"{out.name}.{time.time_ns()}.txt", "w+")
    proc = subprocess.Popen(cmd, env=run_env, stdout=log, stderr=subprocess.STDOUT, cwd=env, start_new_session=True)
    return proc, log


def finish(proc, log, timeout=400):
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    log.seek(0)
    return log.read()


def rank_process(proc, local_rank):
    import psutil

    for child in psutil.Process(proc.pid).children(recursive=True):
        try:
            cmdline = " ".join(child.cmdline())
            if "pretrain.py" in cmdline and child.environ().get("LOCAL_RANK") == str(local_rank):
                return child
        except psutil.Error:
            continue
    return None


def read_log(out):
    """Training rows only (the held-out evaluation's eval_* rows left out)."""
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if not any(k.startswith("eval_") for k in r)]


def latest(out):
    path = out / "checkpoints" / "latest"
    return path.read_text().strip() if path.is_file() else None


def test_sigkill_and_crash_during_save_then_exact_resume(env):
    ref = env / "ref"
    proc, log = start(env, ref)
    output = finish(proc, log)
    assert proc.returncode == 0, output[-3000:]
    reference = read_log(ref)
    assert [r["step"] for r in reference] == list(range(1, STEPS + 1))

    run = env / "run"
    # B: rank 1 exits in the middle of the save of step 4 -> the previous checkpoint (2) stays the good one
    proc, log = start(env, run, {"BEIT3_TEST_CRASH_IN_SAVE": "1:4"})
    output = finish(proc, log)
    assert proc.returncode != 0 and "exits in the middle of the save of step 4" in output, output[-3000:]
    assert latest(run) == "step00000002"
    assert not (run / "checkpoints" / "step00000004").exists()

    # C: the same command: resumes from 2; SIGKILL rank 1 as soon as a newer checkpoint is published
    proc, log = start(env, run)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and latest(run) in (None, "step00000002"):
        time.sleep(0.02)
    killed_after = latest(run)
    victim = rank_process(proc, 1)
    assert proc.poll() is None and victim is not None, finish(proc, log)[-3000:]
    victim.send_signal(signal.SIGKILL)
    output = finish(proc, log, timeout=120)  # the launcher ends the other rank
    assert proc.returncode != 0, output[-3000:]
    assert "resumed from" in output and "step00000002" in output, output[-3000:]
    assert killed_after is not None and killed_after != f"step{STEPS:08d}", killed_after
    kill_latest = latest(run)
    assert kill_latest is not None and kill_latest != f"step{STEPS:08d}"

    # D: the same command again: resumes from the last complete checkpoint and finishes
    proc, log = start(env, run)
    output = finish(proc, log)
    assert proc.returncode == 0, output[-3000:]
    assert f"resumed from {run / 'checkpoints' / kill_latest}" in output, output[-3000:]
    assert latest(run) == f"step{STEPS:08d}"
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".tmp-")]

    resumed = read_log(run)
    assert [r["step"] for r in resumed] == [r["step"] for r in reference]
    keys = [k for k, v in reference[0].items() if k.startswith(("loss", "acc")) and isinstance(v, float)]
    assert "loss" in keys and "loss_image" in keys and "loss_text" in keys and "loss_pair" in keys
    for ra, rb in zip(reference, resumed):
        for key in keys + ["lr", "grad_norm"]:
            assert math.isclose(ra[key], rb[key], rel_tol=0, abs_tol=1e-6), (ra["step"], key, ra[key], rb[key])
        assert rb.get("data_skips") == {} or rb.get("data_skips") == ra.get("data_skips")
