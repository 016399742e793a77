"""Engine tests in one process (1 rank, gloo): param groups, schedule, config errors, training, resume, NaN skip."""
import argparse
import json
import math
from pathlib import Path

import pytest
import torch

from _engine_toy import Crash, CrashAfter, ToyBatches, ToyRunConfig, make_model
from beit3.config import ConfigError, from_dict, load_config, to_dict
from beit3.engine import (DEFAULT_DEEPSPEED_CONFIGS, NonFiniteLossError, OptimConfig, TrainConfig, add_common_args,
                          build_deepspeed_config, export_consolidated_state_dict, lr_factor, param_groups, train)
from helpers import WeightSnapshot, read_log

REPO = Path(__file__).resolve().parents[1]
REQUIRED = {"step", "loss", "lr", "grad_norm", "samples_per_s", "tokens_per_s", "time", "loss_vision", "loss_text"}


def run(out, steps=6, *, crash=0, poison=(), callbacks=(), **train_kw):
    kw = dict(steps=steps, micro_batches=2, log_every=1, save_every=3, keep_last=2, zero_stage=1, progress="off",
              clip_grad=1.0, seed=3)
    kw.update(train_kw)
    tc = TrainConfig(**kw)
    oc = OptimConfig(lr=3e-2, min_lr=1e-3, warmup_steps=1, weight_decay=0.05)
    cbs = [CrashAfter(crash)] + list(callbacks)
    return train(make_model(0), ToyBatches(seed=tc.seed, poison=poison), tc, oc, out,
                 config_snapshot={"train": to_dict(tc), "optim": to_dict(oc)}, callbacks=cbs)


# ------------------------------------------------------------------------------------------------ unit: param groups
def test_param_groups_no_decay_frozen_and_layer_decay():
    model = make_model()
    names = {id(p): n for n, p in model.named_parameters()}
    groups = param_groups(model, OptimConfig(lr=1.0, weight_decay=0.1, layer_decay=0.5))
    seen = {names[id(p)]: g for g in groups for p in g["params"]}
    assert "frozen.weight" not in seen and "frozen.bias" not in seen  # frozen params excluded
    assert set(seen) == {n for n, p in model.named_parameters() if p.requires_grad}
    for name in ("cls_token", "patch.bias", "block.0.weight", "block.1.bias", "vision_head.bias"):
        assert seen[name]["weight_decay"] == 0.0, name  # no_weight_decay(), ndim<=1, .bias
    for name in ("patch.weight", "embed.weight", "block.1.weight", "text_head.weight"):
        assert seen[name]["weight_decay"] == 0.1, name
    # L = num_layers_for_lr_decay() = 1: scale = 0.5 ** (L + 1 - layer_id)
    assert seen["patch.weight"]["lr_scale"] == 0.25 and seen["patch.weight"]["lr"] == 0.25
    assert seen["block.1.weight"]["lr_scale"] == 0.5
    assert seen["text_head.weight"]["lr_scale"] == 1.0
    assert all(g["params"] for g in groups) and len(groups) == 6  # 3 layers x {decay, no_decay}, none empty
    plain = param_groups(model, OptimConfig(weight_decay=0.1))  # layer_decay 1.0: two groups, scale 1
    assert len(plain) == 2 and {g["lr_scale"] for g in plain} == {1.0}


def test_fused_adamw_option_takes_the_same_steps():
    from beit3.engine import build_optimizer

    params = {}
    for fused in (False, True):
        model = make_model()
        opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.1, fused=fused))
        assert bool(opt.defaults["fused"]) is fused
        for step in range(3):
            opt.zero_grad()
            torch.manual_seed(step)
            model.patch(torch.randn(2, model.patch.in_features)).square().sum().backward()
            opt.step()
        params[fused] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for name, value in params[False].items():
        torch.testing.assert_close(params[True][name], value, atol=1e-6, rtol=1e-5)
    assert not torch.equal(params[True]["patch.weight"], make_model().patch.weight)  # the steps did move it


def test_param_groups_drop_empty_groups_without_hooks():
    model = torch.nn.Sequential(torch.nn.LayerNorm(4))  # only ndim<=1 params: the decay group is empty
    groups = param_groups(model, OptimConfig(layer_decay=0.5))  # no get_layer_id: layer decay not applied
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.0 and groups[0]["lr_scale"] == 1.0


def test_lr_schedule_warmup_then_cosine():
    oc = OptimConfig(lr=1.0, min_lr=0.1, warmup_steps=4)
    f = [lr_factor(s, oc, 12) for s in range(13)]
    assert f[0] == 0.0 and f[2] == pytest.approx(0.5) and f[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[4:], f[5:]))
    assert f[8] == pytest.approx(0.1 + 0.9 * 0.5)  # halfway through the cosine
    assert f[12] == pytest.approx(0.1)


# ------------------------------------------------------------------------------------------------- unit: configs/args
@pytest.mark.parametrize("override, key", [
    ("train.stepz=3", "train.stepz"),
    ("train.steps=many", "train.steps"),
    ("train.precision=fp16", "train.precision"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("train.micro_batches=0", "micro_batches"),
    ("train.zero_stage=4", "zero_stage"),
    ("optim.layer_dcay=0.9", "optim.layer_dcay"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(ToyRunConfig, None, [override])


def test_config_roundtrip_and_deepspeed_config(tmp_path):
    cfg = load_config(ToyRunConfig, None, ["train.precision=bf16", "train.zero_stage=2", "train.clip_grad=0",
                                           "train.micro_batches=4", "optim.betas=[0.9,0.999]"])
    assert from_dict(ToyRunConfig, to_dict(cfg)) == cfg and cfg.optim.betas == (0.9, 0.999)
    ds = build_deepspeed_config(cfg.train)
    assert ds["gradient_clipping"] == 0.0  # always explicit (DeepSpeed >= 0.19.3 defaults to 1.0)
    assert ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_accumulation_steps"] == 4 and "train_batch_size" not in ds
    # a JSON file: our keys override it
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3, "overlap_comm": False}, "gradient_clipping": 1.0,
                                "train_batch_size": 99}))
    ds = build_deepspeed_config(TrainConfig(deepspeed_config=str(path), zero_stage=1, clip_grad=3.0))
    assert ds["zero_optimization"] == {"stage": 1, "overlap_comm": False} and ds["gradient_clipping"] == 3.0
    assert "train_batch_size" not in ds and ds["bf16"]["enabled"] is False
    with pytest.raises(ConfigError, match="deepspeed_config"):
        build_deepspeed_config(TrainConfig(deepspeed_config=str(tmp_path / "missing.json")))


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_json_files_match_builtin_defaults(stage):
    data = json.loads((REPO / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    assert data == DEFAULT_DEEPSPEED_CONFIGS[stage]
    assert data["zero_optimization"]["stage"] == stage
    for key in ("train_batch_size", "gradient_clipping", "bf16", "fp16"):
        assert key not in data  # filled in by the engine; the JSON never needs editing per run


def test_add_common_args():
    parser = add_common_args(argparse.ArgumentParser())
    args = parser.parse_args(["--config", "c.yaml", "--set", "a=1", "b.c=2", "--local_rank=1", "--set", "d=x"])
    assert args.config == "c.yaml" and args.overrides == ["a=1", "b.c=2", "d=x"]
    assert parser.parse_args([]).overrides == []


# ----------------------------------------------------------------------------------------------------- training
def test_train_loss_falls_logs_rotate_and_export(tmp_path):
    out = tmp_path / "run"
    summary = run(out, steps=16, save_every=4, keep_last=2, log_every=2, activation_checkpointing=True,
                  progress="on")
    log = read_log(out)
    assert [r["step"] for r in log] == list(range(2, 17, 2))
    for record in log:
        assert REQUIRED <= set(record), set(record)
        assert record["samples_per_s"] > 0 and record["tokens_per_s"] > 0 and record["grad_norm"] > 0
    assert log[-1]["loss"] < 0.8 * log[0]["loss"], [r["loss"] for r in log]
    ckpt = out / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("step")) == ["step00000012", "step00000016"]
    assert (ckpt / "latest").read_text() == "step00000016"
    assert summary["step"] == 16 and summary["last_checkpoint"] == str(ckpt / "step00000016")
    state = torch.load(ckpt / "step00000016" / "rank0_state.pt", weights_only=True)
    assert state["data"] == {"index": 32} and state["step"] == 16 and set(state["rng"]) >= {"python", "numpy", "torch"}
    assert any((out / "tensorboard").iterdir())
    model = summary["engine"].module
    assert model.grad_checkpointing is True
    weights = export_consolidated_state_dict(out)
    trainable = {n: p for n, p in model.named_parameters()}
    for name, param in trainable.items():
        assert torch.equal(weights[name], param.detach().float()), name
    assert set(export_consolidated_state_dict(ckpt / "step00000012")) == set(weights)
    # already finished: a rerun resumes at the end and does nothing
    again = run(out, steps=16, save_every=4, keep_last=2, log_every=2)
    assert again["step"] == 16 and again["resumed_from"].endswith("step00000016")
    assert len(read_log(out)) == len(log)


def test_exact_resume_after_crash(tmp_path):
    ref = run(tmp_path / "ref", steps=6)
    assert ref["step"] == 6
    with pytest.raises(Crash):
        run(tmp_path / "b", steps=6, crash=5)  # checkpoint at 3, dies after step 5
    assert [r["step"] for r in read_log(tmp_path / "b")] == [1, 2, 3, 4]  # step 5 died before its log line
    resumed = run(tmp_path / "b", steps=6)  # the same command again: auto-resume from step 3
    assert resumed["resumed_from"].endswith("step00000003")
    a, b = read_log(tmp_path / "ref"), read_log(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]  # the stale line of step 4 was replaced
    for ra, rb in zip(a, b):
        for key in ("loss", "loss_vision", "loss_text", "lr", "grad_norm"):
            assert math.isclose(ra[key], rb[key], rel_tol=0, abs_tol=1e-6), (ra["step"], key, ra[key], rb[key])
    wa, wb = export_consolidated_state_dict(tmp_path / "ref"), export_consolidated_state_dict(tmp_path / "b")
    for name in wa:
        assert torch.allclose(wa[name], wb[name], atol=1e-6, rtol=0), name


@pytest.mark.parametrize("stage, precision", [(0, "fp32"), (1, "fp32"), (3, "fp32"), (2, "bf16")])
def test_nonfinite_loss_step_is_skipped(tmp_path, stage, precision):
    snap = WeightSnapshot()
    # micro_batches=2: batch 3 is the 2nd micro batch of step 2 (the first micro batch's gradient is discarded too)
    summary = run(tmp_path / "run", steps=4, poison={3}, zero_stage=stage, precision=precision, callbacks=[snap])
    assert summary["step"] == 4 and summary["skipped_steps"] == 1
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3, 4]  # one line per step, also for the skipped one
    assert log[1]["skipped"] is True and log[1]["loss"] == "nan" and log[1]["nonfinite_in_a_row"] == 1
    assert all(math.isfinite(r["loss"]) and "skipped" not in r for r in log if r["step"] != 2)
    assert torch.equal(snap.weights[1], snap.weights[2])  # no update at step 2
    assert not torch.equal(snap.weights[2], snap.weights[3])  # training continues


def test_nonfinite_loss_stops_after_n_in_a_row(tmp_path):
    with pytest.raises(NonFiniteLossError) as info:
        run(tmp_path / "run", steps=8, poison=set(range(4, 12)), save_every=1, max_nonfinite_steps=3)
    message = str(info.value)
    assert "3 consecutive steps" in message and "max_nonfinite_steps" in message
    assert "step00000002" in message  # steps 1-2 were good and saved; 3-5 non-finite
    assert (tmp_path / "run" / "checkpoints" / "latest").read_text() == "step00000002"


@pytest.mark.parametrize("precision, stage", [("bf16", 0), ("bf16", 2), ("fp32", 2), ("fp32", 3)])
def test_precision_and_stage_smoke(tmp_path, precision, stage):
    summary = run(tmp_path / "run", steps=3, save_every=2, precision=precision, zero_stage=stage)
    log = read_log(tmp_path / "run")
    assert [r["step"] for r in log] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in log)
    assert summary["last_checkpoint"].endswith("step00000003")
    weights = export_consolidated_state_dict(tmp_path / "run")
    assert weights["patch.weight"].dtype == torch.float32 and weights["patch.weight"].shape == (16, 8)
    assert "frozen.weight" in weights
    if precision == "bf16":  # fp32 master weights, not the bf16 copies
        assert not torch.equal(weights["patch.weight"], weights["patch.weight"].bfloat16().float())


# ------------------------------------------------------------------------------------------ what the run says
def test_output_to_a_file_gets_a_line_per_logged_step_and_a_final_summary(tmp_path, capsys):
    run(tmp_path / "run", steps=4, progress="auto", save_every=2)  # pytest's captured stdout is not a terminal
    out, err = capsys.readouterr()
    lines = [line for line in out.splitlines() if line.startswith("[beit3] step")]
    assert [line.split()[2] for line in lines] == ["1/4", "2/4", "3/4", "4/4"], out
    assert " lr " in lines[0] and "ETA 0:00:00" in lines[-1]
    assert f"done: step 4 of 4 (4 this run); last checkpoint {tmp_path / 'run' / 'checkpoints' / 'step00000004'}" in err
    run(tmp_path / "run", steps=3, progress="off")
    assert "nothing to train: the run is at step 4 and train.steps is 3" in capsys.readouterr().err


def test_progress_line_and_config_differences():
    from beit3.config import config_differences
    from beit3.engine.monitor import progress_line

    line = progress_line({"step": 10, "loss": 2.5, "loss_text": 1.0, "loss_image": 1.5, "lr": 1e-3,
                          "samples_per_s": 12.0, "time": 0.5}, 100)
    assert line == "[beit3] step 10/100  loss 2.5 (image 1.5, text 1)  lr 0.001  12.0 samples/s  ETA 0:00:45"
    old = {"model": {"depth": 4, "dim": 8}, "train": {"steps": 10}, "seed": 0}
    new = {"model": {"depth": 2, "dim": 8}, "train": {"steps": 10, "keep_last": 2}, "seed": 0}
    assert config_differences(old, new) == ["model.depth: 4 -> 2", "train.keep_last: 'absent' -> 2"]


def test_resume_with_a_changed_config_names_the_changed_keys(tmp_path, capsys):
    run(tmp_path / "run", steps=2, save_every=2)
    capsys.readouterr()
    run(tmp_path / "run", steps=3, save_every=2)
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert "the config differs from the one saved in" in said and "train.steps: 2 -> 3" in said


def test_ctrl_c_names_the_last_checkpoint(tmp_path, capsys):
    class Interrupt:
        def on_step_end(self, ctx, step, metrics):
            if step == 3:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "run", steps=6, save_every=2, callbacks=[Interrupt()])
    err = capsys.readouterr().err
    assert f"interrupted during step 4; the last good checkpoint is '{tmp_path / 'run' / 'checkpoints' / 'step00000002'}'" in err
