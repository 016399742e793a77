"""beit3: BEiT-3 "Imglish" pretraining, visual tokenizer training, fine-tuning and evaluation.

Importing it registers the BEiT-3 classes with transformers' Auto classes (``beit3.hf``)."""
from .models import (
    BEiT3,
    BEiT3Config,
    CheckpointError,
    create_model,
    from_pretrained,
    list_models,
    load_checkpoint,
    save_pretrained,
)
from .models.tasks.zero_shot import zero_shot_classifier, zero_shot_logits
from .processing import BEiT3Processor
from .factory import create_model_and_transforms, get_tokenizer
from .embeddings import extract_features, load_dual_encoder, zero_shot_retrieval
from . import hf

__version__ = "0.1.0"

__all__ = [
    "BEiT3",
    "BEiT3Config",
    "BEiT3Processor",
    "CheckpointError",
    "create_model",
    "create_model_and_transforms",
    "extract_features",
    "from_pretrained",
    "get_tokenizer",
    "hf",
    "list_models",
    "load_checkpoint",
    "load_dual_encoder",
    "save_pretrained",
    "zero_shot_classifier",
    "zero_shot_logits",
    "zero_shot_retrieval",
]
