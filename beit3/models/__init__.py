"""BEiT-3 models: the Multiway Transformer backbone, its registry of named sizes and checkpoint I/O."""
from .backbone import BEiT3, BEiT3Config
from .checkpoint import CheckpointError, LoadReport, from_pretrained, load_checkpoint, read_state_dict, save_pretrained
from .pretraining import BEiT3ForPretraining, load_pretraining_model
from .registry import create_model, list_models, model_config, register_model, register_model_class
from .tasks import (
    BEiT3ForCaptioning,
    BEiT3ForImageClassification,
    BEiT3ForRetrieval,
    BEiT3ForVisualQuestionAnswering,
    BEiT3ForVisualReasoning,
)

__all__ = [
    "BEiT3",
    "BEiT3Config",
    "BEiT3ForCaptioning",
    "BEiT3ForImageClassification",
    "BEiT3ForPretraining",
    "BEiT3ForRetrieval",
    "BEiT3ForVisualQuestionAnswering",
    "BEiT3ForVisualReasoning",
    "CheckpointError",
    "LoadReport",
    "create_model",
    "from_pretrained",
    "list_models",
    "load_pretraining_model",
    "load_checkpoint",
    "model_config",
    "read_state_dict",
    "register_model",
    "register_model_class",
    "save_pretrained",
]
