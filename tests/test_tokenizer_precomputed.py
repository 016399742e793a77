"""tools/tokenize_dataset.py and the precomputed-codes format."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from helpers import shape_image

from tokenizer import VQKD, load_precomputed_codes, save_tokenizer, vqkd_config
from tokenizer.precomputed import eval_transform, list_images, read_jsonl_index, tokenize_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture()
def image_root(tmp_path):
    rng = np.random.default_rng(0)
    for i, name in enumerate(["a/x.jpg", "a/y.png", "b/z.jpg"]):
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        shape_image(rng, 40 + 8 * i).save(tmp_path / "images" / name)
    (tmp_path / "images" / "notes.txt").write_text("not an image")
    return tmp_path / "images"


def test_folder_to_codes_matches_direct_tokenization(tmp_path, image_root):
    tokenizer = VQKD(vqkd_config("vqkd_tiny")).eval()
    paths = list_images(image_root)
    assert paths == ["a/x.jpg", "a/y.png", "b/z.jpg"]
    out = tokenize_images(tokenizer, image_root, paths, tmp_path / "codes", batch_size=2)
    rows, codes = load_precomputed_codes(out)
    assert codes.dtype == np.uint16 and codes.shape == (3, 16)
    transform = eval_transform(32)
    for path, row in rows.items():
        image = transform(Image.open(image_root / path).convert("RGB"))[None]
        assert codes[row].tolist() == tokenizer.get_codebook_indices(image)[0].tolist()
    meta = json.loads((out / "codes_meta.json").read_text())
    assert meta["num_patches"] == 16 and meta["resize"] == 37


def test_cli_with_jsonl_index(tmp_path, image_root):
    save_tokenizer(VQKD(vqkd_config("vqkd_tiny")), tmp_path / "tok")
    index = tmp_path / "index.jsonl"
    lines = [{"image_path": "b/z.jpg", "text": "one"}, {"image_path": "a/x.jpg", "text": "two"},
             {"image_path": "b/z.jpg", "text": "three"}]
    index.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert read_jsonl_index(index) == ["b/z.jpg", "a/x.jpg"]
    subprocess.run([sys.executable, str(ROOT / "tools" / "tokenize_dataset.py"), "--tokenizer", str(tmp_path / "tok"),
                    "--index", str(index), "--root", str(image_root), "--out", str(tmp_path / "out"),
                    "--num-workers", "0"], check=True, cwd=ROOT, capture_output=True)
    rows, codes = load_precomputed_codes(tmp_path / "out")
    assert rows == {"b/z.jpg": 0, "a/x.jpg": 1} and codes.shape == (2, 16)


def test_bad_sources_are_named(tmp_path):
    (tmp_path / "bad.jsonl").write_text('{"text": "no image"}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl' entry 1: no string 'image_path'"):
        read_jsonl_index(tmp_path / "bad.jsonl")
    with pytest.raises(FileNotFoundError, match="codes.npy is missing"):
        load_precomputed_codes(tmp_path)
    with pytest.raises(ValueError, match="built for 32x32"):
        VQKD(vqkd_config("vqkd_tiny")).get_codebook_indices(torch.rand(1, 3, 37, 37))


@pytest.mark.parametrize("resize", [None, 40])
def test_stored_codes_view_is_the_view_the_codes_were_made_from(tmp_path, resize):
    """The pretraining reader of stored codes (beit3.data.codes) shows the model the crop tokenize_images coded."""
    from beit3.data.codes import PrecomputedCodes

    tokenizer = VQKD(vqkd_config("vqkd_tiny")).eval()
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (37, 61, 3), dtype=np.uint8))
    (tmp_path / "im").mkdir()
    image.save(tmp_path / "im" / "wide.png")
    out = tokenize_images(tokenizer, tmp_path / "im", ["wide.png"], tmp_path / "codes", resize=resize)
    reader = PrecomputedCodes(out, image_size=tokenizer.config.img_size)
    model_view, codes = reader(image, "wide.png")
    coded_view = eval_transform(tokenizer.config.img_size, resize)(image)
    assert model_view.dtype == torch.uint8 and torch.equal(model_view.float() / 255, coded_view)
    assert torch.equal(codes, tokenizer.get_codebook_indices(coded_view[None]).view(-1).long())
