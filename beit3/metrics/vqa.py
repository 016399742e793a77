"""VQAv2 accuracy as the official evaluation computes it (answer normalisation of ``vqaEval.py``), and the soft
score of the argmax used during fine-tuning."""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import torch

# Official vqaEval.py tables: contractions written without apostrophe, number words, articles, punctuation.
CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't", "dont": "don't",
    "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd", "howll": "how'll",
    "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've", "isnt": "isn't", "itd": "it'd",
    "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't",
    "mustve": "must've", "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've",
    "she'dve": "she'd've", "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've",
    "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's", "whereve": "where've",
    "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've",
    "wouldnt": "wouldn't", "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've",
    "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}
NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
    "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES = {"a", "an", "the"}
PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# The official code passes re.UNICODE (32) as the ``count`` of the period substitution; kept for identical output.
_PERIOD_STRIP_COUNT = re.UNICODE


def _strip_punctuation(text: str) -> str:
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _normalise_words(text: str) -> str:
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(answer: str) -> str:
    """Official answer normalisation: punctuation, number words -> digits, articles dropped, contractions."""
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _normalise_words(_strip_punctuation(answer))


def vqa_accuracy_single(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy of one answer against the (10) human answers, in [0, 1]: mean over the leave-one-out
    subsets of min(1, #matches / 3). As in the official code, answers are normalised only when the humans disagree."""
    if not answers:
        raise ValueError("vqa_accuracy needs at least one human answer per question")
    prediction = prediction.replace("\n", " ").replace("\t", " ").strip()
    answers = list(answers)
    if len(set(answers)) > 1:
        answers = [normalize_vqa_answer(a) for a in answers]
        prediction = normalize_vqa_answer(prediction)
    matches = sum(a == prediction for a in answers)
    per_subset = [min(1.0, (matches - (a == prediction)) / 3.0) for a in answers]
    return sum(per_subset) / len(per_subset)


def vqa_accuracy(predictions: Mapping, answers: Mapping) -> float:
    """Mean official VQA accuracy in percent; ``predictions`` maps question id -> answer string, ``answers``
    question id -> list of human answers."""
    missing = [q for q in predictions if q not in answers]
    if missing:
        raise KeyError(f"no human answers for question id(s) {missing[:5]}")
    if not predictions:
        raise ValueError("vqa_accuracy needs at least one prediction")
    return 100.0 * sum(vqa_accuracy_single(p, answers[q]) for q, p in predictions.items()) / len(predictions)


def vqa_soft_score(logits: torch.Tensor, target_scores: torch.Tensor) -> float:
    """Fine-tuning metric of the official code: mean soft score (0..1 per question) of the argmax answer, in
    percent."""
    if logits.shape != target_scores.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target_scores {tuple(target_scores.shape)} must match")
    picked = target_scores.gather(1, logits.argmax(dim=1, keepdim=True))
    return picked.float().mean().item() * 100.0
