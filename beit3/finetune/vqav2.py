"""VQAv2: soft-score BCE (``vqa_loss``) on ``BEiT3ForVisualQuestionAnswering``; evaluation by the VQA score of the
argmax answer and the test-dev submission file ``[{"question_id", "answer"}]``."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Callable, Sequence

import torch
from torch import nn

from beit3.jsonl import read_jsonl
from beit3.metrics import vqa_soft_score
from beit3.models.tasks import vqa_loss

from .data import open_image
from .task import EvalResult, FinetuneTask, TaskContext

ANSWER_FILE = "answer2label.txt"


def read_answer2label(root: str | Path) -> list[str]:
    """Answers by label from ``root/answer2label.txt`` (lines ``{"answer", "label"}``); labels must be 0..N-1."""
    path = Path(root) / ANSWER_FILE
    entries = read_jsonl(path)
    answers: dict[int, str] = {}
    for number, entry in enumerate(entries, 1):
        if "answer" not in entry or "label" not in entry:
            raise ValueError(f"'{path}' line {number}: expected keys 'answer' and 'label', got {sorted(entry)}")
        answers[int(entry["label"])] = str(entry["answer"])
    if sorted(answers) != list(range(len(answers))):
        raise ValueError(f"'{path}': labels must be 0..{len(answers) - 1} without gaps")
    return [answers[i] for i in range(len(answers))]


class VQAv2Task(FinetuneTask):
    """Items ``{image_path, text_segment, labels, scores, qid}``; test-dev items have empty ``labels``."""

    name = "vqav2"
    default_model = "beit3_base_patch16_480_vqav2"
    metric = "vqa_score"
    indexes = {"train": ["vqa.train.jsonl", "vqa.trainable_val.jsonl"], "val": "vqa.rest_val.jsonl",
               "test": "vqa.test-dev.jsonl"}
    required_keys = ("image_path", "text_segment", "qid")

    def __init__(self):
        self._answers: dict[Path, list[str]] = {}

    def answers(self, ctx: TaskContext) -> list[str]:
        if ctx.root not in self._answers:
            self._answers[ctx.root] = read_answer2label(ctx.root)
        return self._answers[ctx.root]

    def model_kwargs(self, ctx: TaskContext, train_items: Sequence[dict]) -> dict:
        return {"num_classes": len(self.answers(ctx))}

    def _sample(self, ctx: TaskContext, transform: Callable, item: dict) -> dict:
        tokens, mask = ctx.text(item["text_segment"])
        target = torch.zeros(len(self.answers(ctx)))
        labels, scores = item.get("labels") or [], item.get("scores") or []
        if len(labels) != len(scores):
            raise ValueError(f"VQA item qid={item['qid']}: {len(labels)} labels but {len(scores)} scores")
        for label, score in zip(labels, scores):
            target[int(label)] = float(score)
        return {"image": transform(open_image(ctx.root, item["image_path"])), "question": tokens, "padding_mask": mask,
                "target": target, "qid": int(item["qid"]), "has_answers": bool(labels)}

    def train_sample(self, ctx: TaskContext, transform: Callable, item: dict, rng: random.Random) -> dict:
        return self._sample(ctx, transform, item)

    def eval_sample(self, ctx: TaskContext, transform: Callable, item: dict, rng: random.Random) -> dict:
        return self._sample(ctx, transform, item)

    def training_loss(self, model: nn.Module, batch: dict, ctx: TaskContext) -> tuple[torch.Tensor, dict]:
        logits = model(image=batch["image"], question=batch["question"], padding_mask=batch["padding_mask"])
        loss = vqa_loss(logits, batch["target"])
        return loss, {"num_samples": logits.shape[0], "train_vqa_score": vqa_soft_score(logits.detach(), batch["target"])}

    @torch.no_grad()
    def predict(self, model: nn.Module, batch: dict, ctx: TaskContext) -> list[dict]:
        logits = model(image=batch["image"], question=batch["question"], padding_mask=batch["padding_mask"])
        pred = logits.argmax(dim=1)
        picked = batch["target"].gather(1, pred[:, None]).squeeze(1)
        return [{"qid": int(q), "label": int(p), "score": float(s), "has_answers": bool(h)}
                for q, p, s, h in zip(batch["qid"], pred.cpu(), picked.cpu(), batch["has_answers"])]

    def score(self, model: nn.Module, records: list[dict], ctx: TaskContext, split: str) -> EvalResult:
        answers = self.answers(ctx)
        submission = [{"question_id": r["qid"], "answer": answers[r["label"]]} for r in records]
        metrics = {"num_questions": float(len(records))}
        scored = [r["score"] for r in records if r["has_answers"]]
        if scored:  # test-dev has no answers: submission only
            metrics["vqa_score"] = 100.0 * sum(scored) / len(scored)
        return EvalResult(metrics, submission, "vqa_submission")
