"""Property-based tests (hypothesis): random and corrupted bytes into every reader, random values into the config
loader. The only exceptions allowed are the documented ones:

- ``SkipSample`` (a sample-level reader: the mixer replaces and counts it),
- ``ConfigError`` (configs; message names the key or file),
- ``CheckpointError`` (BEiT-3 / VQ-KD / engine checkpoints, incl. ``CheckpointLayoutError``; message names the file),
- ``ValueError`` whose message names the file (index files, shards, SentencePiece models).
Anything else (UnicodeDecodeError, KeyError, struct.error, a PIL or protobuf internal error, a crash) fails.
"""
import io
import json
import tarfile
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from beit3.config import ConfigError, from_dict, load_config, parse_overrides
from beit3.data.readers import SkipSample, TarShardIndex, TextLines, decode_image
from beit3.jsonl import read_jsonl
from beit3.engine.tag_files import load_rank_state
from beit3.engine.safe_load import safe_torch_load
from beit3.errors import CheckpointError
from beit3.models.checkpoint import read_state_dict
from beit3.cli.pretrain import PretrainConfig
from beit3.text import TextTokenizer
from tokenizer import load_tokenizer

FUZZ = settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])


def _png(size=8):
    buf = io.BytesIO()
    Image.new("RGB", (size, size), (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(size=16):
    buf = io.BytesIO()
    Image.effect_noise((size, size), 40).convert("RGB").save(buf, format="JPEG")
    return buf.getvalue()


@st.composite
def corrupted(draw, original: bytes):
    """``original`` truncated, with random bytes overwritten, or with a random chunk inserted."""
    data = bytearray(original)
    kind = draw(st.sampled_from(["truncate", "flip", "insert"]))
    if kind == "truncate":
        return bytes(data[: draw(st.integers(0, len(data)))])
    if kind == "flip":
        for _ in range(draw(st.integers(1, 8))):
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
        return bytes(data)
    pos = draw(st.integers(0, len(data)))
    return bytes(data[:pos]) + draw(st.binary(min_size=1, max_size=64)) + bytes(data[pos:])


def names_file(err: Exception, path) -> bool:
    return str(path) in str(err) or Path(path).name in str(err)


def write(tmp_path_factory, name: str, data: bytes) -> Path:
    path = tmp_path_factory.mktemp("fuzz") / name
    path.write_bytes(data)
    return path


# ------------------------------------------------------------------------------------------------------ images
@FUZZ
@given(data=st.one_of(st.binary(max_size=256), corrupted(_png()), corrupted(_jpeg())))
def test_image_decode_returns_rgb_or_skips(data):
    try:
        image = decode_image(data, "sample.jpg")
    except SkipSample as err:
        assert err.reason == "corrupt_image" and "sample.jpg" in str(err)
        return
    assert image.mode == "RGB"


# -------------------------------------------------------------------------------------------------- JSONL index
GOOD_JSONL = b'{"image_path": "a.jpg", "text_segment": [5, 6]}\n{"image_path": "b.jpg", "label": 3}\n'


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), corrupted(GOOD_JSONL)))
def test_jsonl_index_reads_objects_or_names_the_file(tmp_path_factory, data):
    path = write(tmp_path_factory, "index.jsonl", data)
    try:
        items = read_jsonl(path)
    except ValueError as err:
        assert names_file(err, path), err
        return
    assert all(isinstance(item, dict) for item in items)


# --------------------------------------------------------------------------------------------------- text files
@FUZZ
@given(data=st.binary(max_size=300))
def test_text_lines_return_text_or_skip(tmp_path_factory, data):
    path = write(tmp_path_factory, "corpus.txt", data)
    lines = TextLines([path])
    for i in range(len(lines)):
        try:
            assert isinstance(lines[i], str) and lines[i]
        except SkipSample as err:
            assert err.reason in ("empty_text", "overlong_text")


# --------------------------------------------------------------------------------------------------- tar shards
def _shard(n=3) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for i in range(n):
            for ext, payload in (("jpg", _png()), ("txt", f"caption {i}".encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


SHARD = _shard()


@FUZZ
@given(data=st.one_of(st.binary(max_size=600), corrupted(SHARD)))
def test_tar_shards_index_what_is_readable_and_samples_decode_or_skip(tmp_path_factory, data):
    path = write(tmp_path_factory, "00000.tar", data)
    try:
        index = TarShardIndex([path])
    except ValueError as err:
        assert names_file(err, path), err
        return
    for i in range(len(index)):
        try:
            sample = index[i]
            decode_image(sample["jpg"], index.describe(i))
            sample["txt"].decode("utf-8", "replace")
        except SkipSample as err:
            assert err.reason in ("corrupt_image", "truncated_sample", "broken_shard")


def test_truncated_shard_keeps_the_samples_before_the_break(tmp_path):
    path = tmp_path / "00000.tar"
    path.write_bytes(SHARD[: len(SHARD) // 2])
    index = TarShardIndex([path])
    assert 0 < len(index) < 3
    for i in range(len(index)):
        decode_image(index[i]["jpg"], index.describe(i))


# ------------------------------------------------------------------------------------------ SentencePiece models
@pytest.fixture(scope="module")
def spm_path(tmp_path_factory):
    from beit3.demo.data import make_demo_data

    root = tmp_path_factory.mktemp("spm")
    make_demo_data(root, num_images=20, image_size=16, seed=0, num_shards=1)
    return root / "beit3.spm"


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_sentencepiece_model_loads_or_names_the_file(tmp_path_factory, spm_path, data):
    raw = data.draw(st.one_of(st.binary(max_size=200), corrupted(spm_path.read_bytes())))
    path = write(tmp_path_factory, "beit3.spm", raw)
    try:
        tok = TextTokenizer.from_file(path)
    except ValueError as err:
        assert names_file(err, path), err
        return
    ids = tok.encode("a short sentence")
    assert all(isinstance(i, int) for i in ids)


# -------------------------------------------------------------------------------------------- checkpoint readers
def _torch_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


STATE = _torch_bytes({"model": {"beit3.encoder.layers.0.ffn.fc1.weight": torch.ones(2, 2)}})
RANK_STATE = _torch_bytes({"step": 3, "rank": 0, "world_size": 1, "data": {"next_step": 3}, "rng": {}})


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), corrupted(STATE)), suffix=st.sampled_from([".pth", ".safetensors"]))
def test_beit3_checkpoint_reader_returns_tensors_or_checkpoint_error(tmp_path_factory, data, suffix):
    path = write(tmp_path_factory, "model" + suffix, data)
    try:
        state = read_state_dict(path)
    except CheckpointError as err:
        assert names_file(err, path), err
        return
    assert all(isinstance(v, torch.Tensor) for v in state.values())


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), corrupted(STATE)))
def test_vqkd_checkpoint_reader_loads_or_checkpoint_error(tmp_path_factory, data):
    path = write(tmp_path_factory, "vqkd.pth", data)
    with pytest.raises(CheckpointError) as info:  # never a complete tokenizer: always the documented error
        load_tokenizer(path)
    assert names_file(info.value, path) or "VQ-KD" in str(info.value)


@FUZZ
@given(config=st.one_of(st.binary(max_size=100), st.just(b'{"model_type": "vqkd"}'),
                        st.just(b'{"model_type": "vqkd", "width": "x"}')),
       weights=st.binary(max_size=100))
def test_vqkd_directory_with_corrupt_files_is_a_checkpoint_error(tmp_path_factory, config, weights):
    root = tmp_path_factory.mktemp("vqkd_dir")
    (root / "config.json").write_bytes(config)
    (root / "model.safetensors").write_bytes(weights)
    with pytest.raises(CheckpointError) as info:
        load_tokenizer(root)
    assert str(root) in str(info.value)


@FUZZ
@given(data=st.one_of(st.binary(max_size=300), corrupted(RANK_STATE), corrupted(STATE)))
def test_engine_checkpoint_files_load_or_checkpoint_error(tmp_path_factory, data):
    path = write(tmp_path_factory, "rank0_state.pt", data)
    for load in (lambda: safe_torch_load(path, map_location="cpu"), lambda: load_rank_state(path.parent, 0)):
        try:
            load()
        except CheckpointError as err:
            assert names_file(err, path), err


# ------------------------------------------------------------------------------------------------ config loader
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.floats(allow_nan=True),
                    st.text(max_size=12), st.lists(st.integers(-5, 5), max_size=3))
KEYS = ["output_dir", "model", "tokenizer", "data", "train", "optim", "objective", "steps", "lr", "root",
        "image_batch", "name", "overrides", "zero_stage", "precision", "betas", "text_sources", "bogus"]
trees = st.recursive(scalars, lambda children: st.dictionaries(st.sampled_from(KEYS), children, max_size=4),
                     max_leaves=12)


@settings(max_examples=150, deadline=None)
@given(tree=st.dictionaries(st.sampled_from(KEYS), trees, max_size=5))
def test_config_from_random_values_builds_or_config_error(tree):
    try:
        cfg = from_dict(PretrainConfig, tree)
    except ConfigError:
        return
    assert isinstance(cfg, PretrainConfig)


@settings(max_examples=150, deadline=None)
@given(items=st.lists(st.text(max_size=30), max_size=4))
def test_overrides_parse_or_config_error(items):
    try:
        parse_overrides(items)
    except ConfigError:
        pass


@FUZZ
@given(data=st.one_of(st.binary(max_size=200), st.text(max_size=200).map(str.encode)))
def test_config_file_loads_or_config_error_naming_it(tmp_path_factory, data):
    path = write(tmp_path_factory, "cfg.yaml", data)
    try:
        load_config(PretrainConfig, path)
    except ConfigError as err:
        assert names_file(err, path), err


def test_documented_error_types():
    from tokenizer import CheckpointLayoutError

    assert issubclass(CheckpointLayoutError, CheckpointError) and issubclass(CheckpointError, ValueError)
    assert issubclass(ConfigError, ValueError)
    json.dumps({"ok": True})
