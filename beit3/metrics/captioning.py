"""Captioning metrics BLEU-1..4 and CIDEr-D computing what ``pycocoevalcap`` computes, in pure Python.

Captions are tokenised by :func:`ptb_tokenize`, a simple stand-in for the Stanford PTB tokenizer that pycocoevalcap
runs in Java (lowercase, clitics split off, punctuation removed). When pycocoevalcap and Java are installed,
``caption_scores(..., backend="pycocoevalcap")`` (or ``"auto"``) uses them instead. Scores are on pycocoevalcap's
scale (BLEU in [0, 1], CIDEr-D around 1.3 for a good COCO model; papers report x100).
"""
from __future__ import annotations

import importlib.util
import math
import re
import shutil
from collections import Counter
from typing import Hashable, Mapping, Sequence

MAX_NGRAM = 4
CIDER_SIGMA = 6.0
CIDER_SCALE = 10.0
# pycocoevalcap's guards against empty counts in BLEU.
_BLEU_TINY = 1e-15
_BLEU_SMALL = 1e-9
_CLITICS = re.compile(r"(\w)(n't|'s|'re|'ve|'ll|'d|'m)\b")
_CLITIC_TOKENS = {"n't", "'s", "'re", "'ve", "'ll", "'d", "'m"}
_NON_WORD = re.compile(r"[^\w\s'.]|\.(?!\d)|(?<!\d)\.")  # keeps the point of decimal numbers

Captions = Mapping[Hashable, Sequence[str]]


def ptb_tokenize(text: str) -> str:
    """Lowercased, punctuation-free, space-separated tokens (clitics such as ``n't`` and ``'s`` split off; decimal
    numbers kept whole)."""
    text = _CLITICS.sub(r"\1 \2", _NON_WORD.sub(" ", text.lower()))
    tokens = (w if w in _CLITIC_TOKENS else w.strip("'") for w in text.split())
    return " ".join(t for t in tokens if t)


def _ngrams(words: Sequence[str], n: int = MAX_NGRAM) -> Counter:
    return Counter(tuple(words[i : i + k]) for k in range(1, n + 1) for i in range(len(words) - k + 1))


def _check(predictions: Captions, references: Captions) -> list[Hashable]:
    keys = list(predictions)
    if not keys:
        raise ValueError("no predictions to score")
    for key in keys:
        if key not in references or not references[key]:
            raise KeyError(f"no reference captions for id {key!r}")
        if len(predictions[key]) != 1:
            raise ValueError(f"id {key!r} must have exactly one predicted caption, got {len(predictions[key])}")
    return keys


def bleu(predictions: Captions, references: Captions, n: int = MAX_NGRAM) -> list[float]:
    """Corpus BLEU-1..n as pycocoevalcap's ``Bleu`` ("closest" reference length, one brevity penalty over the
    corpus). Inputs map id -> list of tokenised captions (one prediction per id)."""
    keys = _check(predictions, references)
    correct, guess = [0] * n, [0] * n
    test_len = ref_len = 0
    for key in keys:
        words = predictions[key][0].split()
        refs = [r.split() for r in references[key]]
        max_ref_counts: Counter = Counter()
        for ref in refs:
            max_ref_counts |= _ngrams(ref, n)
        test_len += len(words)
        ref_len += min((abs(len(r) - len(words)), len(r)) for r in refs)[1]
        for gram, count in _ngrams(words, n).items():
            correct[len(gram) - 1] += min(count, max_ref_counts[gram])
        for k in range(n):
            guess[k] += max(0, len(words) - k)
    scores, product = [], 1.0
    for k in range(n):
        product *= (correct[k] + _BLEU_TINY) / (guess[k] + _BLEU_SMALL)
        scores.append(product ** (1.0 / (k + 1)))
    ratio = (test_len + _BLEU_TINY) / (ref_len + _BLEU_SMALL)
    if ratio < 1:
        scores = [s * math.exp(1 - 1 / ratio) for s in scores]
    return scores


def _tfidf(counts: Counter, doc_freq: Counter, log_num_docs: float) -> tuple[list[dict], list[float], int]:
    vectors: list[dict] = [{} for _ in range(MAX_NGRAM)]
    norms = [0.0] * MAX_NGRAM
    for gram, tf in counts.items():
        k = len(gram) - 1
        vectors[k][gram] = tf * (log_num_docs - math.log(max(1.0, doc_freq[gram])))
        norms[k] += vectors[k][gram] ** 2
    # pycocoevalcap measures the length for the penalty in bigrams (its ``n == 1`` test).
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vectors, [math.sqrt(v) for v in norms], length


def cider_d(predictions: Captions, references: Captions) -> tuple[float, list[float]]:
    """CIDEr-D as pycocoevalcap's ``Cider``: tf-idf n-gram vectors (n = 1..4, document frequency over the reference
    sets), clipped similarity, gaussian length penalty (sigma 6), averaged over n and references, x10.
    Returns (corpus mean, per-id scores)."""
    keys = _check(predictions, references)
    ref_counts = [[_ngrams(r.split()) for r in references[k]] for k in keys]
    doc_freq: Counter = Counter()
    for counts in ref_counts:
        doc_freq.update({gram for c in counts for gram in c})
    log_num_docs = math.log(float(len(keys)))
    scores = []
    for key, counts in zip(keys, ref_counts):
        vec, norm, length = _tfidf(_ngrams(predictions[key][0].split()), doc_freq, log_num_docs)
        total = 0.0
        for ref in counts:
            vec_ref, norm_ref, length_ref = _tfidf(ref, doc_freq, log_num_docs)
            penalty = math.exp(-((length - length_ref) ** 2) / (2 * CIDER_SIGMA**2))
            for k in range(MAX_NGRAM):
                value = sum(min(v, vec_ref[k].get(g, 0.0)) * vec_ref[k].get(g, 0.0) for g, v in vec[k].items())
                if norm[k] != 0 and norm_ref[k] != 0:
                    value /= norm[k] * norm_ref[k]
                total += value * penalty
        scores.append(total / MAX_NGRAM / len(counts) * CIDER_SCALE)
    return sum(scores) / len(scores), scores


def pycocoevalcap_available() -> bool:
    """True when pycocoevalcap is importable and a ``java`` executable is on PATH."""
    return importlib.util.find_spec("pycocoevalcap") is not None and shutil.which("java") is not None


def _pycocoevalcap_scores(predictions: Captions, references: Captions) -> dict[str, float]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items() if k in predictions})
    res = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in predictions.items()})
    bleus, _ = Bleu(MAX_NGRAM).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {**{f"Bleu_{k + 1}": float(b) for k, b in enumerate(bleus)}, "CIDEr": float(cider)}


def caption_scores(predictions: Mapping[Hashable, str], references: Captions, backend: str = "auto") -> dict[str, float]:
    """BLEU-1..4 and CIDEr-D of raw captions: ``predictions`` id -> caption, ``references`` id -> captions.

    ``backend``: ``"python"`` (this module), ``"pycocoevalcap"`` (needs it and Java) or ``"auto"`` (pycocoevalcap
    when available). Keys follow pycocoevalcap: ``Bleu_1`` .. ``Bleu_4``, ``CIDEr``.
    """
    if backend not in ("auto", "python", "pycocoevalcap"):
        raise ValueError(f"backend must be 'auto', 'python' or 'pycocoevalcap', got {backend!r}")
    wrapped = {k: [v] for k, v in predictions.items()}
    use_java = backend == "pycocoevalcap" or (backend == "auto" and pycocoevalcap_available())
    if use_java:
        if not pycocoevalcap_available():
            raise RuntimeError("backend='pycocoevalcap' needs `pip install pycocoevalcap` and Java on PATH")
        return _pycocoevalcap_scores(wrapped, references)
    tokenised = {k: [ptb_tokenize(v)] for k, v in predictions.items()}
    refs = {k: [ptb_tokenize(r) for r in references[k]] for k in predictions if k in references}
    bleus = bleu(tokenised, refs)
    return {**{f"Bleu_{k + 1}": b for k, b in enumerate(bleus)}, "CIDEr": cider_d(tokenised, refs)[0]}
