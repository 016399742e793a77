"""beit3: BEiT-3 "Imglish" pretraining, visual tokenizer training, fine-tuning and evaluation."""
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

__version__ = "0.1.0"

__all__ = [
    "BEiT3",
    "BEiT3Config",
    "CheckpointError",
    "create_model",
    "from_pretrained",
    "list_models",
    "load_checkpoint",
    "save_pretrained",
]
