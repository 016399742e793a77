"""Toy model + resumable batch iterator for the engine tests (also used by engine_ds_script.py)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from beit3.engine import OptimConfig, TrainConfig

DIM, HID, VOCAB, SEQ, CLASSES = 8, 16, 16, 5, 4


class _NaNGrad(torch.autograd.Function):
    """Identity forward, NaN gradient backward: a finite loss with non-finite gradients."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


class ToyMultiway(nn.Module):
    """A 'vision' regression branch and a 'text' classification branch over a shared block, with dropout."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Linear(DIM, HID)
        self.embed = nn.Embedding(VOCAB, HID)
        self.cls_token = nn.Parameter(torch.zeros(HID))
        self.block = nn.Sequential(nn.LayerNorm(HID), nn.Linear(HID, HID), nn.GELU(), nn.Dropout(0.1))
        self.vision_head = nn.Linear(HID, DIM)
        self.text_head = nn.Linear(HID, CLASSES)
        self.frozen = nn.Linear(2, 2)
        self.frozen.requires_grad_(False)
        self.grad_checkpointing = False

    def no_weight_decay(self):
        return {"cls_token"}

    def num_layers_for_lr_decay(self):
        return 1

    def get_layer_id(self, name):
        if name.startswith(("patch", "embed", "cls_token")):
            return 0
        if name.startswith("block"):
            return 1
        return 2

    def set_grad_checkpointing(self, enable=True):
        self.grad_checkpointing = enable

    def forward(self, batch):
        v = self.block(self.patch(batch["image"]))
        if "grad_poison" in batch:
            v = _NaNGrad.apply(v)
        v_loss = F.mse_loss(self.vision_head(v), batch["target"])
        t = self.embed(batch["text"]).mean(1) + self.cls_token
        t = self.block(t)
        t_loss = F.cross_entropy(self.text_head(t), batch["label"])
        loss = v_loss + t_loss
        if "poison" in batch:
            loss = loss * batch["poison"].to(loss.dtype)
        b = batch["image"].shape[0]
        return loss, {"loss_vision": v_loss.detach(), "loss_text": t_loss.item(), "num_samples": 2 * b,
                      "num_tokens": b * SEQ}


class ToyBatches:
    """Deterministic per (seed, rank, index) data + augmentation noise from the *global* torch RNG."""

    def __init__(self, seed=0, rank=0, batch_size=4, poison=(), grad_poison=(), fail_at=None, skips_every=0):
        self.seed, self.rank, self.batch_size = seed, rank, batch_size
        self.poison = set(poison)
        self.grad_poison = set(grad_poison)  # batch indices whose loss is finite but whose gradients are NaN
        self.fail_at = fail_at  # batch index at which the iterator raises (a data-layer error)
        self.skips_every = skips_every  # pretend one corrupt image per this many batches (skip_counts())
        self.index = 0
        gen = torch.Generator().manual_seed(1234)
        self.teacher = torch.randn(DIM, DIM, generator=gen) / DIM**0.5

    def state_dict(self):
        return {"index": self.index}

    def load_state_dict(self, state):
        self.index = int(state["index"])

    def load_resharded_state_dict(self, states):
        self.index = int(states[0]["index"])  # the toy's data is per (rank, index): carry on at the same index

    def make(self, i):
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rank * 7919 + i)
        image = torch.randn(self.batch_size, DIM, generator=gen)
        text = torch.randint(0, VOCAB, (self.batch_size, SEQ), generator=gen)
        batch = {
            "image": image + 0.05 * torch.randn_like(image),  # augmentation: global RNG
            "target": image @ self.teacher,
            "text": text,
            "label": text[:, 0] % CLASSES,
        }
        if i in self.poison:
            batch["poison"] = torch.tensor(float("nan"))
        if i in self.grad_poison:
            batch["grad_poison"] = torch.tensor(1.0)
        return batch

    def skip_counts(self):
        return {"corrupt_image": self.index // self.skips_every} if self.skips_every else {}

    def __iter__(self):
        while True:
            i = self.index
            if self.fail_at is not None and i >= self.fail_at:
                raise RuntimeError(f"data: too many samples skipped at batch {i} (max_skip_fraction)")
            self.index += 1
            yield self.make(i)


def make_model(seed=0):
    torch.manual_seed(seed)  # identical init on every rank
    return ToyMultiway()


class StateDump:
    """Rank 0 writes every trainable parameter's consolidated fp32 value and Adam moments to
    ``<prefix>start.pt`` when training starts (after a resume) and ``<prefix>end.pt`` when it ends (collective
    under ZeRO-3: every rank runs it)."""

    def __init__(self, prefix):
        self.prefix = prefix

    def _dump(self, ctx, name):
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        optimizer = ctx.engine.optimizer
        if hasattr(optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2 link the moments lazily
            optimizer._hp_optimizer_states_linked = False
            optimizer._lazy_init_hp_params_optimizer_state()
        states = {}
        for pname, param in ctx.engine.module.named_parameters():
            if param.requires_grad:
                states[pname] = [safe_get_full_fp32_param(param)] + [
                    safe_get_full_optimizer_state(param, key) for key in ("exp_avg", "exp_avg_sq")]
        if ctx.rank == 0:
            torch.save(states, f"{self.prefix}{name}.pt")

    def on_train_start(self, ctx):
        if self.prefix and ctx.step > 0:  # a fresh run has no optimizer state yet
            self._dump(ctx, "start")

    def on_train_end(self, ctx, summary):
        if self.prefix:
            self._dump(ctx, "end")


@dataclass
class ToyRunConfig:
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crash_after_step: int = 0  # raise after this optimizer step (simulates a killed job)
    batch_size: int = 4
    poison: list[int] = field(default_factory=list)
    dump_states: str = ""  # path prefix for StateDump


class Crash(RuntimeError):
    pass


class CrashAfter:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, ctx, step, metrics):
        if self.step and step >= self.step:
            raise Crash(f"simulated crash after step {step}")
