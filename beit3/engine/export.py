"""Consolidated fp32 weights of a training run's checkpoint (any ZeRO stage), in one process without a process
group: for exports, evaluation and tests. The checkpoint is verified (sizes and SHA-256) before it is read."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from beit3.errors import CheckpointError

from .checkpointing import find_resume_tag, step_of_tag
from .safe_load import safe_torch_load, safe_torch_load_everywhere
from .tag_files import checkpoint_problem


def resolve_checkpoint(path: str | Path) -> tuple[Path, str]:
    """(checkpoints dir, tag) for an output dir, a checkpoints dir (with ``latest``) or a tag dir."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        path = path / "checkpoints"
    if (path / "latest").is_file() or any(step_of_tag(p.name) is not None for p in path.glob("step*")):
        tag, notes = find_resume_tag(path)
        if tag is None:
            raise CheckpointError(f"no complete checkpoint in '{path}': {'; '.join(notes) or 'no tags'}")
        for note in notes:
            print(f"[beit3.export] {note}", file=sys.stderr)
        return path, tag
    if path.is_dir() and any(path.glob("*model_states.pt")):
        problem = checkpoint_problem(path)
        if problem is not None:
            raise CheckpointError(f"checkpoint '{path}' cannot be exported: {problem}")
        return path.parent, path.name
    raise FileNotFoundError(f"no checkpoint found at '{path}' (expected an output dir, a checkpoints dir with "
                            f"'latest', or a checkpoint tag dir)")


def export_consolidated_state_dict(path: str | Path, exclude_frozen_parameters: bool = False) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights (name -> tensor) of the latest checkpoint in ``path`` for ZeRO 0/1/2/3.

    ``path`` may be a training output dir, its ``checkpoints`` dir, or one tag dir. Runs in one process, without a
    process group (uses ``deepspeed.utils.zero_to_fp32``).
    """
    ckpt_dir, tag = resolve_checkpoint(path)
    tag_dir = ckpt_dir / tag
    if any(tag_dir.glob("*optim_states.pt")):
        from deepspeed.utils import zero_to_fp32

        with safe_torch_load_everywhere():
            state = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(
                str(ckpt_dir), tag=tag, exclude_frozen_parameters=exclude_frozen_parameters)
        if not exclude_frozen_parameters:
            # DeepSpeed pitfall: ZeRO-1 (no gradient partitioning) does not record frozen parameters in
            # frozen_param_shapes, so zero_to_fp32 drops them; the saved module state dict has them in full.
            files = sorted(tag_dir.glob("*mp_rank_00_model_states.pt"))
            module = safe_torch_load(files[0], map_location="cpu").get("module") or {} if files else {}
            for name, tensor in module.items():
                if name not in state and isinstance(tensor, torch.Tensor) and tensor.numel() > 0:
                    state[name] = tensor
    else:  # ZeRO stage 0: the module state dict is complete (fp32 unless bf16 weights were trained without ZeRO)
        files = sorted(tag_dir.glob("mp_rank_*_model_states.pt"))
        if not files:
            raise FileNotFoundError(f"no model states in '{tag_dir}'")
        saved = safe_torch_load(files[0], map_location="cpu")
        state = dict(saved["module"])
        # bf16/fp16 without ZeRO: the module holds 16-bit weights; the fp32 masters are the optimizer's fp32_groups,
        # mapped to names with the per-group parameter names the engine stores in the client state.
        fp32_groups = (saved.get("optimizer") or {}).get("fp32_groups") if isinstance(saved.get("optimizer"),
                                                                                     dict) else None
        names = saved.get("param_group_names")
        if fp32_groups and names and [len(g) for g in fp32_groups] == [len(n) for n in names]:
            for group_names, tensors in zip(names, fp32_groups):
                state.update(zip(group_names, tensors))
    return {k: v.detach().float().contiguous() if v.is_floating_point() else v.detach().contiguous()
            for k, v in state.items()}
