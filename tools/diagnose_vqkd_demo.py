"""Diagnostic run (not a training tool): train vqkd_demo on make_demo_data images at /tmp/vqq/data and log usage, perplexity, encoder spread and code_informativeness on the val split. Usage: PYTHONPATH=. python tools/diagnose_vqkd_demo.py JSON_OVERRIDES"""
import json, math, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from PIL import Image
from beit3.config import from_dict
from tokenizer.train import (TokenizerObjectiveConfig, build_tokenizer_objective, param_groups, code_informativeness)
from tokenizer.quantizer import l2norm

cfg = {"steps": 300, "batch": 64, "lr": 1e-3, "min_lr": 1e-4, "warmup": 30, "wd": 1e-4, "betas": [0.9, 0.99],
       "model": {}, "teacher": {"kind": "hog"}, "seed": 0, "log_every": 50, "flip": True}
cfg.update(json.loads(sys.argv[1]) if len(sys.argv) > 1 else {})
root = "/tmp/vqq/data"
def load(split):
    items = [json.loads(l) for l in open(f"{root}/imagenet.{split}.index.jsonl")]
    arr = np.stack([np.asarray(Image.open(f"{root}/{it['image_path']}").convert("RGB")) for it in items])
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float() / 255.0
train, val = load("train"), load("val")
torch.manual_seed(cfg["seed"])
obj = build_tokenizer_objective(from_dict(TokenizerObjectiveConfig, {"arch": "vqkd_demo", "model": cfg["model"], "teacher": cfg["teacher"]}))
if cfg.get("bypass"):
    q = obj.tokenizer.quantize
    def fwd(z):
        z = l2norm(z.float()); return z, z.sum() * 0, q.nearest_codes(z.detach())
    q.forward = fwd
opt = torch.optim.AdamW(param_groups(obj, cfg["wd"]), lr=cfg["lr"], betas=tuple(cfg["betas"]))
steps = cfg["steps"]
def lr_at(s):
    if s < cfg["warmup"]: return cfg["lr"] * (s + 1) / cfg["warmup"]
    p = (s - cfg["warmup"]) / max(1, steps - cfg["warmup"])
    return cfg["min_lr"] + 0.5 * (cfg["lr"] - cfg["min_lr"]) * (1 + math.cos(math.pi * p))
g = torch.Generator().manual_seed(cfg["seed"])
t0 = time.time()
print("cfg", json.dumps(cfg), flush=True)
for s in range(steps):
    idx = torch.randint(0, train.shape[0], (cfg["batch"],), generator=g)
    x = train[idx]
    if cfg["flip"]:
        f = torch.rand(cfg["batch"], generator=g) < 0.5
        x = torch.where(f[:, None, None, None], x.flip(-1), x)
    for grp in opt.param_groups: grp["lr"] = lr_at(s)
    loss, m = obj(x)
    opt.zero_grad(); loss.backward(); opt.step()
    if (s + 1) % cfg["log_every"] == 0 or s == 0:
        with torch.no_grad():
            z = l2norm(obj.tokenizer.encode(val[:32])).reshape(-1, 32)
            spread = float(1 - (z @ z.t()).mean())
        info = code_informativeness(obj, val)
        print(f"step {s+1} t={time.time()-t0:.0f}s rec={m['rec_loss']:.4f} q={m['quant_loss']:.4f} use={m['codebook_usage']:.3f} "
              f"ppl={m['code_perplexity']:.0f} zspread={spread:.3f} | val true={info['rec_loss_true']:.4f} shuf={info['rec_loss_shuffled']:.4f} "
              f"gap={info['relative_gap']:.3f} mean={info['rec_loss_mean_target']:.4f} use={info['codebook_usage']:.3f} "
              f"ppl={info['code_perplexity']:.0f} stab={info['code_stability']:.3f} pos={info['codes_per_position']:.1f} img={info['codes_per_image']:.1f}", flush=True)
print("wall", round(time.time() - t0, 1))
print("FINAL", json.dumps({k: round(v, 4) for k, v in code_informativeness(obj, val).items()}))
