"""Named model configurations, timm style: ``create_model("beit3_base_patch16_224", drop_path_rate=0.1)``.

A registered builder takes a :class:`BEiT3Config` plus keyword arguments (e.g. ``num_classes`` for task heads) and
returns the model. Every name resolves to a size (tiny/base/large/giant) and a few fixed settings.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import inspect
from typing import Callable

from torch import nn

from .backbone import BEiT3, BEiT3Config

SIZES: dict[str, dict] = {
    "tiny": dict(embed_dim=64, depth=2, num_heads=4, ffn_dim=256, vocab_size=1000),
    "base": dict(embed_dim=768, depth=12, num_heads=12, ffn_dim=3072),
    "large": dict(embed_dim=1024, depth=24, num_heads=16, ffn_dim=4096),
    "giant": dict(embed_dim=1408, depth=40, num_heads=16, ffn_dim=6144),
}

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict]] = {}
_MODEL_CLASSES: dict[str, type] = {}


def register_model_class(cls: type) -> type:
    """Make ``cls`` known to :func:`model_class` (used by ``from_pretrained`` to rebuild a saved model)."""
    _MODEL_CLASSES[cls.__name__] = cls
    return cls


def model_class(name: str) -> type:
    if name not in _MODEL_CLASSES:
        raise KeyError(f"unknown model class '{name}'; known: {', '.join(sorted(_MODEL_CLASSES))}")
    return _MODEL_CLASSES[name]


def register_model(name: str, builder: Callable[..., nn.Module], size: str, **settings) -> None:
    """Register ``name``: ``builder(config, **kwargs)`` with the config of ``size`` updated by ``settings``."""
    if size not in SIZES:
        raise KeyError(f"unknown size '{size}'")
    _REGISTRY[name] = (builder, {**SIZES[size], **settings})


def registered_class(name: str) -> type | None:
    """The model class ``name`` builds when its builder is a class (every task model), else None (the backbones)."""
    builder = _REGISTRY[name][0] if name in _REGISTRY else None
    return builder if isinstance(builder, type) else None


def list_models(pattern: str = "*") -> list[str]:
    """Registered names matching a shell-style pattern."""
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_config(name: str, **overrides) -> BEiT3Config:
    """The :class:`BEiT3Config` of a registered name with ``overrides`` applied (unknown keys are errors)."""
    if name not in _REGISTRY:
        close = fnmatch.filter(_REGISTRY, f"*{name.split('_')[1] if '_' in name else name}*")[:8]
        raise KeyError(f"unknown model '{name}'. Similar names: {', '.join(close) or '-'}; see beit3.list_models()")
    _, settings = _REGISTRY[name]
    fields = {f.name for f in dataclasses.fields(BEiT3Config)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"create_model('{name}'): unknown override '{unknown[0]}'; known: {', '.join(sorted(fields))}")
    return BEiT3Config(**{**settings, **overrides})


def create_model(name: str, **overrides) -> nn.Module:
    """Build a registered model. Overrides are :class:`BEiT3Config` fields plus builder arguments such as
    ``num_classes``."""
    builder, _ = _REGISTRY.get(name, (None, None))
    fields = {f.name for f in dataclasses.fields(BEiT3Config)}
    config_overrides = {k: v for k, v in overrides.items() if k in fields}
    extra = {k: v for k, v in overrides.items() if k not in fields}
    config = model_config(name, **config_overrides)
    try:
        inspect.signature(builder).bind(config, **extra)
    except TypeError:
        known = sorted(fields | set(inspect.signature(builder).parameters) - {"config"})
        raise TypeError(f"create_model('{name}'): unknown override(s) {sorted(extra)}; known: {', '.join(known)}") from None
    return builder(config, **extra)


def _backbone(config: BEiT3Config) -> BEiT3:
    return BEiT3(config)


register_model_class(BEiT3)
register_model("beit3_tiny_patch8_32", _backbone, "tiny", img_size=32, patch_size=8)
for _size in ("base", "large"):
    for _res in (224, 384, 480, 768):
        register_model(f"beit3_{_size}_patch16_{_res}", _backbone, _size, img_size=_res, patch_size=16)
register_model("beit3_giant_patch14_224", _backbone, "giant", img_size=224, patch_size=14)
