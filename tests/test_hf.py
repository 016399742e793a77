"""transformers integration: AutoConfig / AutoModel / AutoModelFor... read beit3 folders, the wrappers save what
beit3.from_pretrained reads, and a hub id resolves through a local hub cache with HF_HUB_OFFLINE=1."""
import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import (AutoConfig, AutoModel, AutoModelForImageClassification, AutoModelForImageTextToText,
                          AutoModelForPreTraining, AutoModelForVisualQuestionAnswering,
                          AutoModelForZeroShotImageClassification)

import beit3
from beit3.hf import BEiT3HFConfig, BEiT3HFForVisualReasoning
from beit3.models import BEiT3ForPretraining, model_config

from helpers import tool_env

AUTO = [
    (AutoModel, "beit3_tiny_patch8_32", {}),
    (AutoModelForImageClassification, "beit3_tiny_patch8_32_imageclassification", {"num_classes": 3}),
    (AutoModelForVisualQuestionAnswering, "beit3_tiny_patch8_32_vqav2", {"num_classes": 5}),
    (AutoModelForZeroShotImageClassification, "beit3_tiny_patch8_32_retrieval", {}),
    (AutoModelForImageTextToText, "beit3_tiny_patch8_32_captioning", {}),
]


def _states_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("auto,name,kwargs", AUTO, ids=[a[1] for a in AUTO])
def test_auto_classes_load_a_saved_folder_exactly(auto, name, kwargs, tmp_path):
    torch.manual_seed(0)
    model = beit3.create_model(name, **kwargs).eval()
    beit3.save_pretrained(model, tmp_path / "m")
    config = AutoConfig.from_pretrained(tmp_path / "m")
    assert isinstance(config, BEiT3HFConfig) and config.model_class == type(model).__name__
    loaded = auto.from_pretrained(tmp_path / "m")
    assert type(loaded.wrapped) is type(model) and _states_equal(loaded, model)
    # the wrapper saves a folder beit3 reads back
    loaded.save_pretrained(tmp_path / "again")
    assert _states_equal(beit3.from_pretrained(tmp_path / "again"), model)


def test_nlvr2_and_pretraining_wrappers(tmp_path):
    model = beit3.create_model("beit3_tiny_patch8_32_nlvr2").eval()
    beit3.save_pretrained(model, tmp_path / "nlvr2")
    assert _states_equal(BEiT3HFForVisualReasoning.from_pretrained(tmp_path / "nlvr2"), model)
    pre = BEiT3ForPretraining(model_config("beit3_tiny_patch8_32"), codebook_size=16, contrastive=True)
    beit3.save_pretrained(pre, tmp_path / "pre")
    assert _states_equal(AutoModelForPreTraining.from_pretrained(tmp_path / "pre"), pre)


def test_automodel_takes_the_backbone_out_of_a_task_folder(tmp_path):
    task = beit3.create_model("beit3_tiny_patch8_32_retrieval").eval()
    beit3.save_pretrained(task, tmp_path / "ret")
    backbone = AutoModel.from_pretrained(tmp_path / "ret")
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(backbone(visual_tokens=image)["encoder_out"], task.beit3(visual_tokens=image)["encoder_out"])
    # a task model out of a backbone-only folder: heads are new, the backbone is the saved one
    cls = AutoModelForImageClassification.from_pretrained(tmp_path / "ret", num_classes=4)
    assert cls.wrapped.head.out_features == 4
    assert torch.equal(cls.beit3.encoder.layers[0].ffn.A.fc1.weight, task.beit3.encoder.layers[0].ffn.A.fc1.weight)
    with pytest.raises(TypeError, match="unknown argument"):
        AutoModelForImageClassification.from_pretrained(tmp_path / "ret", num_clases=4)


def test_folder_is_push_ready_and_readable_by_others(tmp_path):
    old = os.umask(0o022)
    try:
        beit3.save_pretrained(beit3.create_model("beit3_tiny_patch8_32"), tmp_path / "m")
    finally:
        os.umask(old)
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert (tmp_path / "m" / "model.safetensors").stat().st_mode & 0o777 == 0o644  # safetensors alone writes 0600
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    assert meta["model_type"] == "beit3" and meta["architectures"] == ["BEiT3"]
    assert (tmp_path / "m" / "README.md").read_text().startswith("---\nlibrary_name: beit3")


def test_folders_written_before_beit3_config_still_load(tmp_path):
    model = beit3.create_model("beit3_tiny_patch8_32")
    beit3.save_pretrained(model, tmp_path / "m")
    meta = json.loads((tmp_path / "m" / "config.json").read_text())
    old = {"model_class": meta["model_class"], "config": meta["beit3_config"], "init_kwargs": {}}
    (tmp_path / "m" / "config.json").write_text(json.dumps(old))
    assert _states_equal(beit3.from_pretrained(tmp_path / "m"), model)


def _hub_cache(tmp_path, folder, repo="beit3-org/tiny-retrieval"):
    """The layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<commit>/<files>}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo_dir = tmp_path / "hub" / ("models--" + repo.replace("/", "--"))
    snapshot = repo_dir / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (repo_dir / "refs").mkdir()
    (repo_dir / "refs" / "main").write_text(commit)
    for f in folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    return tmp_path / "hub"


def test_hub_id_resolves_through_the_offline_cache(tmp_path):
    torch.manual_seed(1)
    model = beit3.create_model("beit3_tiny_patch8_32_retrieval").eval()
    beit3.save_pretrained(model, tmp_path / "m")
    cache = _hub_cache(tmp_path, tmp_path / "m")
    image = torch.randn(2, 3, 32, 32)
    torch.save(image, tmp_path / "image.pt")
    with torch.no_grad():
        torch.save(model.encode_image(image), tmp_path / "want.pt")
    code = (
        "import sys, torch, beit3, transformers\n"
        "d = sys.argv[1]\n"
        "a = transformers.AutoModelForZeroShotImageClassification.from_pretrained('beit3-org/tiny-retrieval')\n"
        "b = beit3.from_pretrained('beit3-org/tiny-retrieval').eval()\n"
        "image = torch.load(d + '/image.pt')\n"
        "with torch.no_grad():\n"
        "    assert torch.equal(a.eval().encode_image(image), torch.load(d + '/want.pt'))\n"
        "    assert torch.equal(b.encode_image(image), torch.load(d + '/want.pt'))\n"
        "try:\n"
        "    beit3.from_pretrained('beit3-org/not-cached')\n"
        "except beit3.CheckpointError as err:\n"
        "    print('refused:', err)\n"
    )
    env = tool_env(HF_HUB_OFFLINE="1", HF_HUB_CACHE=str(cache), HF_HOME=str(tmp_path / "hf_home"))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "refused: 'beit3-org/not-cached' is neither a local folder nor in the Hugging Face cache" in done.stdout


def test_a_fresh_process_loads_a_pretraining_export_by_importing_beit3_alone(tmp_path):
    pre = BEiT3ForPretraining(model_config("beit3_tiny_patch8_32"), codebook_size=16)
    beit3.save_pretrained(pre, tmp_path / "export")
    code = "import sys, beit3; print(type(beit3.from_pretrained(sys.argv[1])).__name__)"
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "export")], env=tool_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "BEiT3ForPretraining", done.stderr[-2000:]
