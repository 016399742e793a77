"""l2-normalised vector quantizer with normalised-EMA codebook updates (BEiT v2 ``NormEMAVectorQuantizer``).

State-dict layout matches the official one: ``embedding.weight [K,D]``, ``embedding.cluster_size [K]``,
``embedding.embed_avg [K,D]``, ``embedding.initted [1]`` and ``cluster_size [K]``. All of them are buffers here (the
official code keeps the first three as frozen Parameters): the codebook is never trained by the optimizer.

Differences from the official code, all deliberate:
  * the k-means result is broadcast from rank 0, so every rank starts from the same codebook;
  * the all-reduce is chosen at call time (``torch.distributed`` initialised or not), not at construction time;
  * eval mode never touches any buffer (no k-means, no EMA, no usage statistics, no collectives);
  * an optional dead-code restart re-seeds codes unused for ``restart_after_steps`` steps with current encodings.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from beit3.comm import all_reduce_, broadcast_from_rank0


def l2norm(x: torch.Tensor) -> torch.Tensor:
    """Normalise along the last dimension to unit length."""
    return F.normalize(x, p=2, dim=-1)


def cosine_kmeans(samples: torch.Tensor, num_clusters: int, num_iters: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Spherical k-means on unit vectors; returns (l2-normalised means [K,D], cluster counts [K]).

    Initial means are a random subset of the samples (drawn with replacement when there are fewer samples than
    clusters). Empty clusters keep their previous mean, as in the official ``kmeans`` with ``use_cosine_sim``.
    """
    num_samples, dim = samples.shape
    if num_samples >= num_clusters:
        means = samples[torch.randperm(num_samples, device=samples.device)[:num_clusters]]
    else:
        means = samples[torch.randint(0, num_samples, (num_clusters,), device=samples.device)]
    bins = torch.zeros(num_clusters, device=samples.device, dtype=samples.dtype)
    for _ in range(num_iters):
        assign = (samples @ means.t()).argmax(dim=-1)
        bins = torch.bincount(assign, minlength=num_clusters).to(samples.dtype)
        sums = torch.zeros_like(means).index_add_(0, assign, samples)
        means = torch.where((bins == 0)[:, None], means, l2norm(sums))
    return means, bins


class Codebook(nn.Module):
    """Code vectors plus the official bookkeeping buffers (``cluster_size``, ``embed_avg`` are kept for layout only)."""

    def __init__(self, num_codes: int, code_dim: int):
        super().__init__()
        self.register_buffer("weight", l2norm(torch.randn(num_codes, code_dim)))
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        self.register_buffer("embed_avg", torch.zeros(num_codes, code_dim))
        self.register_buffer("initted", torch.zeros(1))

    def forward(self, indices: torch.Tensor) -> torch.Tensor:
        return F.embedding(indices, self.weight)


class NormEMAQuantizer(nn.Module):
    """Nearest-code quantizer on the unit sphere; EMA codebook, straight-through gradients, commitment loss.

    Args:
        num_codes: codebook size K.
        code_dim: code dimension D.
        beta: weight of the commitment loss ``MSE(z, sg(z_q))``.
        decay: EMA decay of the codebook and of the usage statistic ``cluster_size``.
        kmeans_init: initialise the codebook by k-means on the first training batch (then broadcast from rank 0).
        kmeans_iters: k-means iterations.
        restart_after_steps: re-seed codes unused (on all ranks) for this many training steps; 0 disables it.
    """

    def __init__(
        self,
        num_codes: int,
        code_dim: int,
        beta: float = 1.0,
        decay: float = 0.99,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        restart_after_steps: int = 0,
    ):
        super().__init__()
        self.num_codes = num_codes
        self.code_dim = code_dim
        self.beta = beta
        self.decay = decay
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.restart_after_steps = restart_after_steps
        self.embedding = Codebook(num_codes, code_dim)
        if not kmeans_init:
            self.embedding.initted.fill_(1.0)
        self.register_buffer("cluster_size", torch.zeros(num_codes))
        # Not part of the official layout, so not saved: a resumed run counts idle steps from zero again.
        self.register_buffer("steps_unused", torch.zeros(num_codes, dtype=torch.long), persistent=False)

    @torch.no_grad()
    def nearest_codes(self, z: torch.Tensor) -> torch.Tensor:
        """Indices of the nearest codes for unit vectors ``z [..., D]`` (fp32 distance, ties to the lowest index)."""
        weight = self.embedding.weight.float()
        z = z.float()
        dist2 = z.pow(2).sum(-1, keepdim=True) + weight.pow(2).sum(-1) - 2.0 * z @ weight.t()
        return dist2.argmin(dim=-1)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Quantize projected features ``z [B,N,D]``.

        Returns ``(z_q, loss, indices)``: straight-through quantized unit vectors [B,N,D] (fp32), commitment loss
        (scalar) and code indices [B,N] (long).
        """
        if z.ndim != 3 or z.shape[-1] != self.code_dim:
            raise ValueError(f"quantizer expects features [B, N, {self.code_dim}], got {tuple(z.shape)}")
        with torch.autocast(z.device.type, enabled=False):
            z = l2norm(z.float())
            flat = z.reshape(-1, self.code_dim)
            if self.training and not bool(self.embedding.initted.item()):
                self._init_from_kmeans(flat.detach())
            indices = self.nearest_codes(flat)
            z_q = self.embedding(indices).view_as(z)
            loss = self.beta * F.mse_loss(z_q.detach(), z)
            if self.training:
                self._ema_update(flat.detach(), indices)
            z_q = z + (z_q - z).detach()
        return z_q, loss, indices.view(z.shape[:-1])

    @torch.no_grad()
    def _init_from_kmeans(self, flat: torch.Tensor) -> None:
        means, bins = cosine_kmeans(flat, self.num_codes, self.kmeans_iters)
        self.embedding.weight.copy_(broadcast_from_rank0(means))
        self.embedding.cluster_size.copy_(broadcast_from_rank0(bins))
        self.embedding.initted.fill_(1.0)

    @torch.no_grad()
    def _ema_update(self, flat: torch.Tensor, indices: torch.Tensor) -> None:
        bins = all_reduce_(torch.bincount(indices, minlength=self.num_codes).to(flat.dtype))
        self.cluster_size.mul_(self.decay).add_(bins, alpha=1.0 - self.decay)
        unused = bins == 0
        embed_sum = all_reduce_(flat.new_zeros(self.num_codes, self.code_dim).index_add_(0, indices, flat))
        weight = self.embedding.weight.float()
        means = torch.where(unused[:, None], weight, l2norm(embed_sum / bins.clamp(min=1.0)[:, None]))
        self.embedding.weight.copy_(l2norm(weight * self.decay + means * (1.0 - self.decay)))
        if self.restart_after_steps > 0:
            self.steps_unused.add_(1).masked_fill_(~unused, 0)
            self._restart_dead_codes(flat)

    @torch.no_grad()
    def _restart_dead_codes(self, flat: torch.Tensor) -> None:
        """Re-seed codes idle for ``restart_after_steps`` steps with random encodings from rank 0's batch."""
        dead = (self.steps_unused >= self.restart_after_steps).nonzero().squeeze(1)
        if dead.numel() == 0:  # identical on every rank: the counter comes from all-reduced bins
            return
        pick = torch.randint(0, flat.shape[0], (dead.numel(),), device=flat.device)
        seeds = broadcast_from_rank0(flat[pick].contiguous())
        self.embedding.weight[dead] = seeds
        self.steps_unused[dead] = 0
