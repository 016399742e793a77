"""Hugging Face ``transformers`` integration: a ``PretrainedConfig`` and ``PreTrainedModel`` wrappers of the beit3 models,
registered with ``AutoConfig`` / ``AutoModel`` / ``AutoModelFor...`` when ``beit3`` is imported.

A folder written by :func:`beit3.save_pretrained` is a transformers folder too (``config.json`` with
``model_type: beit3``, ``model.safetensors``), so ``AutoModel.from_pretrained(folder)`` and
``beit3.from_pretrained(folder)`` read the same files. A wrapper holds the beit3 model's own submodules under their own
names, so its state dict is the beit3 one (``beit3.*`` backbone keys, official head names) and HF's
``base_model_prefix`` rule holds: ``AutoModel`` loads the backbone out of any task folder.

Auto classes: ``AutoModel`` -> backbone, ``AutoModelForPreTraining`` -> masked data modeling,
``AutoModelForImageClassification``, ``AutoModelForVisualQuestionAnswering``, ``AutoModelForZeroShotImageClassification``
-> the retrieval dual encoder, ``AutoModelForImageTextToText`` -> captioning. NLVR2 has no Auto class:
``BEiT3HFForVisualReasoning.from_pretrained``.
"""
from __future__ import annotations

import inspect
from typing import Any, Optional

from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForImageTextToText,
    AutoModelForPreTraining,
    AutoModelForVisualQuestionAnswering,
    AutoModelForZeroShotImageClassification,
    PretrainedConfig,
    PreTrainedModel,
)

from .config import to_dict
from .factory import attach_processor
from .hub import resolve_pretrained
from .models import (
    BEiT3,
    BEiT3Config,
    BEiT3ForCaptioning,
    BEiT3ForImageClassification,
    BEiT3ForPretraining,
    BEiT3ForRetrieval,
    BEiT3ForVisualQuestionAnswering,
    BEiT3ForVisualReasoning,
    from_pretrained,
    load_checkpoint,
    read_state_dict,
)
from .models.checkpoint import (HF_MODEL_TYPE, TEXT_TOKENIZER_FILE, save_pretrained, saved_backbone_config,
                                saved_model_class)

# keyword arguments of transformers' from_pretrained that concern fetching, not the model
_HUB_KWARGS = {"cache_dir", "force_download", "local_files_only", "token", "proxies", "subfolder", "trust_remote_code",
               "use_safetensors", "torch_dtype", "dtype", "device_map", "low_cpu_mem_usage", "_from_auto",
               "_from_pipeline", "code_revision", "adapter_kwargs"}


class BEiT3HFConfig(PretrainedConfig):
    """``config.json`` of a beit3 folder as a transformers config: the beit3 model class, its backbone
    :class:`BEiT3Config` (``beit3_config``) and its constructor arguments (``init_kwargs``, e.g. ``num_classes``)."""

    model_type = HF_MODEL_TYPE

    def __init__(self, model_class: str = "BEiT3", beit3_config: Optional[dict] = None,
                 init_kwargs: Optional[dict] = None, **kwargs):
        legacy = kwargs.pop("config", None)  # folders written before beit3_config had the key "config"
        super().__init__(**kwargs)
        self.model_class = model_class
        saved = {"config": legacy} if beit3_config is None and legacy is not None else {"beit3_config": beit3_config or {}}
        self.beit3_config = to_dict(saved_backbone_config(saved))
        self.init_kwargs = dict(init_kwargs or {})

    def to_beit3_config(self) -> BEiT3Config:
        return saved_backbone_config({"beit3_config": self.beit3_config})

    @classmethod
    def from_model(cls, model: nn.Module) -> "BEiT3HFConfig":
        backbone = model if isinstance(model, BEiT3) else model.beit3
        return cls(model_class=type(model).__name__, beit3_config=to_dict(backbone.config),
                   init_kwargs=dict(getattr(model, "init_kwargs", {})), architectures=[type(model).__name__])


class BEiT3PreTrainedModel(PreTrainedModel):
    """A beit3 model (``wrapped_class``) as a transformers ``PreTrainedModel``: same state dict, same ``forward``; every
    other attribute (``encode_image``, ``generate_caption``, ...) is the wrapped model's. Loading and saving go through
    beit3's own checkpoint code (official key names, position interpolation, strict checks)."""

    config_class = BEiT3HFConfig
    base_model_prefix = "beit3"
    wrapped_class: type = BEiT3

    def __init__(self, config: BEiT3HFConfig, model: Optional[nn.Module] = None, **init_kwargs):
        super().__init__(config)
        if model is None:
            saved = config.init_kwargs if config.model_class == self.wrapped_class.__name__ else {}
            model = self.wrapped_class(config.to_beit3_config(), **{**saved, **init_kwargs})
        # not a submodule: its children, parameters and buffers are this module's own, under the same names (set
        # directly: __getattr__ already answers for them through the wrapped model)
        self.__dict__["wrapped"] = model
        self._modules.update(model._modules)
        self._parameters.update(model._parameters)
        self._buffers.update(model._buffers)
        self._non_persistent_buffers_set.update(model._non_persistent_buffers_set)
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """Nothing: the beit3 constructors initialise every weight (official or configured scheme)."""

    def forward(self, *args, **kwargs) -> Any:
        return self.wrapped(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            wrapped = self.__dict__.get("wrapped")
            if wrapped is None or name.startswith("__"):
                raise
            return getattr(wrapped, name)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, config: Any = None,
                        revision: Optional[str] = None, **kwargs) -> "BEiT3PreTrainedModel":
        """Load a beit3 folder (local or ``org/name`` on the hub, through its cache). Into the class it was saved as,
        strictly; into another (e.g. the backbone out of a task folder, or a task model out of a pretraining export),
        the fitting keys, reporting the rest. Extra keyword arguments are the wrapped class's constructor arguments."""
        if model_args:
            raise TypeError(f"{cls.__name__}.from_pretrained takes no positional model arguments, got {model_args}")
        for key in _HUB_KWARGS & set(kwargs):
            kwargs.pop(key)
        allowed = set(inspect.signature(cls.wrapped_class.__init__).parameters) - {"self", "config"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(f"{cls.__name__}.from_pretrained: unknown argument(s) {unknown}; "
                            f"{cls.wrapped_class.__name__} takes {sorted(allowed) or 'none'}")
        directory = resolve_pretrained(pretrained_model_name_or_path, revision)
        saved = saved_model_class(directory)
        if saved == cls.wrapped_class.__name__ and not kwargs:
            model = from_pretrained(directory)
        else:
            hf_config = config if isinstance(config, BEiT3HFConfig) else BEiT3HFConfig.from_pretrained(str(directory))
            model = cls.wrapped_class(hf_config.to_beit3_config(), **kwargs)
            load_checkpoint(model, read_state_dict(directory))
        if (directory / TEXT_TOKENIZER_FILE).is_file() and isinstance(model, BEiT3ForRetrieval):
            attach_processor(model, directory)
        return cls(BEiT3HFConfig.from_model(model), model=model)

    def save_pretrained(self, save_directory, text_tokenizer=None, **kwargs) -> None:
        """beit3's :func:`~beit3.models.save_pretrained` (config.json, model.safetensors, model card, and the text
        tokenizer of the model's processor or ``text_tokenizer`` as beit3.spm); transformers'
        serialisation options (``safe_serialization``, ``max_shard_size``, ...) are accepted and not needed."""
        if kwargs.get("push_to_hub"):
            raise NotImplementedError("save_pretrained(push_to_hub=True) is not supported: save the folder, then "
                                      "upload it with huggingface_hub.upload_folder")
        if text_tokenizer is None and getattr(getattr(self.wrapped, "processor", None), "tokenizer", None) is not None:
            text_tokenizer = self.wrapped.processor.tokenizer.spm_path
        save_pretrained(self.wrapped, save_directory, text_tokenizer=text_tokenizer)


class BEiT3HFModel(BEiT3PreTrainedModel):
    """The backbone (``AutoModel``)."""
    wrapped_class = BEiT3


class BEiT3HFForPreTraining(BEiT3PreTrainedModel):
    """Masked data modeling heads (``AutoModelForPreTraining``)."""
    wrapped_class = BEiT3ForPretraining


class BEiT3HFForImageClassification(BEiT3PreTrainedModel):
    """ImageNet-style classification (``AutoModelForImageClassification``)."""
    wrapped_class = BEiT3ForImageClassification


class BEiT3HFForVisualQuestionAnswering(BEiT3PreTrainedModel):
    """VQAv2 (``AutoModelForVisualQuestionAnswering``)."""
    wrapped_class = BEiT3ForVisualQuestionAnswering


class BEiT3HFForRetrieval(BEiT3PreTrainedModel):
    """The retrieval dual encoder (``AutoModelForZeroShotImageClassification``: ``encode_image`` / ``encode_text``)."""
    wrapped_class = BEiT3ForRetrieval


class BEiT3HFForCaptioning(BEiT3PreTrainedModel):
    """Captioning (``AutoModelForImageTextToText``)."""
    wrapped_class = BEiT3ForCaptioning


class BEiT3HFForVisualReasoning(BEiT3PreTrainedModel):
    """NLVR2 (no transformers Auto class: load it with this class)."""
    wrapped_class = BEiT3ForVisualReasoning


AUTO_CLASSES = (
    (AutoModel, BEiT3HFModel),
    (AutoModelForPreTraining, BEiT3HFForPreTraining),
    (AutoModelForImageClassification, BEiT3HFForImageClassification),
    (AutoModelForVisualQuestionAnswering, BEiT3HFForVisualQuestionAnswering),
    (AutoModelForZeroShotImageClassification, BEiT3HFForRetrieval),
    (AutoModelForImageTextToText, BEiT3HFForCaptioning),
)


def register_auto_classes() -> None:
    """Make ``model_type: beit3`` known to ``AutoConfig`` and each Auto class above (idempotent)."""
    AutoConfig.register(HF_MODEL_TYPE, BEiT3HFConfig, exist_ok=True)
    for auto, wrapper in AUTO_CLASSES:
        auto.register(BEiT3HFConfig, wrapper, exist_ok=True)


register_auto_classes()
