"""Evaluation metrics of the BEiT-3 tasks: ImageNet top-k, NLVR2 accuracy, VQAv2 accuracy, retrieval recall@K,
captioning BLEU / CIDEr-D."""
from .captioning import bleu, caption_scores, cider_d, ptb_tokenize, pycocoevalcap_available
from .classification import accuracy, topk_accuracy
from .retrieval import retrieval_recall
from .vqa import normalize_vqa_answer, vqa_accuracy, vqa_accuracy_single, vqa_soft_score

__all__ = [
    "accuracy",
    "bleu",
    "caption_scores",
    "cider_d",
    "normalize_vqa_answer",
    "ptb_tokenize",
    "pycocoevalcap_available",
    "retrieval_recall",
    "topk_accuracy",
    "vqa_accuracy",
    "vqa_accuracy_single",
    "vqa_soft_score",
]
