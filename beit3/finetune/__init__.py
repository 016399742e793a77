"""Fine-tuning of BEiT-3 on the official downstream tasks: one module per task (dataset adapter, loss, evaluation,
inference), the shared data plumbing and evaluation loop. The run wiring (configs, tools) is in
:mod:`beit3.cli.finetune`."""
from .captioning import CaptioningOptions, CaptioningTask, mask_caption, read_references
from .data import SampleDataset, TrainBatches, eval_batches, read_index
from .evaluation import EvalCallback, evaluate, write_predictions
from .imagenet import ClassificationOptions, ImageNetTask
from .nlvr2 import NLVR2Task
from .retrieval import RetrievalOptions, RetrievalTask
from .task import EvalResult, FinetuneObjective, FinetuneTask, TaskContext, TrainProgress
from .vqav2 import VQAv2Task, read_answer2label

TASKS: dict[str, FinetuneTask] = {
    "imagenet": ImageNetTask(),
    "vqav2": VQAv2Task(),
    "nlvr2": NLVR2Task(),
    "coco_retrieval": RetrievalTask("coco_retrieval", "coco_retrieval"),
    "flickr30k": RetrievalTask("flickr30k", "flickr30k"),
    "coco_captioning": CaptioningTask(),
}

__all__ = [
    "CaptioningOptions", "CaptioningTask", "ClassificationOptions", "EvalCallback", "EvalResult", "FinetuneObjective",
    "FinetuneTask", "ImageNetTask", "NLVR2Task", "RetrievalOptions", "RetrievalTask", "SampleDataset", "TASKS",
    "TaskContext", "TrainBatches", "TrainProgress", "VQAv2Task", "eval_batches", "evaluate", "mask_caption", "read_answer2label",
    "read_index", "read_references", "write_predictions",
]
