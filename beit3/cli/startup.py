"""Start-up checks shared by the training tools: every failure is a one-line :class:`ConfigError` naming the config
key and the path, raised before anything is written (the tools turn it into exit code 2)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import torch.distributed as dist

from beit3.comm import get_rank
from beit3.config import config_differences, read_yaml
from beit3.errors import CheckpointError, ConfigError, Preempted, TrainingStopped

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: stopped on a signal with a checkpoint saved; rerun to resume


def check_readable_file(path: str | Path, key: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{key} '{path}' does not exist")
    if not path.is_file():
        raise ConfigError(f"{key} '{path}' is not a file")
    try:
        with open(path, "rb") as handle:
            handle.read(1)
    except OSError as err:
        raise ConfigError(f"{key} '{path}' is not readable: {err}") from err
    return path


def check_source(spec: str, root: Path, key: str, allow_folder: bool = True) -> None:
    """A data source spec (JSONL index, tar shards, or an image folder) exists and can be opened."""
    from beit3.data.readers import expand_shards
    from beit3.data.sources import _is_shard_spec

    if spec.endswith(".jsonl"):
        check_readable_file(root / spec, key)
    elif _is_shard_spec(spec, root):
        try:
            for shard in expand_shards(spec, root):
                check_readable_file(shard, key)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"{key} '{spec}' under '{root}': {err}") from err
    elif allow_folder:
        if not (root / spec).is_dir():
            raise ConfigError(f"{key} '{root / spec}' does not exist (expected a .jsonl index, tar shards or an "
                              "image folder)")
    else:
        raise ConfigError(f"{key} '{spec}' under '{root}' is neither a .jsonl index nor tar shards")


def check_data(data, streams=("image", "text", "pair")) -> None:
    """``data.root`` and the source of every stream with a non-zero batch."""
    root = Path(data.root)
    if not root.is_dir():
        raise ConfigError(f"data.root '{root}' is not a directory (make one with tools/make_demo_data.py or "
                          "tools/convert_dataset.py)")
    if "image" in streams and data.image_batch:
        check_source(data.image_source, root, "data.image_source")
    if "pair" in streams and data.pair_batch:
        check_source(data.pair_source, root, "data.pair_source", allow_folder=False)
    if "text" in streams and data.text_batch:
        if not data.text_sources:
            raise ConfigError("data.text_sources is empty but data.text_batch > 0")
        for i, spec in enumerate(data.text_sources):
            check_readable_file(root / spec, f"data.text_sources[{i}]")


def check_output_dir(path: str | Path) -> None:
    """``output_dir`` exists or can be created, and a file can be written in it (the probe is removed again)."""
    out = Path(path)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write_test_{os.getpid()}"
        probe.write_text("ok")
        probe.unlink()
    except OSError as err:
        raise ConfigError(f"output_dir '{out}' is not writable: {err}") from err


def _launcher_rank() -> int:
    """This process's rank, from the process group or, before it exists, from the launcher's ``RANK``."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def exit_code(work: Callable[[], object]) -> int:
    """Run a training or evaluation tool's ``work`` and map how it ended to the exit code, with one line on stderr:
    0 done; 2 a configuration the user can fix (:class:`ConfigError`); 3 a run that stopped on purpose
    (:class:`TrainingStopped`: non-finite loss, data fault) or a checkpoint that cannot be used
    (:class:`CheckpointError`); 75 stopped by one of ``train.preempt_signals`` after saving a checkpoint
    (:class:`Preempted`; the same command resumes); 130 Ctrl-C (the first one saves a checkpoint like a preemption
    signal, a second stops at once; no traceback, the last checkpoint is named). Checkpoints already saved are
    untouched in every case."""
    try:
        work()
    except Preempted as err:  # every rank raises it after the same save: said once
        if get_rank() == 0:
            print(f"stopped: {err}", file=sys.stderr, flush=True)
        return 130 if err.signal_name == "SIGINT" else PREEMPTED_EXIT_CODE
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except ConfigError as err:
        # the checks are the same on every rank (often before the process group exists): said once, by rank 0
        if _launcher_rank() == 0:
            print(f"error: {err}", file=sys.stderr)
        return 2
    except TrainingStopped as err:
        # raised on every rank at the same step, and the engine has already printed why on rank 0: say it once
        if get_rank() == 0:
            print(f"error: training stopped ({type(err).__name__}; the [beit3.engine] line above says why and "
                  "names the last good checkpoint)", file=sys.stderr)
        return 3
    except CheckpointError as err:
        print(f"error: {err}", file=sys.stderr)
        return 3
    return 0


def check_previous_run(output_dir: str | Path, config: dict, auto_resume: bool, shape_sections: tuple[str, ...],
                       run_config_file: str = "config.yaml", ignore: tuple[str, ...] = ()) -> None:
    """Before anything is written into an ``output_dir`` that holds a run's checkpoints: ``auto_resume=false`` would
    train over them, and a changed ``shape_sections`` config (the model the checkpoints hold) could not load them;
    both are a ConfigError naming the folder (and the differing keys), so the saved run stays as it is. Keys in
    ``ignore`` (dotted, e.g. ``model.init_from``) may differ."""
    from beit3.engine.checkpointing import list_tags

    out = Path(output_dir)
    tags = list_tags(out / "checkpoints")
    if not tags:
        return
    last = tags[-1][1]
    if not auto_resume:
        raise ConfigError(f"output_dir '{out}' holds a run (checkpoints up to '{last}') and train.auto_resume is "
                          "false, which would train over it: choose another output_dir, or move the old run away")
    _check_world_size(out / "checkpoints" / last, config)
    saved_path = out / run_config_file
    if not saved_path.is_file():
        return
    saved = read_yaml(saved_path)
    changed = [d for d in config_differences({s: saved.get(s) for s in shape_sections},
                                             {s: config.get(s) for s in shape_sections})
               if not d.startswith(tuple(f"{key}:" for key in ignore))]
    if changed:
        raise ConfigError(f"output_dir '{out}' holds a run whose checkpoints ('{last}') were saved with another "
                          f"{'/'.join(shape_sections)} config ({', '.join(changed[:6])}); resuming cannot load them: "
                          "use another output_dir, or the saved config")


def _check_world_size(tag_dir: Path, config: dict) -> None:
    """Resuming on another number of ranks must keep the global batch (the launcher's WORLD_SIZE is this run's)."""
    from beit3.engine.resharding import check_global_batch
    from beit3.engine.tag_files import saved_layout

    try:
        saved_world, saved_micro = saved_layout(tag_dir)
    except (CheckpointError, FileNotFoundError):
        return  # an unusable newest tag: the engine falls back to an older one and says so
    world = int(os.environ.get("WORLD_SIZE", "1"))
    check_global_batch(saved_world, saved_micro, world, int(config.get("train", {}).get("micro_batches", 1)),
                       str(tag_dir))
