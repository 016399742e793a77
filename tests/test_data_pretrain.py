"""PretrainBatches: shapes, determinism, identical schedule across ranks, exact resume, skip-and-count."""
import itertools
import json

import pytest
import torch

from beit3.config import ConfigError, from_dict
from beit3.data.pretrain import PretrainDataConfig, build_pretrain_batches
from beit3.text import TextTokenizer


def _cfg(root, **kw):
    base = dict(root=str(root), image_batch=3, text_batch=2, pair_batch=2, image_size=16, tokenizer_image_size=8,
                max_text_len=12, num_workers=0)
    base.update(kw)
    return PretrainDataConfig(**base)


def _take(batches, n):
    return list(itertools.islice(iter(batches), n))


def _flat(batch):
    return {f"{s}.{k}": v for s, d in batch.items() for k, v in d.items()}


def _same(a, b):
    fa, fb = _flat(a), _flat(b)
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.fixture(scope="module")
def tok(demo_root):
    return TextTokenizer.from_file(demo_root / "beit3.spm")


@pytest.mark.parametrize("pair_source", ["coco_retrieval.train.jsonl", "shards"])
def test_batch_contract(demo_root, tok, pair_source):
    batch = _take(build_pretrain_batches(_cfg(demo_root, pair_source=pair_source), tok), 1)[0]
    assert batch["image"]["image"].shape == (3, 3, 16, 16) and batch["image"]["tokenizer_image"].shape == (3, 3, 8, 8)
    for stream in ("image", "pair"):  # uint8 out of the loader; floats are made on the device (model_input)
        assert batch[stream]["image"].dtype == batch[stream]["tokenizer_image"].dtype == torch.uint8
    same_cfg = _cfg(demo_root, pair_source=pair_source, tokenizer_image_size=16)
    same_size = _take(build_pretrain_batches(same_cfg, tok), 1)[0]
    assert "tokenizer_image" not in same_size["pair"]  # one view serves model and tokenizer
    assert torch.equal(same_size["pair"]["image"], batch["pair"]["image"])
    for stream in ("text", "pair"):
        tokens, pad = batch[stream]["text_tokens"], batch[stream]["padding_mask"]
        assert tokens.shape == pad.shape == (2, 12) and tokens.dtype == torch.long and pad.dtype == torch.bool
        assert (tokens[:, 0] == tok.bos_id).all() and torch.equal(pad, tokens == tok.pad_id)


def test_zero_batch_streams_are_omitted_and_config_validates(demo_root, tok):
    batch = _take(build_pretrain_batches(_cfg(demo_root, image_batch=0, pair_batch=0), tok), 1)[0]
    assert set(batch) == {"text"}
    cfg = from_dict(PretrainDataConfig, {"root": str(demo_root), "text_sources": "corpus.txt", "pair_batch": 4})
    assert cfg.text_sources == ["corpus.txt"] and cfg.pair_batch == 4
    with pytest.raises(ConfigError, match="image_batch"):
        from_dict(PretrainDataConfig, {"image_batch": -1})
    with pytest.raises(ConfigError, match="pair_sorce"):
        from_dict(PretrainDataConfig, {"pair_sorce": "x"})


def test_deterministic_and_ranks_share_schedule(demo_root, tok):
    run1 = _take(build_pretrain_batches(_cfg(demo_root), tok, rank=0, world_size=2, seed=7), 3)
    run2 = _take(build_pretrain_batches(_cfg(demo_root), tok, rank=0, world_size=2, seed=7), 3)
    other = _take(build_pretrain_batches(_cfg(demo_root), tok, rank=1, world_size=2, seed=7), 3)
    reseeded = _take(build_pretrain_batches(_cfg(demo_root), tok, rank=0, world_size=2, seed=8), 3)
    assert all(_same(a, b) for a, b in zip(run1, run2))
    for a, b in zip(run1, other):  # same streams and shapes on every rank, different samples
        assert {k: v.shape for k, v in _flat(a).items()} == {k: v.shape for k, v in _flat(b).items()}
        assert not torch.equal(a["image"]["image"], b["image"]["image"])
    assert not _same(run1[0], reseeded[0])


def test_an_epoch_draws_each_sample_once_across_ranks(demo_root, tok):
    unique = sorted(set((demo_root / "corpus.txt").read_text().splitlines()))
    (demo_root / "unique.txt").write_text("\n".join(unique) + "\n")
    cfg = _cfg(demo_root, image_batch=0, pair_batch=0, text_batch=5, max_text_len=64, text_sources=["unique.txt"])
    steps = len(unique) // 10  # two ranks x 5 samples per step
    seen = []
    for rank in range(2):
        for batch in _take(build_pretrain_batches(cfg, tok, rank=rank, world_size=2), steps):
            seen += [tuple(row[1:row.tolist().index(tok.eos_id)].tolist()) for row in batch["text"]["text_tokens"]]
    encoded = {tuple(tok.encode(line)) for line in unique}
    assert len(seen) == steps * 10 and set(seen) <= encoded
    assert len(set(seen)) == len(seen), "a sample repeated within one epoch"


@pytest.mark.parametrize("before, after", [(2, 1), (1, 2), (2, 3)])
def test_another_world_size_continues_the_global_order(demo_root, tok, before, after):
    """Saved on ``before`` ranks after 2 data steps, resumed on ``after``: the samples read before and after are one
    epoch's, none repeated or skipped, and the skip counts carry over to rank 0."""
    unique = sorted(set((demo_root / "corpus.txt").read_text().splitlines()))
    (demo_root / "unique.txt").write_text("\n".join(unique) + "\n")
    cfg = _cfg(demo_root, image_batch=0, pair_batch=0, text_batch=2, max_text_len=64, text_sources=["unique.txt"],
               max_skip_fraction=0.9)

    def texts(batch):
        return [tuple(row[1:row.tolist().index(tok.eos_id)].tolist()) for row in batch["text"]["text_tokens"]]

    seen, states = [], []
    for rank in range(before):
        batches = build_pretrain_batches(cfg, tok, rank=rank, world_size=before, seed=4)
        for batch in _take(batches, 2):
            seen += texts(batch)
        state = batches.state_dict()
        state["skip_counts"] = {"empty_text": rank + 1}  # as if each rank had skipped some
        states.append(json.loads(json.dumps(state)))
    steps_after = (len(unique) - len(seen)) // (2 * after)
    for rank in range(after):
        batches = build_pretrain_batches(cfg, tok, rank=rank, world_size=after, seed=4)
        batches.load_resharded_state_dict(states)
        assert batches.skip_counts() == ({"empty_text": sum(range(1, before + 1))} if rank == 0 else {})
        for batch in _take(batches, steps_after):
            seen += texts(batch)
    assert len(set(seen)) == len(seen), "a sample repeated"
    # no gap: the global order read so far is exactly the first positions of the epoch's permutation
    one_rank = build_pretrain_batches(cfg, tok, rank=0, world_size=1, seed=4)
    assert set(seen) == {t for batch in _take(one_rank, len(seen) // 2) for t in texts(batch)}


@pytest.mark.parametrize("num_workers", [0, 2])
def test_exact_resume_mid_stream(demo_root, tok, num_workers):
    cfg = _cfg(demo_root, num_workers=num_workers, pair_source="shards")
    reference = _take(build_pretrain_batches(cfg, tok, rank=1, world_size=2, seed=3), 7)
    interrupted = build_pretrain_batches(cfg, tok, rank=1, world_size=2, seed=3)
    first = _take(interrupted, 4)
    state = json.loads(json.dumps(interrupted.state_dict()))  # survives a checkpoint round trip
    assert state["next_step"] == 4
    resumed = build_pretrain_batches(cfg, tok, rank=1, world_size=2, seed=3)
    resumed.load_state_dict(state)
    rest = _take(resumed, 3)
    assert all(_same(a, b) for a, b in zip(reference, first + rest))


def _plant_bad_data(root):
    lines = (root / "coco_retrieval.train.jsonl").read_text().splitlines()
    items = [json.loads(line) for line in lines]
    (root / "bad").mkdir(exist_ok=True)
    (root / "bad" / "corrupt.jpg").write_bytes(b"\xff\xd8 definitely not a jpeg")
    items[0]["image_path"] = "bad/corrupt.jpg"
    items[1]["image_path"] = "bad/missing.jpg"
    items[2]["text_segment"] = []
    (root / "bad.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    return len(items)


def test_bad_samples_are_replaced_counted_and_limited(demo_root, tok):
    n = _plant_bad_data(demo_root)
    cfg = _cfg(demo_root, image_batch=0, text_batch=0, pair_batch=8, pair_source="bad.jsonl", max_skip_fraction=0.5)
    batches = build_pretrain_batches(cfg, tok)
    steps = _take(batches, -(-n // 8) + 1)  # more than one epoch
    assert all(b["pair"]["image"].shape[0] == 8 for b in steps)
    counts = batches.skip_counts()
    assert counts["corrupt_image"] >= 1 and counts["missing_file"] >= 1 and counts["empty_text"] >= 1
    again = build_pretrain_batches(cfg, tok)
    assert all(_same(a, b) for a, b in zip(steps, _take(again, len(steps))))
    assert again.skip_counts() == counts
    strict = build_pretrain_batches(_cfg(demo_root, image_batch=0, text_batch=0, pair_batch=8, pair_source="bad.jsonl",
                                         max_skip_fraction=0.001, skip_check_min_samples=8), tok)
    with pytest.raises(RuntimeError, match="data.max_skip_fraction=0.001") as err:
        _take(strict, len(steps))
    assert "bad/corrupt.jpg" in str(err.value) or "bad/missing.jpg" in str(err.value)  # names the files


def test_empty_or_unusable_sources_fail_at_start_naming_them(demo_root, tok):
    (demo_root / "empty.txt").write_text("")
    with pytest.raises(ValueError, match="empty.txt"):
        build_pretrain_batches(_cfg(demo_root, text_sources=["empty.txt"]), tok)
    (demo_root / "gone.jsonl").write_text(json.dumps({"image_path": "nowhere.jpg", "text_segment": [5]}) + "\n")
    with pytest.raises(ValueError, match="pair source .*gone.jsonl.* no usable sample"):
        build_pretrain_batches(_cfg(demo_root, pair_source="gone.jsonl"), tok)
    with pytest.raises(FileNotFoundError, match="no_such_root"):
        build_pretrain_batches(_cfg(demo_root / "no_such_root"), tok)
