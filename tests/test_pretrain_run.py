"""End-to-end pretraining through the command-line contract: the tokenizer tool, 2 CPU ranks under the DeepSpeed
launcher (ZeRO-2 and ZeRO-3), exact resume after a kill, export, and start-up errors."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import beit3
from beit3.demo.data import make_demo_data
from beit3.cli.pretrain import main as pretrain_main
from helpers import free_port, tool_env

ROOT = Path(__file__).resolve().parents[1]
STEPS = 30
TINY = [
    "model.overrides.depth=2", "model.overrides.embed_dim=64", "model.overrides.ffn_dim=256",
    "data.image_batch=6", "data.text_batch=6", "data.pair_batch=6", "data.num_workers=0",
    "optim.lr=2e-3", "optim.warmup_steps=3", "train.log_every=1", "train.save_every=6",
]



def _sets(items):
    return [arg for item in items for arg in ("--set", item)]


def _run(cmd, timeout=600):
    proc = subprocess.run(cmd, env=tool_env(), cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _read_log(out):
    """The training rows of a run's log.jsonl (the held-out evaluation's ``eval_*`` rows left out)."""
    rows = [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]
    return [r for r in rows if not any(k.startswith("eval_") for k in r)]


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    base = tmp_path_factory.mktemp("pretrain")
    root = base / "data"
    make_demo_data(root, num_images=120, image_size=64, seed=0)
    tok = base / "tok"
    _run([sys.executable, str(ROOT / "tools/train_tokenizer.py"), "--config", str(ROOT / "configs/tokenizer/demo.yaml"),
          *_sets([f"data.root={root}", f"output_dir={tok}", "train.steps=6", "train.log_every=2", "data.image_batch=16",
                  "data.num_workers=0"])])
    return {"base": base, "root": root, "tok": tok}


def _pretrain_cmd(demo, out, *extra):
    return [
        "deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), str(ROOT / "tools/pretrain.py"),
        "--config", str(ROOT / "configs/pretrain/demo.yaml"),
        *_sets([f"data.root={demo['root']}", f"tokenizer.path={demo['tok']}", f"train.steps={STEPS}", f"output_dir={out}",
                *TINY, *extra]),
    ]


def test_tokenizer_tool_contract(demo):
    from tokenizer import load_tokenizer

    log = _read_log(demo["tok"])
    assert [entry["step"] for entry in log] == [2, 4, 6]
    assert all({"step", "loss", "codebook_usage", "rec_loss", "quant_loss", "code_perplexity"} <= entry.keys() for entry in log)
    tok = load_tokenizer(demo["tok"])
    codes = tok.get_codebook_indices(torch.rand(2, 3, 64, 64))
    assert codes.shape == (2, 64) and int(codes.max()) < 1024
    held_out = json.loads((demo["tok"] / "tokenizer_eval.json").read_text())
    assert 0 < held_out["held_out_codebook_usage"] <= 1 and held_out["held_out_images"] > 0
    assert (demo["tok"] / "codebook_usage.png").stat().st_size > 1000


def _assert_streams_learn(log):
    assert [entry["step"] for entry in log] == list(range(1, STEPS + 1))
    required = {"step", "loss", "loss_image", "loss_text", "loss_pair", "lr", "samples_per_s", "tokens_per_s", "grad_norm"}
    assert all(required <= entry.keys() for entry in log)
    for key in ("loss_image", "loss_text", "loss_pair"):
        first = sum(e[key] for e in log[:5]) / 5
        last = sum(e[key] for e in log[-5:]) / 5
        assert last < 0.95 * first, (key, first, last)


@pytest.fixture(scope="module")
def zero2_run(demo):
    out = demo["base"] / "zero2"
    _run(_pretrain_cmd(demo, out, "train.zero_stage=2"))
    return out


@pytest.mark.slow
def test_two_ranks_zero2_every_stream_learns(zero2_run):
    _assert_streams_learn(_read_log(zero2_run))


@pytest.mark.slow
def test_two_ranks_zero3_learns_and_exports_official_layout(demo):
    out = demo["base"] / "zero3"
    _run(_pretrain_cmd(demo, out, "train.zero_stage=3", "objective.itm_weight=1.0"))  # ITM too (off in demo.yaml)
    _assert_streams_learn(_read_log(out))
    export = demo["base"] / "zero3_export"
    _run([sys.executable, str(ROOT / "tools/export_checkpoint.py"), "--run", str(out), "--out", str(export)])
    official = torch.load(export / "beit3_pretrained.pth", weights_only=True)["model"]
    assert {"mim_head.weight", "mlm_head.weight"} <= official.keys()
    vocab = official["mlm_head.weight"].shape[0]
    backbone = beit3.create_model("beit3_tiny_patch8_32", img_size=64, embed_dim=64, num_heads=4, ffn_dim=256, depth=2,
                                  vocab_size=vocab)
    report = beit3.load_checkpoint(backbone, export / "beit3_pretrained.pth", strict=True)
    heads = {"mim_head.bias", "mim_head.weight", "mlm_head.bias", "mlm_head.weight",  # + the ITC/ITM heads
             "vision_head.weight", "language_head.weight", "logit_scale"}
    assert report.missing == [] and heads <= set(report.left_for_heads)
    assert {k.split(".")[0] for k in report.left_for_heads} == {"mim_head", "mlm_head", "vision_head", "language_head",
                                                                 "logit_scale", "itm_head"}
    assert official["logit_scale"].shape == ()  # a 0-dim parameter keeps its shape through ZeRO-3
    restored = beit3.from_pretrained(export)
    assert type(restored).__name__ == "BEiT3ForPretraining"
    assert torch.equal(restored.state_dict()["mim_head.weight"], official["mim_head.weight"])
    _assert_eval_equals_one_process_probe(out, export, demo)


def _assert_eval_equals_one_process_probe(run, export, demo):
    """The held-out evaluation logged by the 2-rank run (sharded, ZeRO-3: parameters gathered) equals the probe tool's
    evaluation of the exported weights in this one process."""
    from beit3.config import load_config
    from beit3.probing import probe_pretrained
    from beit3.cli.pretrain import PretrainConfig

    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if "eval_acc_pair_text" in line]
    assert [r["step"] for r in rows] == [STEPS]  # demo.yaml evaluates every 100 steps and after the last one
    logged = {k[len("eval_"):]: v for k, v in rows[-1].items() if k.startswith("eval_") and k != "eval_seconds"}
    cfg = load_config(PretrainConfig, run / "config.yaml")
    report = probe_pretrained(export, demo["root"], visual_tokenizer=str(demo["tok"]), eval_cfg=cfg.eval,
                              masking=cfg.objective.masking, max_text_len=cfg.data.max_text_len)
    assert {"acc_image", "acc_text", "grounding_gap_text", "probe_colour_gap"} <= logged.keys()
    assert report["metrics"].keys() == logged.keys()
    for key, value in logged.items():
        assert report["metrics"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_resume_after_a_kill_reproduces_the_uninterrupted_losses(demo, zero2_run):
    out = demo["base"] / "killed"
    cmd = _pretrain_cmd(demo, out, "train.zero_stage=2")
    proc = subprocess.Popen(cmd, env=tool_env(), cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    latest = out / "checkpoints" / "latest"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text().strip() == "step00000006":
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the run ended before it could be killed"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert len(_read_log(out)) < STEPS
    _run(cmd)  # the same command again resumes from the checkpoint
    resumed, reference = _read_log(out), _read_log(zero2_run)
    assert [e["step"] for e in resumed] == list(range(1, STEPS + 1))
    for a, b in zip(resumed, reference):
        for key in ("loss", "loss_image", "loss_text", "loss_pair"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.stpes=3"], "unknown config key 'train.stpes'"),
        (["train.steps=many"], "'train.steps': expected an integer"),
        (["objective.stage=text"], "objective.stage='text' trains only the text stream"),
        (["data.image_batch=0", "data.text_batch=0", "data.pair_batch=0"], "all 0"),
        (["data.root=/nonexistent/demo"], "data.root '/nonexistent/demo' is not a directory"),
    ],
)
def test_bad_configs_stop_at_once_naming_the_key(demo, tmp_path, capsys, overrides, message):
    base = [f"data.root={demo['root']}", f"tokenizer.path={demo['tok']}", f"output_dir={tmp_path / 'out'}"]
    code = pretrain_main(["--config", str(ROOT / "configs/pretrain/demo.yaml"), *_sets(base + overrides)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out" / "log.jsonl").exists()


def test_pretraining_from_precomputed_codes(demo, tmp_path):
    """tools/tokenize_dataset.py codes both image indexes; pretraining then reads codes instead of the tokenizer."""
    from beit3.config import load_config
    from beit3.cli.pretrain import PretrainConfig, build_pretraining
    from tokenizer import load_tokenizer

    root = demo["root"]
    _run([sys.executable, str(ROOT / "tools/tokenize_dataset.py"), "--tokenizer", str(demo["tok"]), "--index",
          str(root / "imagenet.train.index.jsonl"), str(root / "coco_retrieval.train.jsonl"), "--root", str(root),
          "--out", str(root / "codes"), "--resize", "64"])
    overrides = [f"data.root={root}", "tokenizer.path=", "data.codes_dir=codes", f"output_dir={tmp_path}", *TINY]
    cfg = load_config(PretrainConfig, ROOT / "configs/pretrain/demo.yaml", overrides)
    objective, inputs = build_pretraining(cfg)
    batch = next(iter(inputs))
    for stream in ("image", "pair"):
        assert "tokenizer_image" not in batch[stream] and batch[stream]["codes"].shape == (6, 64)
    # the codes are the tokenizer's codes of the fixed center crop the model sees
    tok = load_tokenizer(demo["tok"])
    view01 = batch["image"]["image"] * 0.5 + 0.5
    agreement = (tok.get_codebook_indices(view01) == batch["image"]["codes"]).float().mean()
    assert agreement > 0.9
    loss, metrics = objective(batch)
    assert torch.isfinite(loss) and {"loss_image", "loss_pair"} <= metrics.keys()
