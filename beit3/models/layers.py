"""Building blocks of the Multiway Transformer: modality routing, joint attention and the Sub-LN feed-forward network.

Routing follows the official torchscale convention. A *split position* says which expert sees which tokens:
``-1`` the whole sequence goes to the vision expert ``A``, ``0`` to the language expert ``B``, and ``k > 0`` sends
tokens ``[:k]`` (the image, always first) to ``A`` and ``[k:]`` to ``B``. Routing slices views of the sequence; no
per-token loop and no gather over the full sequence.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_ONLY = -1
TEXT_ONLY = 0

# Value the official implementation adds for blocked entries of ``attn_mask`` (padded keys use -inf).
ATTN_MASK_BLOCKED = -1e8


class Multiway(nn.Module):
    """One copy of a module per modality: ``A`` (vision) and ``B`` (language), plus an optional ``C``.

    ``C`` is the vision-language expert of the paper variant (BEiT-3 paper §2.1, VLMo): when present it processes
    the whole sequence of image-text inputs, while image-only and text-only inputs still use ``A`` and ``B``.
    """

    def __init__(self, module: nn.Module, with_vl_expert: bool = False):
        super().__init__()
        self.A = module
        self.B = copy.deepcopy(module)
        self.C = copy.deepcopy(module) if with_vl_expert else None

    def experts(self, split: int) -> list[nn.Module]:
        """The expert of each part of :func:`split_parts` for ``split`` (``C`` is handled by :meth:`forward_parts`)."""
        if split == IMAGE_ONLY:
            return [self.A]
        if split == TEXT_ONLY:
            return [self.B]
        return [self.A, self.B]

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        if split == IMAGE_ONLY:
            return self.A(x)
        if split == TEXT_ONLY:
            return self.B(x)
        if self.C is not None:
            return self.C(x)
        return torch.cat(self.forward_parts(split_parts(x, split), split), dim=1)

    def forward_parts(self, parts: list[torch.Tensor], split: int) -> list[torch.Tensor]:
        """Route a sequence kept as its per-modality parts (see :func:`split_parts`); returns parts again.

        Each expert sees its own contiguous part: no slicing of a joint tensor, so neither the forward copies nor
        the zero-filled slice gradients of the backward that routing by slicing costs.
        """
        if self.C is not None and len(parts) == 2:
            sizes = [p.shape[-2] for p in parts]
            return list(self.C(torch.cat(parts, dim=-2)).split(sizes, dim=-2))
        return [expert(p) for expert, p in zip(self.experts(split), parts)]


class Shared(nn.Module):
    """A single module used for every modality (the paper's shared attention); ignores the split position."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def experts(self, split: int) -> list[nn.Module]:
        return [self.module] if split in (IMAGE_ONLY, TEXT_ONLY) else [self.module, self.module]

    def forward(self, x: torch.Tensor, split: int) -> torch.Tensor:
        return self.module(x)

    def forward_parts(self, parts: list[torch.Tensor], split: int) -> list[torch.Tensor]:
        return [self.module(p) for p in parts]


def split_parts(x: torch.Tensor, split: int) -> list[torch.Tensor]:
    """The per-modality parts of a (B, L, D) sequence: ``[x]`` for one modality, ``[x[:, :k], x[:, k:]]`` for
    ``split = k > 0``. ``Tensor.split`` (not two slices) so the backward is one concatenation."""
    if split in (IMAGE_ONLY, TEXT_ONLY):
        return [x]
    return list(x.split([split, x.shape[1] - split], dim=1))


def join_parts(parts: list[torch.Tensor]) -> torch.Tensor:
    """Inverse of :func:`split_parts`; also joins parts given as flat (N_i, D) rows (see :class:`RowSelection`)."""
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=-2)


@dataclass
class RowSelection:
    """The positions of a sequence whose outputs are needed, given per modality part (see :func:`split_parts`).

    Part ``i``'s selected positions are the rows ``(samples[i], positions[i])``, row-major. For attention the selected
    queries sit in a padded (batch, width) grid, a sample's rows of every part side by side: ``slots[i]`` is each
    row's column there, ``offsets[i]`` the part's first position in the whole sequence.
    """

    samples: list[torch.Tensor]
    positions: list[torch.Tensor]
    slots: list[torch.Tensor]
    offsets: list[int]
    batch: int
    width: int

    @classmethod
    def from_masks(cls, masks: list[torch.Tensor]) -> "RowSelection":
        """From one bool (B, L_i) mask per part (True = output needed)."""
        samples, positions, slots, offsets = [], [], [], []
        taken = torch.zeros(masks[0].shape[0], dtype=torch.long, device=masks[0].device)
        start = 0
        for mask in masks:
            mask = mask.bool()
            sample, position = mask.nonzero(as_tuple=True)
            rank = mask.long().cumsum(1) - 1
            samples.append(sample)
            positions.append(position)
            slots.append(taken[sample] + rank[sample, position])
            offsets.append(start)
            taken = taken + mask.sum(1)
            start += mask.shape[1]
        return cls(samples, positions, slots, offsets, masks[0].shape[0], max(1, int(taken.max())))

    def rows(self, parts: list[torch.Tensor]) -> list[torch.Tensor]:
        """The selected rows of each (B, L_i, ...) part, as (N_i, ...)."""
        return [x[s, p] for x, s, p in zip(parts, self.samples, self.positions)]

    def to_grid(self, rows: list[torch.Tensor]) -> torch.Tensor:
        """Rows of every part -> the padded (batch, width, ...) grid, zeros where nothing is selected."""
        joined = torch.cat(rows)
        grid = joined.new_zeros((self.batch, self.width) + tuple(joined.shape[1:]))
        return grid.index_put((torch.cat(self.samples), torch.cat(self.slots)), joined)

    def from_grid(self, grid: torch.Tensor) -> list[torch.Tensor]:
        """The padded grid -> rows of each part (inverse of :meth:`to_grid`)."""
        return [grid[s, slot] for s, slot in zip(self.samples, self.slots)]

    def grid_positions(self) -> torch.Tensor:
        """(batch, width) position in the whole sequence of each grid cell (0 for padding cells)."""
        grid = torch.zeros(self.batch, self.width, dtype=torch.long, device=self.samples[0].device)
        rows = [p + offset for p, offset in zip(self.positions, self.offsets)]
        return grid.index_put((torch.cat(self.samples), torch.cat(self.slots)), torch.cat(rows))


def routed(module: nn.Module, shared: bool = False, with_vl_expert: bool = False) -> nn.Module:
    """Wrap ``module`` as a per-modality :class:`Multiway` or as a :class:`Shared` module."""
    return Shared(module) if shared else Multiway(module, with_vl_expert=with_vl_expert)


class SequenceParts(nn.Module):
    """A module computed on the per-modality parts of a sequence (see :func:`split_parts`): subclasses define
    ``forward_parts(parts, split, attn_bias, incremental_state)``; ``forward`` takes and returns the joined sequence."""

    def forward(
        self,
        x: torch.Tensor,
        split: int,
        attn_bias: Optional[torch.Tensor] = None,
        incremental_state: Optional[dict] = None,
    ) -> torch.Tensor:
        return join_parts(self.forward_parts(split_parts(x, split), split, attn_bias, incremental_state))


class MultiwayAttention(SequenceParts):
    """Multi-head self-attention computed jointly over the whole sequence, with per-modality projections.

    q/k/v/out projections and the Sub-LN ``inner_attn_ln`` (over the concatenated heads, before ``out_proj``) are
    routed; the softmax runs over all tokens of all modalities (deep fusion). ``shared=True`` gives one set of
    weights for both modalities (the paper's shared self-attention).
    """

    def __init__(self, dim: int, num_heads: int, eps: float, shared: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"embed_dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_proj = routed(nn.Linear(dim, dim), shared)
        self.k_proj = routed(nn.Linear(dim, dim), shared)
        self.v_proj = routed(nn.Linear(dim, dim), shared)
        self.out_proj = routed(nn.Linear(dim, dim), shared)
        self.inner_attn_ln = routed(nn.LayerNorm(dim, eps=eps), shared)

    def forward_parts(
        self,
        parts: list[torch.Tensor],
        split: int,
        attn_bias: Optional[torch.Tensor] = None,
        incremental_state: Optional[dict] = None,
    ) -> list[torch.Tensor]:
        """Attention over the sequence given as its per-modality parts; returns the output parts (q, k and v: see
        :meth:`_project`; the parts are joined once for the joint softmax)."""
        batch = parts[0].shape[0]
        dim = self.num_heads * self.head_dim
        q, k, v = self._project(parts, split, (self.q_proj, self.k_proj, self.v_proj))
        length = q.shape[2]
        if incremental_state is not None:
            if "prev_key" in incremental_state:
                k = torch.cat([incremental_state["prev_key"].to(k.dtype), k], dim=2)
                v = torch.cat([incremental_state["prev_value"].to(v.dtype), v], dim=2)
            incremental_state["prev_key"] = k
            incremental_state["prev_value"] = v
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
        out = attention(q, k, v, attn_bias)
        out = out.transpose(1, 2).reshape(batch, length, dim)
        out_parts = split_parts(out, split) if len(parts) == 2 else [out]
        out_parts = self.inner_attn_ln.forward_parts(out_parts, split)
        return self.out_proj.forward_parts(out_parts, split)

    def forward_selected(
        self,
        parts: list[torch.Tensor],
        split: int,
        attn_bias: Optional[torch.Tensor],
        selection: RowSelection,
    ) -> list[torch.Tensor]:
        """Attention output at the selected positions only, as rows of each part (see :class:`RowSelection`).

        Keys and values come from every position; queries, softmax rows, ``inner_attn_ln`` and ``out_proj`` are
        computed for the selected positions alone (the rows equal those of :meth:`forward_parts`).
        """
        batch = parts[0].shape[0]
        dim = self.num_heads * self.head_dim
        k, v = self._project(parts, split, (self.k_proj, self.v_proj))
        (q,) = self._heads(selection.to_grid(self.q_proj.forward_parts(selection.rows(parts), split)))
        if attn_bias is not None:
            attn_bias = attn_bias.to(q.dtype)
            if attn_bias.shape[-2] > 1:  # one bias row per query: keep the selected queries' rows
                heads, keys = attn_bias.shape[1], attn_bias.shape[-1]
                index = selection.grid_positions()[:, None, :, None].expand(-1, heads, -1, keys)
                attn_bias = attn_bias.expand(batch, -1, -1, -1).gather(2, index)
        out = attention(q, k, v, attn_bias).transpose(1, 2).reshape(batch, selection.width, dim)
        out_parts = self.inner_attn_ln.forward_parts(selection.from_grid(out), split)
        return self.out_proj.forward_parts(out_parts, split)

    def _project(self, parts: list[torch.Tensor], split: int, projections: tuple) -> list[torch.Tensor]:
        """Each part through its experts of the routed ``projections`` in one matmul (their weights concatenated at
        use, so the parameters keep the official names and layout); each projection as (B, heads, L, head_dim)."""
        joined = join_parts([
            F.linear(part, torch.cat([e.weight for e in experts]), torch.cat([e.bias for e in experts]))
            for part, experts in zip(parts, zip(*(p.experts(split) for p in projections)))
        ])
        return list(self._heads(joined, len(projections)))

    def _heads(self, x: torch.Tensor, count: int = 1) -> tuple[torch.Tensor, ...]:
        """(B, L, count * dim) -> ``count`` tensors of (B, heads, L, head_dim)."""
        batch, length = x.shape[:2]
        return x.view(batch, length, count, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """Scaled dot-product attention. SDPA (flash / memory-efficient kernels on GPU, the flash kernel on CPU in fp32),
    except bf16/fp16 on CPU: there two (AMX) batched matmuls around an fp32 softmax, as the official implementation
    computes it, which is faster there than the CPU flash kernel (README, "Measured")."""
    if q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        scores = (q * q.shape[-1] ** -0.5) @ k.transpose(-1, -2)
        if bias is not None:
            scores = scores + bias
        return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


class FeedForward(nn.Module):
    """FFN with the Sub-LN inner LayerNorm: ``fc2(LN(GELU(fc1(x))))``; GELU (exact erf) computed in fp32."""

    def __init__(self, dim: int, hidden_dim: int, eps: float):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.ffn_layernorm = nn.LayerNorm(hidden_dim, eps=eps)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = F.gelu(h.float()).to(h.dtype)
        return self.fc2(self.ffn_layernorm(h))


def attention_bias(
    query_len: int,
    key_len: int,
    key_padding_mask: Optional[torch.Tensor],
    attn_mask: Optional[torch.Tensor],
    dtype: torch.dtype,
    device: torch.device,
) -> Optional[torch.Tensor]:
    """Additive attention bias from the official mask conventions, or None when nothing is masked.

    ``attn_mask``: (Q, K), (B, Q, K) or (B, 1|H, Q, K); any non-zero / True entry is *blocked* (official torchscale
    convention, the inverse of Hugging Face's ``attention_mask``) and gets -1e8. ``key_padding_mask``: (B, K), True
    or 1 at padded keys, which get -inf. The result broadcasts against (B, H, Q, K).
    """
    bias = None
    if attn_mask is not None:
        if attn_mask.shape[-2:] != (query_len, key_len):
            raise ValueError(
                f"attn_mask has shape {tuple(attn_mask.shape)}, expected (..., {query_len}, {key_len}) "
                "for the current query and key lengths"
            )
        blocked = attn_mask.to(device=device).bool()
        if blocked.dim() == 3:
            blocked = blocked.unsqueeze(1)
        bias = torch.zeros(blocked.shape, dtype=dtype, device=device).masked_fill_(blocked, ATTN_MASK_BLOCKED)
    # eager: no bias when nothing is padded (SDPA keeps its flash kernel); compiled: always, branch-free
    if key_padding_mask is not None and (torch.compiler.is_compiling() or key_padding_mask.any()):
        pad = key_padding_mask.to(device=device).bool()[:, None, None, :]
        pad_bias = torch.zeros(pad.shape, dtype=dtype, device=device).masked_fill_(pad, float("-inf"))
        bias = pad_bias if bias is None else bias + pad_bias
    return bias


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic-depth rate per layer: linear from 0 to ``rate`` (as torchscale and timm)."""
    return [rate * i / (depth - 1) for i in range(depth)] if depth > 1 else [0.0] * depth


def init_linear_and_norm(module: nn.Module, std: float = 0.02, truncate: Callable = nn.init.trunc_normal_,
                         cut: float = 1.0) -> None:
    """Official BEiT-3 init: Linear trunc-normal(std) cut at ±``cut`` std (official: 1, which leaves an actual std of
    0.54 ``std``), bias 0; LayerNorm weight 1, bias 0."""
    if isinstance(module, nn.Linear):
        truncate(module.weight, std=std, a=-cut * std, b=cut * std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
