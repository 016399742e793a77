"""Reliability of the engine in one process (issue 9): atomic checkpoints and resume after a crash during a save,
non-finite gradients, data faults, safe loading of DeepSpeed files, the disk-space check."""
import contextlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest
import torch

from _engine_toy import Crash, CrashAfter, ToyBatches, make_model
from beit3.config import ConfigError, to_dict
from beit3.engine import (DataFaultError, NonFiniteLossError, OptimConfig, TrainConfig, TrainingStopped,
                          estimate_checkpoint_bytes, export_consolidated_state_dict, find_resume_tag, train)
from beit3.engine import checkpointing
from beit3.errors import CheckpointError
from helpers import WeightSnapshot, read_log


def run(out, steps=6, *, crash=0, batches_kw=None, callbacks=(), **train_kw):
    kw = dict(steps=steps, micro_batches=2, log_every=1, save_every=3, keep_last=2, zero_stage=1, progress="off",
              clip_grad=1.0, seed=3, tensorboard=False)
    kw.update(train_kw)
    tc = TrainConfig(**kw)
    oc = OptimConfig(lr=3e-2, min_lr=1e-3, warmup_steps=1, weight_decay=0.05)
    return train(make_model(0), ToyBatches(seed=tc.seed, **(batches_kw or {})), tc, oc, out,
                 config_snapshot={"train": to_dict(tc), "optim": to_dict(oc)},
                 callbacks=[CrashAfter(crash)] + list(callbacks))


def assert_same_losses(ref, other, keys=("loss", "loss_vision", "loss_text", "lr", "grad_norm")):
    a, b = read_log(ref), read_log(other)
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in keys:
            assert math.isclose(ra[key], rb[key], rel_tol=0, abs_tol=1e-6), (ra["step"], key, ra[key], rb[key])


def tags(out):
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir() if p.is_dir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "run"
    run(out, steps=6)
    return out


# ------------------------------------------------------------------------------------------- atomic checkpoints
def flip_byte(path, where=0.5):
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("kind", ["mp_rank_00_model_states.pt", "optim_states.pt", "rank0_state.pt",
                                  "complete.json", "latest"])
def test_a_flipped_byte_in_any_checkpoint_file_is_found_and_resume_falls_back(kind, reference, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    ckpt = out / "checkpoints"
    if kind == "latest":
        flip_byte(ckpt / "latest", where=0.99)  # names a tag that does not exist
    else:
        victim = next(p for p in sorted((ckpt / "step00000006").iterdir()) if p.name.endswith(kind))
        flip_byte(victim, where=0.1 if kind == "complete.json" else 0.5)
        problem = checkpointing.checkpoint_problem(ckpt / "step00000006")
        assert problem is not None and (str(victim) in problem or "complete.json" in problem), problem
        assert checkpointing.checkpoint_problem(ckpt / "step00000006", verify=False) is None or kind == "complete.json"
    expected = "step00000006" if kind == "latest" else "step00000003"
    assert find_resume_tag(ckpt)[0] == expected
    with pytest.raises(CheckpointError, match="cannot be exported") if kind != "latest" else contextlib.nullcontext():
        export_consolidated_state_dict(ckpt / "step00000006")  # a tag dir named directly is verified too
    run(out, steps=6)
    assert_same_losses(reference, out)
    if kind != "latest":
        assert (ckpt / "step00000006.corrupt").is_dir() and checkpointing.checkpoint_problem(ckpt / "step00000006") is None


def test_checkpoint_layout_manifest_and_retention(reference):
    ckpt = reference / "checkpoints"
    assert tags(reference) == ["step00000003", "step00000006"]  # no temporary dirs left
    manifest = json.loads((ckpt / "step00000006" / "complete.json").read_text())
    assert manifest["step"] == 6 and manifest["world_size"] == 1
    assert "rank0_state.pt" in manifest["files"] and any(n.endswith("model_states.pt") for n in manifest["files"])
    assert checkpointing.checkpoint_problem(ckpt / "step00000006") is None
    assert find_resume_tag(ckpt) == ("step00000006", [])


def test_crash_during_save_keeps_previous_checkpoint_and_resume_is_exact(tmp_path, monkeypatch, reference):
    def crash_hook(rank, step):  # what BEIT3_TEST_CRASH_IN_SAVE does, as an exception instead of os._exit
        if step == 6:
            raise Crash("killed in the middle of the save of step 6")

    monkeypatch.setattr(checkpointing, "_crash_hook", crash_hook)
    out = tmp_path / "run"
    with pytest.raises(Crash):
        run(out, steps=6)
    ckpt = out / "checkpoints"
    assert (ckpt / "latest").read_text() == "step00000003"
    assert tags(out) == [".tmp-step00000006", "step00000003"]  # the half-written save never got its final name
    assert not (ckpt / ".tmp-step00000006" / "complete.json").exists()
    assert find_resume_tag(ckpt)[0] == "step00000003"
    monkeypatch.undo()
    resumed = run(out, steps=6)
    assert resumed["resumed_from"].endswith("step00000003")
    assert tags(out) == ["step00000003", "step00000006"]
    assert_same_losses(reference, out)


def test_resume_falls_back_when_latest_is_broken_and_ignores_partial_tags(tmp_path, reference, capsys):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    ckpt = out / "checkpoints"
    # the newest checkpoint got truncated on disk, and a crash left an unpublished step dir and a temp dir
    victim = next((ckpt / "step00000006").glob("*optim_states.pt"))
    victim.write_bytes(victim.read_bytes()[:100])
    (ckpt / "step00000009").mkdir()
    (ckpt / "step00000009" / "rank0_state.pt").write_bytes(b"partial")
    (ckpt / ".tmp-step00000012").mkdir()
    tag, notes = find_resume_tag(ckpt)
    assert tag == "step00000003" and any("truncated" in n for n in notes), notes
    log_before = read_log(out)
    resumed = run(out, steps=6)
    assert resumed["resumed_from"].endswith("step00000003")
    err = capsys.readouterr().err
    assert "not a complete checkpoint" in err and "step00000009" in err
    assert not (ckpt / "step00000009").exists() and not (ckpt / ".tmp-step00000012").exists()
    assert (ckpt / "latest").read_text() == "step00000006"
    assert checkpointing.checkpoint_problem(ckpt / "step00000006") is None  # rewritten complete
    assert [r["step"] for r in read_log(out)] == [r["step"] for r in log_before]
    assert_same_losses(reference, out)


def test_retention_never_deletes_the_only_good_checkpoint(tmp_path):
    out = tmp_path / "run"
    run(out, steps=4, save_every=1, keep_last=1)
    assert tags(out) == ["step00000004"] and (out / "checkpoints" / "latest").read_text() == "step00000004"
    # an incomplete newer-looking dir is neither counted as a checkpoint nor allowed to push out the good one
    (out / "checkpoints" / "step00000099").mkdir()
    assert find_resume_tag(out / "checkpoints")[0] == "step00000004"
    run(out, steps=5, save_every=1, keep_last=1)  # resumes from 4, removes the stale dir, saves 5, prunes 4
    assert tags(out) == ["step00000005"]


def test_export_picks_a_complete_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    (out / "checkpoints" / "latest").unlink()  # killed after the rename, before `latest` moved: still found
    weights = export_consolidated_state_dict(out)
    assert torch.equal(weights["patch.weight"], export_consolidated_state_dict(reference)["patch.weight"])


# ----------------------------------------------------------------------------------------- non-finite gradients
@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (1, "fp32"), (2, "bf16"), (3, "fp32")])
def test_nonfinite_gradient_with_finite_loss_is_skipped(tmp_path, stage, precision):
    snap = WeightSnapshot()
    summary = run(tmp_path / "run", steps=4, batches_kw={"grad_poison": {3}}, zero_stage=stage, precision=precision,
                  callbacks=[snap])
    assert summary["step"] == 4 and summary["skipped_steps"] == 1
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert log[1]["skipped"] is True and log[1]["nonfinite"] == "gradient" and math.isfinite(log[1]["loss"])
    assert all("skipped" not in r for r in log if r["step"] != 2)
    assert torch.equal(snap.weights[1], snap.weights[2])  # no update at step 2
    assert not torch.equal(snap.weights[2], snap.weights[3])
    for weights in snap.weights.values():
        assert torch.isfinite(weights).all()
    assert all(torch.isfinite(v).all() for v in export_consolidated_state_dict(tmp_path / "run").values())


def test_nonfinite_loss_is_reported_as_loss(tmp_path):
    run(tmp_path / "run", steps=3, batches_kw={"poison": {2}})
    log = read_log(tmp_path / "run")
    assert log[1]["nonfinite"] == "loss" and log[1]["loss"] == "nan"


def test_nonfinite_gradients_stop_after_n_in_a_row_with_last_good_checkpoint(tmp_path, capsys):
    with pytest.raises(NonFiniteLossError) as info:
        run(tmp_path / "run", steps=8, save_every=1, max_nonfinite_steps=3,
            batches_kw={"grad_poison": set(range(4, 40))})
    message = str(info.value)
    assert isinstance(info.value, TrainingStopped)
    assert "3 consecutive steps" in message and "step00000002" in message and "max_nonfinite_steps" in message
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step00000002"
    assert checkpointing.checkpoint_problem(tmp_path / "run" / "checkpoints" / "step00000002") is None
    assert "training stopped at step 5" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- data faults
def test_data_skips_are_logged_and_summarised(tmp_path, capsys):
    summary = run(tmp_path / "run", steps=4, batches_kw={"skips_every": 2})
    log = read_log(tmp_path / "run")
    assert [r["data_skips"] for r in log] == [{"corrupt_image": n} for n in (1, 2, 3, 4)]  # 2 batches per step
    assert summary["data_skips"] == {"corrupt_image": 4}
    assert "data: 4 samples skipped" in capsys.readouterr().err


def test_data_fault_stops_cleanly_with_last_checkpoint_intact(tmp_path):
    out = tmp_path / "run"
    with pytest.raises(DataFaultError) as info:
        run(out, steps=8, save_every=2, batches_kw={"fail_at": 9})  # batch 9 = step 5
    message = str(info.value)
    assert "data fault at step 5" in message and "max_skip_fraction" in message and "step00000004" in message
    assert (out / "checkpoints" / "latest").read_text() == "step00000004"
    assert tags(out) == ["step00000002", "step00000004"]
    assert checkpointing.checkpoint_problem(out / "checkpoints" / "step00000004") is None


# ----------------------------------------------------------------------------------------------- safe loading
class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_refuses_a_deepspeed_file_with_code(tmp_path, reference):
    out = tmp_path / "run"
    shutil.copytree(reference, out)
    ckpt = out / "checkpoints"
    marker = tmp_path / "pwned"
    (ckpt / "step00000006" / "complete.json").unlink()  # keep it "complete" for the legacy check
    optim = next((ckpt / "step00000006").glob("*optim_states.pt"))
    state = {"optimizer_state_dict": _Evil(marker)}
    torch.save(state, optim)
    with pytest.raises(CheckpointError, match=r"not plain data \(posix.system|not plain data \(os.system"):
        run(out, steps=8)
    assert not marker.exists()
    with pytest.raises(CheckpointError, match="weights_only"):
        export_consolidated_state_dict(out)
    assert not marker.exists()


def test_engine_deepspeed_files_load_with_weights_only(reference):
    from beit3.engine.safe_load import safe_torch_load

    for path in (reference / "checkpoints" / "step00000006").glob("*.pt"):
        assert isinstance(safe_torch_load(path, map_location="cpu"), dict), path


# -------------------------------------------------------------------------------------------------- disk space
def test_too_little_disk_for_a_checkpoint_is_a_config_error(tmp_path, monkeypatch):
    model = make_model(0)
    need = estimate_checkpoint_bytes(model)
    n = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert need >= 16 * n  # fp32 weights + master + two AdamW moments
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=need - 1))
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match=rf"output_dir '{out}': not enough free disk space"):
        run(out, steps=2)
    assert not out.exists()  # nothing written
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=need + 1))
    assert run(out, steps=1)["step"] == 1


def test_a_run_whose_only_checkpoint_is_broken_says_it_starts_from_scratch(tmp_path, capsys):
    out = tmp_path / "run"
    run(out, steps=2, save_every=2)
    biggest = max((p for p in (out / "checkpoints" / "step00000002").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[:100])  # truncated on the file system
    capsys.readouterr()
    summary = run(out, steps=2, save_every=2)
    err = capsys.readouterr().err
    assert summary["resumed_from"] is None
    assert f"no usable checkpoint in '{out / 'checkpoints'}': starting from scratch (step 0)" in err
