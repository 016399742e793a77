"""Fine-tuning pieces in isolation: caption masking, the resumable training batches, rank-sharded evaluation batches,
the head lr weight and the tools' config checks."""
import random
from collections import Counter
from pathlib import Path

import pytest
import torch

from beit3.engine import OptimConfig, param_groups
from beit3.finetune import FinetuneObjective, SampleDataset, TrainBatches, eval_batches, mask_caption
from beit3.finetune.task import TaskContext
from beit3.finetune.vqav2 import VQAv2Task
from beit3.models import create_model

MASK, VOCAB, PAD = 99, 100, 1


@pytest.mark.parametrize("length", [1, 2, 5, 10, 30, 40])
def test_caption_masking_follows_the_official_rule(length):
    ids = list(range(10, 10 + length))
    out = mask_caption(ids, 32, 0.7, MASK, VOCAB, PAD, random.Random(length))
    n = min(length, 30) + 2
    k = max(1, min(int(0.7 * n + 0.5), n - 1))
    masked = out["masked_pos"]
    assert masked.sum() == k and not masked[0] and not masked[n:].any()  # never BOS, never padding
    full = torch.tensor([0, *ids[:30], 2])
    assert torch.equal(out["targets"][masked], full[masked[:n]])
    assert (out["targets"][~masked] == PAD).all()
    assert torch.equal(out["text"][:n][~masked[:n]], full[~masked[:n]])  # unmasked positions keep their ids
    assert out["padding_mask"].tolist() == [False] * n + [True] * (32 - n)


def test_caption_masking_replacement_is_80_10_10():
    counts = Counter()
    for seed in range(400):
        out = mask_caption(list(range(10, 40)), 32, 0.7, MASK, VOCAB, PAD, random.Random(seed))
        text, targets = out["text"][out["masked_pos"]], out["targets"][out["masked_pos"]]
        counts["mask"] += int((text == MASK).sum())
        counts["kept"] += int((text == targets).sum())
        counts["random"] += int(((text != MASK) & (text != targets)).sum())
    total = sum(counts.values())
    assert abs(counts["mask"] / total - 0.8) < 0.02
    assert abs(counts["kept"] / total - 0.1) < 0.02 and abs(counts["random"] / total - 0.1) < 0.02


def _toy_samples(n=23):
    return SampleDataset(list(range(n)), lambda item, rng: {"x": torch.tensor([float(item)]), "noise": torch.rand(1),
                                                           "draw": rng.random()})


def test_train_batches_are_deterministic_and_resume_exactly():
    def take(stream, count):
        it = iter(stream)
        return [next(it) for _ in range(count)]

    ref = take(TrainBatches(_toy_samples(), 4, seed=1, rank=1, world_size=2), 6)
    first = TrainBatches(_toy_samples(), 4, seed=1, rank=1, world_size=2)
    head = take(first, 2)
    resumed = TrainBatches(_toy_samples(), 4, seed=1, rank=1, world_size=2)
    resumed.load_state_dict(first.state_dict())
    for a, b in zip(head + take(resumed, 4), ref):
        assert all(torch.equal(a[k], b[k]) for k in ("x", "noise", "draw", "step"))
    other_rank = take(TrainBatches(_toy_samples(), 4, seed=1, rank=0, world_size=2), 2)
    seen = {int(v) for b in ref[:2] + other_rank for v in b["x"]}
    assert len(seen) == 16  # ranks draw disjoint samples within an epoch
    assert not torch.equal(ref[0]["noise"], take(TrainBatches(_toy_samples(), 4, seed=2, rank=1, world_size=2), 1)[0]["noise"])


def test_eval_batches_shard_and_pad_evenly():
    samples = _toy_samples(7)
    shards = [list(eval_batches(samples, 3, rank=r, world_size=3)) for r in range(3)]
    assert [len(s) for s in shards] == [1, 1, 1]
    valid = [int(x) for s in shards for b in s for x, v in zip(b["x"], b["valid"]) if v]
    assert sorted(valid) == list(range(7)) and sum(int(b["valid"].sum()) for s in shards for b in s) == 7


def test_head_lr_weight_applies_to_heads_only_without_layer_decay(tmp_path):
    model = create_model("beit3_tiny_patch8_32_vqav2", num_classes=5)
    ctx = TaskContext(root=tmp_path, tokenizer=None, image_size=32, max_text_len=8)
    objective = FinetuneObjective(model, VQAv2Task(), ctx)
    names = {id(p): n for n, p in objective.named_parameters()}
    groups = param_groups(objective, OptimConfig(lr=1.0, layer_decay=1.0, head_lr_weight=20.0))
    scale = {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    assert scale["model.head.0.weight"] == 20.0 and scale["model.head.3.bias"] == 20.0
    assert scale["model.pooler.dense.weight"] == 1.0 and scale["model.beit3.text_embed.weight"] == 1.0
    decayed = param_groups(objective, OptimConfig(lr=1.0, layer_decay=0.5, head_lr_weight=20.0))
    decayed_scale = {names[id(p)]: g["lr_scale"] for g in decayed for p in g["params"]}
    # official: the head weight applies only when layer_decay >= 1; heads/top sit at scale 1, layer i at
    # decay ** (depth - i), embeddings at decay ** (depth + 1)
    depth = model.config.depth
    assert decayed_scale["model.head.0.weight"] == decayed_scale["model.pooler.dense.weight"] == 1.0
    assert decayed_scale["model.beit3.encoder.layers.0.ffn.A.fc1.weight"] == 0.5 ** depth
    assert decayed_scale["model.beit3.text_embed.weight"] == 0.5 ** (depth + 1)
    no_decay = {names[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert {"model.beit3.vision_embed.cls_token", "model.beit3.encoder.embed_positions.A.weight"} <= no_decay


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs/finetune").glob("*.yaml")),
                         ids=lambda p: p.stem)
def test_shipped_configs_load(path):
    from beit3.config import load_config
    from beit3.finetune import TASKS
    from beit3.models import model_config
    from beit3.cli.finetune import FinetuneConfig

    cfg = load_config(FinetuneConfig, path)
    assert cfg.task in TASKS and path.stem.removeprefix("demo_") in (cfg.task, cfg.task.split("_")[-1], "vqav2")
    assert model_config(cfg.model.name, **{k: v for k, v in cfg.model.overrides.items() if k != "itm"}).img_size == cfg.data.image_size

