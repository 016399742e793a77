"""Start-up validation of both training tools (issue 9): every bad input is a one-line error naming the key or path,
exit code 2, and nothing in the output directory is overwritten."""
import shutil
from pathlib import Path

import pytest

from beit3.cli import pretrain as run_pretraining, train_tokenizer as run_tokenizer_training
from beit3.demo.data import make_demo_data

REPO = Path(__file__).resolve().parents[1]
TINY = ["model.overrides.depth=1", "model.overrides.embed_dim=64", "model.overrides.img_size=32",
        "model.overrides.ffn_dim=128", "model.overrides.num_heads=2", "data.image_size=32",
        "data.tokenizer_image_size=32", "data.image_batch=4", "data.text_batch=4", "data.pair_batch=4",
        "data.num_workers=0", 'train.progress="off"', "train.tensorboard=false", "train.steps=2"]
SENTINEL = "previous run's config\n"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    from tokenizer import VQKD, save_tokenizer, vqkd_config

    tmp = tmp_path_factory.mktemp("tools")
    make_demo_data(tmp / "data", num_images=24, image_size=32, seed=1, num_shards=2)
    save_tokenizer(VQKD(vqkd_config("vqkd_tiny")), tmp / "tok")
    return tmp


@pytest.fixture
def out(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "config.yaml").write_text(SENTINEL)
    return out


def pretrain(env, out, *overrides):
    args = ["--config", str(REPO / "configs/pretrain/demo.yaml"), "--set", f"data.root={env / 'data'}",
            f"tokenizer.path={env / 'tok'}", f"output_dir={out}", *TINY, *overrides]
    return run_pretraining.main(args)


def tokenizer(env, out, *overrides):
    args = ["--config", str(REPO / "configs/tokenizer/demo.yaml"), "--set", f"data.root={env / 'data'}",
            f"output_dir={out}", "objective.arch=vqkd_tiny", "objective.model.img_size=32",
            "objective.model.codebook_size=64", "objective.model.code_dim=8", "data.image_size=32",
            "data.tokenizer_image_size=32", "data.image_batch=4", "data.num_workers=0", 'train.progress="off"',
            "train.tensorboard=false", "train.steps=2", *overrides]
    return run_tokenizer_training.main(args)


def assert_clean_error(capsys, out, *needles):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert (out / "config.yaml").read_text() == SENTINEL  # nothing overwritten
    assert not (out / "checkpoints").exists() and not (out / "log.jsonl").exists()


def _bad_spm(env):
    path = env / "bad.spm"
    path.write_bytes(b"\x00not a sentencepiece model")
    return path


CASES = [
    (lambda env: ["train.stepz=3"], ["unknown config key 'train.stepz'"]),
    (lambda env: ["train.steps=abc"], ["train.steps", "expected an integer"]),
    (lambda env: ["optim.lr=fast"], ["optim.lr"]),
    (lambda env: ["data.image_batch=-1"], ["data.image_batch must be >= 0"]),
    (lambda env: ["data.image_batch=0", "data.text_batch=0", "data.pair_batch=0"], ["nothing to load"]),
    (lambda env: ["data.image_batch=1000"], ["data.image_batch=1000 is larger than the"]),
    (lambda env: ["train.micro_batches=0"], ["micro_batches"]),
    (lambda env: [f"data.root={env / 'missing'}"], ["data.root", "missing"]),
    (lambda env: ["data.image_source=nope.index.jsonl"], ["data.image_source", "nope.index.jsonl"]),
    (lambda env: ["data.pair_source=shards/{00000..00009}.tar"], ["data.pair_source", "do not exist"]),
    (lambda env: ["data.text_sources=[images]"], ["data.text_sources[0]", "is not a file"]),
    (lambda env: [f"tokenizer.path={env / 'no_tok'}"], ["tokenizer.path", "no_tok"]),
    (lambda env: [f"tokenizer.path={env / 'data' / 'corpus.txt'}"], ["tokenizer.path", "corpus.txt"]),
    (lambda env: [f"tokenizer.text={_bad_spm(env)}"], ["tokenizer.text", "bad.spm"]),
    (lambda env: [f"train.deepspeed_config={env / 'ds.json'}"], ["deepspeed_config", "ds.json"]),
    (lambda env: [f"model.init_from={env / 'data' / 'corpus.txt'}"], ["model.init_from", "corpus.txt"]),
    (lambda env: ["model.overrides.no_such_field=1"], ["model"]),
]


@pytest.mark.parametrize("make_overrides, needles", CASES)
def test_pretrain_bad_input_is_a_one_line_error_exit_2(env, out, capsys, make_overrides, needles):
    assert pretrain(env, out, *make_overrides(env)) == 2
    assert_clean_error(capsys, out, *needles)


def test_pretrain_unwritable_output_dir(env, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert pretrain(env, blocker / "out") == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and f"output_dir '{blocker / 'out'}' is not writable" in err, err
    assert blocker.read_text() == "x"


def test_pretrain_too_little_disk_for_a_checkpoint(env, out, capsys, monkeypatch):
    usage = shutil.disk_usage(out)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    assert pretrain(env, out) == 2
    assert_clean_error(capsys, out, f"output_dir '{out}'", "not enough free disk space", "MiB needed")


@pytest.mark.parametrize("make_overrides, needles", [
    (lambda env: ["objective.nope=1"], ["unknown config key 'objective.nope'"]),
    (lambda env: ["data.image_batch=abc"], ["data.image_batch"]),
    (lambda env: ["data.image_batch=500"], ["data.image_batch=500 is larger than the"]),
    (lambda env: [f"data.root={env / 'missing'}"], ["data.root"]),
    (lambda env: ["data.image_source=nope.jsonl"], ["data.image_source", "nope.jsonl"]),
    (lambda env: ["train.precision=bf16"], ["train.precision"]),
])
def test_tokenizer_bad_input_is_a_one_line_error_exit_2(env, out, capsys, make_overrides, needles):
    assert tokenizer(env, out, *make_overrides(env)) == 2
    assert_clean_error(capsys, out, *needles)


def test_tokenizer_unwritable_output_and_too_little_disk(env, tmp_path, out, capsys, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    assert tokenizer(env, blocker / "out") == 2
    assert "output_dir" in capsys.readouterr().err
    usage = shutil.disk_usage(out)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=1000))
    assert tokenizer(env, out) == 2
    assert_clean_error(capsys, out, "not enough free disk space")


def test_pretrain_data_faults_are_counted_logged_and_stop_the_run_cleanly(env, tmp_path, capsys):
    import json

    data = tmp_path / "data"
    shutil.copytree(env / "data", data)
    items = [json.loads(line) for line in (data / "imagenet.train.index.jsonl").read_text().splitlines()]
    for i, item in enumerate(items):
        if i % 3 == 1:
            (data / item["image_path"]).write_bytes(b"\xff\xd8 truncated jpeg")
        elif i % 3 == 2:
            (data / item["image_path"]).unlink()
    out = tmp_path / "out"
    rc = run_pretraining.main([
        "--config", str(REPO / "configs/pretrain/demo.yaml"), "--set", f"data.root={data}",
        f"tokenizer.path={env / 'tok'}", f"output_dir={out}", *TINY, "train.steps=40", "train.save_every=1",
        "train.log_every=1", "data.max_skip_fraction=0.2", "data.skip_check_min_samples=30"])
    err = capsys.readouterr().err
    assert rc == 3, err[-2000:]
    line = [x for x in err.splitlines() if "training stopped at step" in x]  # once, naming files and the option
    assert len(line) == 1 and "data fault at step" in line[0] and "data.max_skip_fraction=0.2" in line[0], err[-2000:]
    assert ".jpg" in line[0] and [x for x in err.splitlines() if x.startswith("error:")] == [
        "error: training stopped (DataFaultError; the [beit3.engine] line above says why and names the last good "
        "checkpoint)"]
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert log and set(log[-1]["data_skips"]) == {"corrupt_image", "missing_file"}, log[-1]
    latest = (out / "checkpoints" / "latest").read_text()
    assert latest == f"step{log[-1]['step']:08d}" and latest in line[0]  # the last good checkpoint is named
    from beit3.engine.tag_files import checkpoint_problem

    assert checkpoint_problem(out / "checkpoints" / latest) is None


def test_a_finished_run_is_never_trained_over_or_broken_by_a_rerun(env, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain(env, out) == 0
    saved = (out / "config.yaml").read_text()
    tags = sorted(p.name for p in (out / "checkpoints").iterdir())
    capsys.readouterr()
    # a changed model could not load the checkpoints: refused before anything is written, naming the key
    assert pretrain(env, out, "model.overrides.depth=2", "train.steps=4") == 2
    err = capsys.readouterr().err
    assert "error: " in err and "model.overrides.depth: 1 -> 2" in err and "Traceback" not in err
    # auto_resume=false would train over the run: refused
    assert pretrain(env, out, "train.auto_resume=false") == 2
    assert "train.auto_resume is false" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == saved and sorted(p.name for p in (out / "checkpoints").iterdir()) == tags
    # the same model with more steps resumes
    assert pretrain(env, out, "train.steps=3") == 0
