"""How the training tools end: ``beit3.cli.startup.exit_code`` maps a finished run to 0, a configuration error to 2
and a stopped run or an unusable checkpoint to 3, each with one line on stderr."""
import pytest

from beit3.cli.startup import exit_code
from beit3.errors import CheckpointError, ConfigError, DataFaultError, NonFiniteLossError


def _raise(err):
    def work():
        raise err
    return work


@pytest.mark.parametrize("err,code", [(ConfigError("config key 'optim.lr' must be > 0"), 2),
                                      (CheckpointError("'x.pth' is not a checkpoint"), 3)])
def test_exit_codes_name_the_error_in_one_line(err, code, capsys):
    assert exit_code(_raise(err)) == code
    assert capsys.readouterr().err == f"error: {err}\n"


@pytest.mark.parametrize("err", [NonFiniteLossError("non-finite for 10 steps"), DataFaultError("data fault at step 7")])
def test_a_stopped_run_exits_3_without_repeating_the_engine_message(err, capsys):
    assert exit_code(_raise(err)) == 3
    said = capsys.readouterr().err
    assert said.startswith(f"error: training stopped ({type(err).__name__};") and str(err) not in said


def test_a_finished_run_exits_0_and_other_errors_propagate():
    assert exit_code(lambda: None) == 0
    with pytest.raises(KeyError):
        exit_code(_raise(KeyError("a bug, not a user error")))


@pytest.mark.parametrize("args,named", [(["--num-images", "10"], "num_images must be at least 20"),
                                        (["--photos", "--num-images", "3"], "num_images")])
def test_make_demo_data_bad_sizes_are_one_error_line_and_write_nothing(tmp_path, capsys, args, named):
    from beit3.cli.commands import make_demo_data_main

    assert make_demo_data_main(["--out", str(tmp_path / "out"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and named in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_make_demo_data_out_must_not_be_a_file(tmp_path, capsys):
    from beit3.cli.commands import make_demo_data_main

    (tmp_path / "afile").write_text("keep me")
    with pytest.raises(SystemExit) as stop:
        make_demo_data_main(["--out", str(tmp_path / "afile")])
    assert stop.value.code == 2
    assert "is an existing file; this tool writes a folder" in capsys.readouterr().err
    assert (tmp_path / "afile").read_text() == "keep me"


def test_out_is_a_file_or_a_folder_and_each_tool_says_which(tmp_path, capsys):
    """--out names a folder for the tools that write folders and a file for those that write one file; the wrong
    kind is refused before anything runs, with '~' expanded either way."""
    from beit3.cli.commands import export_checkpoint_main, out_file, out_folder
    from beit3.cli.finetune import evaluate_main
    from beit3.cli.use import extract_features_main

    (tmp_path / "afile").write_text("keep me")
    for main, args, said in [(evaluate_main, ["--checkpoint", "x", "--out", str(tmp_path)], "is a folder; this tool writes one file"),
                             (extract_features_main, ["--checkpoint", "x", "--texts", "t", "--out", str(tmp_path)],
                              "is a folder; this tool writes one file"),
                             (export_checkpoint_main, ["--run", "x", "--out", str(tmp_path / "afile")],
                              "is an existing file; this tool writes a folder")]:
        with pytest.raises(SystemExit) as stop:
            main(args)
        assert stop.value.code == 2 and said in capsys.readouterr().err, main.__name__
    assert (tmp_path / "afile").read_text() == "keep me"
    import os
    assert out_file("~/m.json") == os.path.expanduser("~/m.json") and out_folder("~/d") == os.path.expanduser("~/d")


def test_ctrl_c_is_exit_130_without_a_traceback(capsys):
    assert exit_code(_raise(KeyboardInterrupt())) == 130
    assert capsys.readouterr().err == "error: interrupted\n"


def test_a_bad_set_value_is_blamed_on_the_set_not_the_yaml(tmp_path):
    from beit3.cli.finetune import FinetuneConfig
    from beit3.config import load_config
    config = tmp_path / "ft.yaml"
    config.write_text("task: vqav2\ntrain:\n  steps: 5\n")
    with pytest.raises(ConfigError, match=r"^--set train.progress=maybe: config key 'train.progress'"):
        load_config(FinetuneConfig, config, ["data.root=x", "train.progress=maybe"])
    assert load_config(FinetuneConfig, config, ["train.progress=on"]).train.progress == "on"  # YAML's boolean on
    config.write_text("task: vqav2\ntrain:\n  steps: 0\n")
    with pytest.raises(ConfigError, match=f"^{config}: "):
        load_config(FinetuneConfig, config, ["data.root=x"])


def test_every_make_demo_data_option_has_help(capsys):
    from beit3.cli.commands import make_demo_data_main
    with pytest.raises(SystemExit):
        make_demo_data_main(["--help"])
    text = capsys.readouterr().out
    import re
    for option in re.findall(r"^  (--[a-z-]+)", text, flags=re.M):
        described = re.search(rf"^  {option}\b[^\n]*?(\S+ {{2,}}\S|\n {{10,}}\S)", text, flags=re.M)
        assert described, f"{option} has no help"


def test_data_root_defaults_agree_across_tools():
    from beit3.cli.finetune import FinetuneDataConfig
    from beit3.data.pretrain import PretrainDataConfig
    assert FinetuneDataConfig().root == PretrainDataConfig().root == "runs/demo/data"
