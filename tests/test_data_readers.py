"""Readers and transforms: JSONL, image folders, text lines, tar shards, WebDataset streams, two-view transform."""
import io
import itertools
import random
import tarfile

import pytest
import torch
from PIL import Image

from beit3.data.readers import (SkipSample, TarShardIndex, TextLines, expand_shards, list_image_folder, load_image,
                                webdataset_stream)
from beit3.jsonl import read_jsonl
from beit3.data.transforms import TwoViewTransform, build_finetune_transform, sample_crop_box


def _jpeg(colour, size=20):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="JPEG")
    return buf.getvalue()


def _write_shard(path, keys):
    with tarfile.open(path, "w") as tar:
        for key in keys:
            for ext, data in (("jpg", _jpeg((int(key) % 256, 0, 0))), ("txt", f"caption {key}".encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_read_jsonl_names_file_and_line(tmp_path):
    path = tmp_path / "x.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n')
    assert read_jsonl(path) == [{"a": 1}, {"a": 2}]
    path.write_text('{"a": 1}\n{oops\n')
    with pytest.raises(ValueError, match=r"x.jsonl' line 2"):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")


def test_image_folder_and_load_image(tmp_path):
    for cls, n in (("b_dog", 2), ("a_cat", 1)):
        (tmp_path / cls).mkdir()
        for i in range(n):
            (tmp_path / cls / f"{i}.jpg").write_bytes(_jpeg((10, 20, 30)))
    (tmp_path / "a_cat" / "notes.txt").write_text("not an image")
    samples, classes = list_image_folder(tmp_path)
    assert classes == ["a_cat", "b_dog"] and [s[1] for s in samples] == [0, 1, 1]
    assert load_image(tmp_path / samples[0][0]).size == (20, 20)
    (tmp_path / "bad.jpg").write_bytes(b"garbage")
    with pytest.raises(SkipSample) as err:
        load_image(tmp_path / "bad.jpg")
    assert err.value.reason == "corrupt_image"
    with pytest.raises(SkipSample) as err:
        load_image(tmp_path / "missing.jpg")
    assert err.value.reason == "missing_file"


def test_text_lines_random_access_and_blank_lines_separate_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\n   \nfourth line\n")
    (tmp_path / "b.txt").write_text("b one\nb two")  # no final newline
    lines = TextLines([tmp_path / "a.txt", tmp_path / "b.txt"])
    assert len(lines) == 4  # blank and whitespace-only lines are not lines to sample
    assert [lines[i] for i in range(4)] == ["first line", "fourth line", "b one", "b two"]
    (tmp_path / "a.txt").write_text("first line\n\n   \n           \n")  # changed after indexing
    with pytest.raises(SkipSample, match="a.txt line 4"):
        lines[1]
    with pytest.raises(IndexError):
        lines[4]


def test_a_flat_folder_of_unlabeled_images_is_an_image_source(tmp_path):
    from beit3.data.sources import open_image_source

    for name in ("x.jpg", "deeper/y.png", "notes.txt"):
        (tmp_path / "flat" / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".txt"):
            (tmp_path / "flat" / name).write_text("not an image")
        else:
            Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "flat" / name)
    source = open_image_source("flat", tmp_path)
    assert len(source) == 2 and source.load(1)["image_path"] == "x.jpg" and source.load(0)["image"].size == (8, 8)


def test_tar_shard_index_and_expand(tmp_path):
    (tmp_path / "shards").mkdir()
    _write_shard(tmp_path / "shards/00000.tar", ["000000000", "000000001"])
    _write_shard(tmp_path / "shards/00001.tar", ["000010000"])
    assert [p.name for p in expand_shards("shards/{00000..00001}.tar", tmp_path)] == ["00000.tar", "00001.tar"]
    assert len(expand_shards("shards", tmp_path)) == 2 and len(expand_shards("shards/*.tar", tmp_path)) == 2
    with pytest.raises(FileNotFoundError, match="00002.tar"):
        expand_shards("shards/{00000..00002}.tar", tmp_path)
    index = TarShardIndex(expand_shards("shards", tmp_path))
    assert len(index) == 3
    sample = index[2]
    assert sample["__key__"] == "000010000" and sample["txt"] == b"caption 000010000"
    assert Image.open(io.BytesIO(sample["jpg"])).size == (20, 20)


def test_webdataset_stream_split_and_resampled(tmp_path):
    shards = []
    for s in range(4):
        shards.append(tmp_path / f"{s:05d}.tar")
        _write_shard(shards[-1], [f"{s:05d}{k:04d}" for k in range(3)])
    keys = [sorted(x["__key__"] for x in webdataset_stream(shards, rank=r, world_size=2, resampled=False)) for r in (0, 1)]
    assert len(keys[0]) == len(keys[1]) == 6 and not set(keys[0]) & set(keys[1])
    take = lambda rank, seed: [x["__key__"] for x in itertools.islice(iter(webdataset_stream(shards, rank, 2, seed)), 20)]
    assert take(0, 1) == take(0, 1)  # seeded: reproducible, so resume = skip consumed samples
    assert take(0, 1) != take(1, 1)
    with pytest.raises(ValueError, match="resampled"):
        webdataset_stream(shards[:1], rank=0, world_size=2, resampled=False)


def test_two_view_transform_shares_geometry_and_ranges():
    gradient = torch.linspace(0, 1, 48)
    pixels = torch.stack([gradient[None, :].expand(48, 48), gradient[:, None].expand(48, 48), torch.rand(48, 48)])
    image = Image.fromarray((pixels.permute(1, 2, 0).numpy() * 255).astype("uint8"))
    transform = TwoViewTransform(24, 24, min_crop_scale=0.3, color_jitter_strength=0.4)
    model_view, tok_view = transform(image, random.Random(0))
    assert model_view.shape == tok_view.shape == (3, 24, 24)
    assert 0 <= tok_view.min() and tok_view.max() <= 1
    assert torch.allclose(model_view * 0.5 + 0.5, tok_view, atol=1e-6)  # same crop, flip and jitter
    again = transform(image, random.Random(0))
    assert torch.equal(again[0], model_view) and not torch.equal(transform(image, random.Random(1))[0], model_view)
    small = TwoViewTransform(24, 12, color_jitter_strength=0.0)(image, random.Random(0))[1]
    assert small.shape == (3, 12, 12)



def test_two_view_transform_equals_the_two_separate_crops_it_replaced():
    """Equal view sizes compute the crop once: bit-identical to resizing the same crop twice (the old path)."""
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms import functional as TF
    from beit3.data.transforms import color_jitter

    image = Image.fromarray((torch.rand(50, 70, 3).numpy() * 255).astype("uint8"))
    transform = TwoViewTransform(32, 32, min_crop_scale=0.2, color_jitter_strength=0.4)
    for seed in range(5):
        rng = random.Random(seed)
        jittered = color_jitter(image, 0.4, rng)
        if rng.random() < 0.5:
            jittered = TF.hflip(jittered)
        top, left, h, w = sample_crop_box(jittered.width, jittered.height, rng, (0.2, 1.0))
        crops = [TF.to_tensor(TF.resized_crop(jittered, top, left, h, w, [32, 32], InterpolationMode.BICUBIC))
                 for _ in range(2)]
        model_view, tok_view = transform(image, random.Random(seed))
        assert torch.equal(tok_view, crops[1]) and torch.equal(model_view, transform.normalize(crops[0]))

def test_crop_box_and_finetune_transforms():
    rng = random.Random(0)
    for _ in range(50):
        top, left, h, w = sample_crop_box(40, 30, rng, (0.2, 1.0))
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 40 and h * w >= 0.2 * 40 * 30 * 0.7
    image = Image.new("RGB", (50, 40), (200, 10, 10))
    for train, randaug in ((True, True), (True, False), (False, False)):
        out = build_finetune_transform(32, train, randaug)(image)
        assert out.shape == (3, 32, 32) and out.min() >= -1 and out.max() <= 1
