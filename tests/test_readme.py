"""Every Python snippet of the README, and the shell commands of its "Use a trained checkpoint" section, run as
written: in a folder laid out like the demo's output (runs/demo/...), holding tiny models."""
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import beit3
from beit3.text import TextTokenizer
from tokenizer import VQKD, save_tokenizer, vqkd_config

from helpers import tool_env

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def _blocks(language: str, text: str = README) -> list[str]:
    return re.findall(rf"```{language}\n(.*?)```", text, flags=re.S)


def _section(title: str) -> str:
    start = README.index(f"## {title}\n")
    return README[start : README.index("\n## ", start + 1)]


@pytest.fixture(scope="module")
def demo_layout(demo_root, tmp_path_factory):
    """runs/demo/{data, tokenizer, ft/retrieval_pretrained_seed0/best} with tiny models."""
    cwd = tmp_path_factory.mktemp("readme")
    demo = cwd / "runs" / "demo"
    demo.mkdir(parents=True)
    (demo / "data").symlink_to(demo_root, target_is_directory=True)
    tok = TextTokenizer.from_file(demo_root / "beit3.spm")
    torch.manual_seed(0)
    vocab = tok.mask_id + 1
    retrieval = beit3.create_model("beit3_tiny_patch8_32_retrieval", vocab_size=vocab)
    beit3.save_pretrained(retrieval, demo / "ft" / "retrieval_pretrained_seed0" / "best", text_tokenizer=demo_root / "beit3.spm")
    save_tokenizer(VQKD(vqkd_config("vqkd_tiny")), demo / "tokenizer" / "tokenizer")
    return cwd


def test_the_readme_has_the_snippets_this_test_runs():
    assert len(_blocks("python")) >= 4
    assert "create_model_and_transforms" in _blocks("python", _section("Use a trained checkpoint"))[0]


@pytest.mark.parametrize("number", range(len(_blocks("python"))))
def test_python_snippet_runs_as_written(number, demo_layout):
    code = _blocks("python")[number]
    done = subprocess.run([sys.executable, "-c", code], cwd=demo_layout, env=tool_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"README snippet {number}:\n{code}\n{done.stderr[-3000:]}"


def test_use_a_checkpoint_commands_run_as_written(demo_layout):
    for block in _blocks("bash", _section("Use a trained checkpoint")):
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block.replace("python tools/", f"{sys.executable} {REPO}/tools/")],
                              cwd=demo_layout, env=tool_env(), capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{block}\n{done.stderr[-3000:]}"
    assert (demo_layout / "runs/demo/feats.safetensors").is_file()
    assert (demo_layout / "runs/demo/onnx/text_encoder.onnx").is_file()
