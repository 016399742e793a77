"""The official BEiT-3 task models (heads on the shared backbone); importing this package registers them."""
from .captioning import BEiT3ForCaptioning, captioning_loss, unidirectional_mask
from .classification import BEiT3ForImageClassification
from .reasoning import BEiT3ForVisualReasoning
from .retrieval import BEiT3ForRetrieval, ITMHead, clip_loss, gather_with_grad
from .vqa import VQAV2_NUM_ANSWERS, BEiT3ForVisualQuestionAnswering, vqa_loss
from .zero_shot import pad_token_ids, retrieval_scores, zero_shot_classifier, zero_shot_logits

__all__ = [
    "BEiT3ForCaptioning",
    "BEiT3ForImageClassification",
    "BEiT3ForRetrieval",
    "BEiT3ForVisualQuestionAnswering",
    "BEiT3ForVisualReasoning",
    "ITMHead",
    "VQAV2_NUM_ANSWERS",
    "captioning_loss",
    "clip_loss",
    "gather_with_grad",
    "pad_token_ids",
    "retrieval_scores",
    "unidirectional_mask",
    "vqa_loss",
    "zero_shot_classifier",
    "zero_shot_logits",
]
