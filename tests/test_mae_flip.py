"""MAE pixel targets (visible-only encoder + pixel decoder) and FLIP patch dropping: what the encoder sees, where
the loss is taken, and that a pixel-target run resumes exactly and exports."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from beit3.finetune import RetrievalOptions, TaskContext, TrainProgress
from beit3.masked_data_modeling import MaskedDataModeling, ObjectiveConfig
from beit3.masking import MaskingConfig, RandomMaskGenerator, image_mask_generator
from beit3.models import from_pretrained, model_config
from beit3.models.backbone import BEiT3
from beit3.models.input_embeddings import keep_rows
from beit3.models.contrastive import random_keep
from beit3.models.pixel_decoder import PixelDecoderConfig, patch_pixels, visible_patches
from beit3.models.pretraining import BEiT3ForPretraining
from beit3.models.tasks.retrieval import BEiT3ForRetrieval
from helpers import tool_env

ROOT = Path(__file__).resolve().parents[1]
DECODER = {"width": 32, "depth": 1, "num_heads": 2}


def _config(**changes):
    return model_config("beit3_tiny_patch8_32", vocab_size=100, depth=2, position_init_std=0.02, **changes)


def _pair(batch=3, masked=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch, 3, 32, 32, generator=gen)
    mask = torch.zeros(batch, 16, dtype=torch.bool)
    for row in range(batch):
        mask[row, torch.randperm(16, generator=gen)[:masked]] = True
    text = torch.randint(5, 100, (batch, 7), generator=gen)
    text_mask = torch.zeros(batch, 7, dtype=torch.bool)
    text_mask[:, 2:4] = True
    return images, mask, text, text_mask


def test_vision_keep_computes_what_blocking_the_dropped_patches_computes():
    """Encoding only the kept patches equals the full sequence with every query blind to the dropped patches."""
    torch.manual_seed(0)
    model = BEiT3(_config()).eval()
    images, _, text, _ = _pair()
    keep = random_keep(3, 16, 0.5)
    assert keep.shape == (3, 8) and all(len(set(row.tolist())) == 8 for row in keep)
    kept = model(visual_tokens=images, textual_tokens=text, vision_keep=keep)["encoder_out"]
    blocked = torch.ones(3, 17 + 7, 17 + 7, dtype=torch.bool)
    for row in range(3):
        visible = torch.cat([keep_rows(keep)[row], torch.arange(17, 24)])
        blocked[row][:, visible] = False
    full = model(visual_tokens=images, textual_tokens=text, attn_mask=blocked)["encoder_out"]
    rows = keep_rows(keep)
    torch.testing.assert_close(kept[:, :9], full[torch.arange(3)[:, None], rows], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(kept[:, 9:], full[:, 17:], atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="vision_keep holds patch index 16"):
        model(visual_tokens=images, vision_keep=torch.full((3, 2), 16))


def test_visible_only_encoder_sees_fewer_tokens_and_never_the_masked_pixels():
    torch.manual_seed(0)
    model = BEiT3ForPretraining(_config(), image_target="pixels", pixel_decoder=DECODER).eval()
    images, mask, text, text_mask = _pair()
    lengths = []
    hook = model.beit3.vision_embed.register_forward_hook(lambda m, args, out: lengths.append(out.shape[1]))
    out = model(images=images, image_mask=mask, text_tokens=text, text_mask=text_mask, visible_only=True)
    hook.remove()
    assert lengths == [1 + 16 - 6]  # the vision tokens the encoder gets: CLS + the 10 visible patches
    assert out["pixels"].shape == (3 * 6, 8 * 8 * 3) and out["mlm"].shape == (6, 100)
    scrambled = images.clone()
    pixel_mask = mask.view(3, 4, 4).repeat_interleave(8, 1).repeat_interleave(8, 2)[:, None].expand_as(images)
    scrambled[pixel_mask] = torch.randn(int(pixel_mask.sum()))
    again = model(images=scrambled, image_mask=mask, text_tokens=text, text_mask=text_mask, visible_only=True)
    torch.testing.assert_close(again["pixels"], out["pixels"])  # the masked pixels reach neither encoder nor decoder
    torch.testing.assert_close(again["mlm"], out["mlm"])
    seen = model(images=scrambled, image_mask=mask, text_tokens=text, text_mask=text_mask, visible_only=False)
    assert seen["pixels"].shape == out["pixels"].shape


def test_pixel_loss_is_the_mean_squared_error_of_the_masked_patches_only():
    torch.manual_seed(0)
    cfg = ObjectiveConfig(image_target="pixels", pixel_decoder=PixelDecoderConfig(**DECODER), text_weight=0.0,
                          pair_weight=0.0)
    model = BEiT3ForPretraining(_config(), image_target="pixels", pixel_decoder=DECODER)
    objective = MaskedDataModeling(model, cfg).eval()
    images, mask, _, _ = _pair()
    loss, metrics = objective({"image": {"image": images, "image_mask": mask}})
    predictions = model(images=images, image_mask=mask, visible_only=True)["pixels"]
    targets = patch_pixels(images, 8)
    assert torch.allclose(targets.mean(-1), torch.zeros(3, 16), atol=1e-5)  # normalised per patch
    by_hand = ((predictions - targets[mask]) ** 2).mean()
    torch.testing.assert_close(loss, by_hand)
    assert "acc_image" not in metrics and metrics["num_tokens"] == 3 * (17 - 6)
    # changing an unmasked patch's target (not its input) leaves the loss alone: only masked patches are scored
    other = patch_pixels(images, 8).clone()
    other[~mask] = 0
    torch.testing.assert_close(((predictions - other[mask]) ** 2).mean(), by_hand)


def test_visible_patches_and_random_masks():
    mask = torch.tensor([[True, False, True, False], [False, False, True, True]])
    assert visible_patches(mask).tolist() == [[1, 3], [0, 1]]
    with pytest.raises(ValueError, match="same number of masked patches"):
        visible_patches(torch.tensor([[True, False], [False, False]]))
    gen = image_mask_generator((8, 8), MaskingConfig(image_mask_ratio=0.75, image_mask_style="random"))
    assert isinstance(gen, RandomMaskGenerator)
    import numpy as np
    masks = gen.batch(20, np.random.default_rng(0))
    assert masks.sum(1).tolist() == [48] * 20
    assert masks.float().mean(0).min() > 0.3  # spread over the grid, not blocks in one place
    with pytest.raises(ValueError, match="image_mask_style"):
        MaskingConfig(image_mask_style="grid")


def test_flip_patch_drop_encodes_fewer_patches_and_is_off_for_the_unmasked_tuning_steps():
    torch.manual_seed(0)
    model = BEiT3ForRetrieval(_config())
    lengths = []
    model.beit3.vision_embed.register_forward_hook(lambda m, args, out: lengths.append(out.shape[1]))
    images, _, text, _ = _pair(batch=4)
    model.train()
    loss, _, _ = model(image=images, text_description=text, patch_drop=0.75)
    loss.backward()
    assert lengths[0] == 1 + 4  # CLS + 16 - 12 patches
    model.eval()
    model(image=images, text_description=text, only_infer=True, patch_drop=0.75)
    assert lengths[-1] == 17  # evaluation always sees every patch
    options = RetrievalOptions(patch_drop=0.5, unmasked_tuning_steps=2)
    assert [options.drop_at(s, 6) for s in range(6)] == [0.5, 0.5, 0.5, 0.5, 0.0, 0.0]
    ctx = TaskContext(root=Path("."), tokenizer=None, image_size=32, max_text_len=8, options=options, train_steps=6)
    progress = TrainProgress(ctx)
    progress.on_train_start(type("Engine", (), {"step": 4})())  # a resumed run starts at step 4: no dropping
    assert options.drop_at(ctx.step, ctx.train_steps) == 0.0
    with pytest.raises(ValueError, match="patch_drop"):
        RetrievalOptions(patch_drop=1.0)


def _pretrain(out, root, steps, *extra):
    sets = [f"data.root={root}", f"output_dir={out}", f"train.steps={steps}", "tokenizer.path=",
            "objective.image_target=pixels", "objective.masking.image_mask_ratio=0.75",
            "objective.masking.image_mask_style=random", "objective.pixel_decoder.width=32",
            "objective.pixel_decoder.depth=1", "objective.pixel_decoder.num_heads=2", "objective.itc_patch_drop=0.5",
            "model.overrides.depth=2", "model.overrides.embed_dim=64", "model.overrides.ffn_dim=256",
            "data.image_batch=4", "data.text_batch=4", "data.pair_batch=4", "data.num_workers=0",
            "train.log_every=1", "train.save_every=3", "eval.every_steps=3", "eval.max_samples=16", *extra]
    cmd = [sys.executable, str(ROOT / "tools/pretrain.py"), "--config", str(ROOT / "configs/pretrain/demo.yaml")]
    proc = subprocess.run(cmd + [a for s in sets for a in ("--set", s)], env=tool_env(), cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_pixel_target_pretraining_needs_no_tokenizer_resumes_exactly_and_exports(tmp_path):
    from beit3.demo.data import make_demo_data
    from beit3.cli.pretrain import export_pretrained

    root = tmp_path / "data"
    make_demo_data(root, num_images=60, image_size=64, seed=0)
    whole = _pretrain(tmp_path / "whole", root, 6)
    _pretrain(tmp_path / "split", root, 3)
    split = _pretrain(tmp_path / "split", root, 6)  # resumes at step 3
    train_rows = lambda rows: [r for r in rows if "loss" in r]  # noqa: E731
    assert [r["step"] for r in train_rows(split)] == list(range(1, 7))
    for a, b in zip(train_rows(split), train_rows(whole)):
        for key in ("loss", "loss_image", "loss_pair_image", "loss_itc"):
            assert abs(a[key] - b[key]) <= 1e-6, (a["step"], key, a[key], b[key])
    evals = [r for r in whole if "eval_acc_pair_text" in r]
    assert evals and "eval_probe_colour_gap" in evals[-1] and "eval_acc_image" not in evals[-1]
    exported = export_pretrained(tmp_path / "whole", tmp_path / "export")
    model = from_pretrained(exported)
    assert model.mim_head is None and model.pixel_decoder is not None and len(model.pixel_decoder.blocks) == 1
