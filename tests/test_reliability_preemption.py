"""Preemption of each training tool in one process (issue 16): a SIGTERM / SIGUSR1 / Ctrl-C arriving during a step
finishes that step, saves a checkpoint, exits 75 (130 for Ctrl-C) with one line naming it, and the same command
resumes exactly; a second Ctrl-C stops at once with the last complete checkpoint intact. The signal is sent by the
process to itself from inside step N (deterministic); the launcher versions are in test_reliability_kill.py."""
import json
import os
import signal

import pytest

from beit3.engine import loop
from beit3.engine.tag_files import checkpoint_problem
from test_finetune import finetune
from test_reliability_tools import env, pretrain, tokenizer  # noqa: F401  (env: fixture)


@pytest.fixture
def signal_at(monkeypatch):
    """``signal_at(n, signum, times=1)``: the process sends itself ``signum`` (``times`` times) during the n-th
    optimizer step of the next run (1-based, counted from where it starts), after its micro batches were loaded."""
    plan = {}
    original = loop.train_step
    calls = {"n": 0}

    def train_step(*args, **kwargs):
        calls["n"] += 1
        for _ in range(plan.get(calls["n"], (0, 0))[1]):
            os.kill(os.getpid(), plan[calls["n"]][0])
        return original(*args, **kwargs)

    monkeypatch.setattr(loop, "train_step", train_step)

    def arm(step, signum, times=1):
        calls["n"] = 0
        plan.clear()
        plan[step] = (signum, times)

    return arm


def losses(out):
    rows = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and not r.get("skipped")}


def latest(out):
    return (out / "checkpoints" / "latest").read_text().strip()


RUNS = {
    "pretrain": lambda env, out, *o: pretrain(env, out, "train.steps=5", "train.save_every=100", "train.log_every=1",
                                              "eval.every_steps=0", *o),
    "tokenizer": lambda env, out, *o: tokenizer(env, out, "train.steps=5", "train.save_every=100",
                                                "train.log_every=1", *o),
}


@pytest.mark.parametrize("tool", sorted(RUNS))
def test_sigterm_saves_exits_75_and_the_same_command_resumes_exactly(tool, env, tmp_path, signal_at,  # noqa: F811
                                                                     capsys):
    run = RUNS[tool]
    assert run(env, tmp_path / "full") == 0
    capsys.readouterr()
    out = tmp_path / "run"
    signal_at(3, signal.SIGTERM)
    assert run(env, out) == 75
    err = capsys.readouterr().err
    stopped = [line for line in err.splitlines() if line.startswith("stopped:")]
    assert stopped == [f"stopped: SIGTERM: stopped after step 3 of 5 and saved checkpoint "
                       f"'{out / 'checkpoints' / 'step00000003'}'; the same command resumes from it"], err
    assert "Traceback" not in err and latest(out) == "step00000003"
    assert checkpoint_problem(out / "checkpoints" / "step00000003") is None
    signal_at(0, signal.SIGTERM)
    assert run(env, out) == 0
    assert losses(out) == losses(tmp_path / "full")  # exact: fp32 on one rank


def test_finetuning_sigusr1_and_ctrl_c(demo_root, tmp_path, signal_at, capsys):
    full, out = tmp_path / "full", tmp_path / "run"
    assert finetune("coco_retrieval", demo_root, full, steps=5) == 0
    signal_at(2, signal.SIGUSR1)
    assert finetune("coco_retrieval", demo_root, out, steps=5) == 75
    assert latest(out) == "step00000002"
    signal_at(2, signal.SIGINT)  # resumed at 2: a first Ctrl-C during step 4 stops the same way, exit 130
    assert finetune("coco_retrieval", demo_root, out, steps=5) == 130
    err = capsys.readouterr().err
    assert "SIGINT received: finishing this step and saving a checkpoint; Ctrl-C again stops at once" in err
    assert latest(out) == "step00000004"
    signal_at(0, signal.SIGINT)
    assert finetune("coco_retrieval", demo_root, out, steps=5) == 0
    assert losses(out) == losses(full)


def test_second_ctrl_c_stops_at_once_keeping_the_last_checkpoint(env, tmp_path, signal_at, capsys):  # noqa: F811
    out = tmp_path / "run"
    assert RUNS["pretrain"](env, out, "train.save_every=2") == 0  # steps 1-5, checkpoints 2, 4 and 5
    signal_at(2, signal.SIGINT, times=2)  # steps 6.. of 8: Ctrl-C twice during step 7
    assert RUNS["pretrain"](env, out, "train.steps=8", "train.save_every=2") == 130
    err = capsys.readouterr().err
    assert "interrupted during step 7" in err and "error: interrupted" in err and "Traceback" not in err
    assert latest(out) == "step00000006" and checkpoint_problem(out / "checkpoints" / "step00000006") is None
    assert not (out / "checkpoints" / "step00000007").exists()


def test_preempt_signals_are_checked(env, tmp_path, capsys):  # noqa: F811
    assert RUNS["pretrain"](env, tmp_path / "run", 'train.preempt_signals=["SIGKILL"]') == 2
    assert "train.preempt_signals: SIGKILL cannot be caught" in capsys.readouterr().err
