"""Fault tolerance of the REAL pretraining tool under the deepspeed launcher (2 CPU ranks, gloo, fp32): SIGKILL and
a crash during a save, SIGTERM to one rank, Ctrl-C (once, then twice) to the whole process group, a flipped byte in
a checkpoint, and resuming on 1 rank then on 2 again.

The SIGKILL test, four launches (each ~10-15 s of start-up):
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


def start(env, out, extra_env=None, ranks=2, extra_set=()):
    cmd = [str(LAUNCHER), "--num_gpus", str(ranks), "--master_port", str(free_port()),
           str(REPO / "tools/pretrain.py"), "--config", str(REPO / "configs/pretrain/demo.yaml"), "--set",
           f"data.root={env / 'data'}", f"tokenizer.path={env / 'tok'}", f"train.steps={STEPS}", f"output_dir={out}",
           "train.save_every=2", "train.log_every=1", *TINY, *extra_set]
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


# ------------------------------------------------------------------------------------- signals, bytes, world size
@pytest.fixture(scope="module")
def reference(env):
    ref = env / "ref_signals"
    proc, log = start(env, ref)
    output = finish(proc, log)
    assert proc.returncode == 0, output[-3000:]
    return ref


def wait_for_rows(proc, log, out, rows):
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if (out / "log.jsonl").is_file() and len(read_log(out)) >= rows:
            return
        time.sleep(0.05)
    raise AssertionError(finish(proc, log)[-3000:])


def assert_same_training(reference, out):
    ra, rb = read_log(reference), read_log(out)
    assert [r["step"] for r in rb] == [r["step"] for r in ra]
    for a, b in zip(ra, rb):
        for key in ("loss", "loss_image", "loss_text", "loss_pair", "lr", "grad_norm"):
            assert math.isclose(a[key], b[key], rel_tol=0, abs_tol=1e-6), (a["step"], key, a[key], b[key])


def test_sigterm_to_one_rank_saves_exits_75_and_resumes_exactly(env, reference):
    import random

    rows, victim_rank = random.Random(time.time_ns()).randint(2, 8), random.Random(time.time_ns()).randint(0, 1)
    run = env / "sigterm"
    proc, log = start(env, run)
    wait_for_rows(proc, log, run, rows)
    rank_process(proc, victim_rank).send_signal(signal.SIGTERM)  # a scheduler may reach only one rank first
    output = finish(proc, log)
    assert proc.returncode == 75, (rows, victim_rank, output[-3000:])
    stopped = [line for line in output.splitlines() if line.startswith("stopped: SIGTERM: stopped after step")]
    assert len(stopped) == 1 and "Traceback" not in output, output[-3000:]
    step = int(stopped[0].split("after step ")[1].split()[0])
    assert step >= rows and latest(run) == f"step{step:08d}", (stopped, latest(run))
    proc, log = start(env, run)  # the same command
    output = finish(proc, log)
    assert proc.returncode == 0 and f"resumed from {run / 'checkpoints' / f'step{step:08d}'}" in output, output[-3000:]
    assert_same_training(reference, run)


def test_ctrl_c_in_a_terminal_saves_and_a_second_one_stops_at_once(env, reference):
    import psutil

    run = env / "ctrl_c"
    proc, log = start(env, run)
    wait_for_rows(proc, log, run, 3)
    ranks = [rank_process(proc, r) for r in (0, 1)]
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: SIGINT to the launcher and both ranks
    psutil.wait_procs(ranks, timeout=120)
    output = finish(proc, log)
    assert "SIGINT received: finishing this step and saving a checkpoint" in output, output[-3000:]
    stopped = [line for line in output.splitlines() if line.startswith("stopped: SIGINT: stopped after step")]
    assert len(stopped) == 1, output[-3000:]
    step = int(stopped[0].split("after step ")[1].split()[0])
    assert latest(run) == f"step{step:08d}"

    proc, log = start(env, run)  # resumes; Ctrl-C twice: stops at once, the last complete checkpoint stays
    wait_for_rows(proc, log, run, step + 2)
    before = latest(run)
    ranks = [rank_process(proc, r) for r in (0, 1)]
    os.killpg(proc.pid, signal.SIGINT)
    time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    psutil.wait_procs(ranks, timeout=120)
    output = finish(proc, log)
    assert "error: interrupted" in output, output[-3000:]
    from beit3.engine.tag_files import checkpoint_problem

    assert latest(run) in (before, f"step{int(before[4:]) + 2:08d}") and checkpoint_problem(
        run / "checkpoints" / latest(run)) is None
    proc, log = start(env, run)
    output = finish(proc, log)
    assert proc.returncode == 0, output[-3000:]
    assert_same_training(reference, run)


def test_a_flipped_byte_falls_back_to_the_newest_checkpoint_that_verifies(env, reference):
    import shutil

    run = env / "flipped"
    shutil.copytree(reference, run)
    victim = sorted((run / "checkpoints" / f"step{STEPS:08d}").glob("*optim_states.pt"))[-1]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01
    victim.write_bytes(bytes(data))
    rows = [r for r in read_log(run) if r["step"] <= STEPS - 2]
    (run / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc, log = start(env, run)
    output = finish(proc, log)
    assert proc.returncode == 0, output[-3000:]
    assert f"'{victim}' does not match its SHA-256" in output, output[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step{STEPS - 2:08d}'}" in output, output[-3000:]
    assert (run / "checkpoints" / f"step{STEPS:08d}.corrupt").is_dir()  # kept for inspection, out of the way
    assert_same_training(reference, run)


def test_resume_on_one_rank_then_on_two(env, reference, tmp_path):
    import shutil

    run = env / "world"
    shutil.copytree(reference, run)
    config_before = (run / "config.yaml").read_text()
    one = lambda *extra: start(env, run, ranks=1, extra_set=[f"train.steps={STEPS + 2}", *extra])  # noqa: E731
    proc, log = one()
    output = finish(proc, log)
    assert proc.returncode == 2 and "set train.micro_batches=2 to keep it" in output, output[-3000:]
    assert (run / "config.yaml").read_text() == config_before  # refused before anything was written
    proc, log = one("train.micro_batches=2")
    output = finish(proc, log)
    assert proc.returncode == 0 and "world size changed" in output and "saved on 2 ranks x 1" in output, output[-3000:]
    proc, log = start(env, run, extra_set=[f"train.steps={STEPS + 4}"])
    output = finish(proc, log)
    assert proc.returncode == 0 and "saved on 1 ranks x 2" in output, output[-3000:]
    rows = read_log(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 5))
    assert [r["world_size"] for r in rows[STEPS:]] == [1, 1, 2, 2]
    assert all(math.isfinite(r["loss"]) for r in rows)


def test_start_up_refusals_under_the_launcher_write_nothing(env, reference):
    """A finished run's folder: a changed model and auto_resume=false exit 2 naming the cause, once, and write
    nothing; train.steps below the saved step exits 0 saying so and touches no checkpoint and no log line."""
    import shutil

    run = env / "startup"
    shutil.copytree(reference, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    cases = [(["model.overrides.depth=2"], 2, "model.overrides.depth: 1 -> 2); resuming cannot load them"),
             (["train.auto_resume=false"], 2, "and train.auto_resume is false, which would train over it"),
             ([f"train.steps={STEPS - 2}"], 0, f"nothing to train: the run is at step {STEPS} and train.steps is {STEPS - 2}")]
    for extra, code, said in cases:
        proc, log = start(env, run, extra_set=extra)
        output = finish(proc, log)
        assert proc.returncode == code and said in output, (extra, output[-3000:])
        assert output.count(said) == 1, (extra, output[-3000:])  # said once, by rank 0
        after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
        if code == 0:  # a run that started: config.yaml records this command's config; nothing else changes
            after.pop(Path("config.yaml")), before.pop(Path("config.yaml"), None)
        assert after == before, extra
