"""The demo report (``tools/demo.sh`` → ``tools/demo_report.py``): results table of the fine-tuning runs from scratch
and from the demo-pretrained model next to chance / trivial baselines, plus plots.

Layout read under the demo run folder (``runs/demo``)::

    data/                         tools/make_demo_data.py output (indexes, images, beit3.spm)
    tokenizer/codebook_usage.png  tools/train_tokenizer.py
    pretrain/log.jsonl            tools/pretrain.py
    ft/<task>_<init>/             tools/finetune.py, init in {scratch, pretrained}: metrics.json, log.jsonl, best/

Written: ``results.json``, ``results.md``, ``pretrain_loss.png``, ``finetune_loss.png``, ``retrieval_examples.png``,
``caption_examples.png``.
"""
from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Optional

from beit3.demo.plots import gap_keys, image_grid, plot_logs, read_log
from beit3.jsonl import read_jsonl

PathLike = str | Path
INITS = ("scratch", "pretrained")
# (row name, fine-tuning run, metric key in metrics.json, baseline kind)
ROWS = (
    ("retrieval R@1 text→image (%)", "retrieval", "ir_r1", "retrieval_r1"),
    ("retrieval R@1 image→text (%)", "retrieval", "tr_r1", "retrieval_tr_r1"),
    ("retrieval mean of R@1/5/10 both ways (%)", "retrieval", "average_score", "retrieval_mean"),
    ("VQA accuracy (VQA score, %)", "vqav2", "vqa_score", "vqa_prior"),
    ("captioning CIDEr", "captioning", "CIDEr", "caption_constant"),
)
PRETRAIN_KEYS = ("loss", "loss_image", "loss_text", "loss_pair_image", "loss_pair_text", "loss_itc", "loss_itm")




def run_metrics(run: Path, which: str = "final") -> Optional[dict]:
    """``metrics.json`` of a fine-tuning run: the ``final`` (last step) or ``best`` evaluation's metrics."""
    path = run / "metrics.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    entry = data.get(which) or {}
    return {**entry.get("metrics", {}), "_split": entry.get("split"), "_step": entry.get("step")}


def seed_runs(run_dir: PathLike, task: str, init: str) -> list[Path]:
    """The fine-tuning runs of one task and init, one per seed: ``ft/<task>_<init>_seed<K>`` in seed order."""
    found = Path(run_dir, "ft").glob(f"{task}_{init}_seed*")
    runs = [p for p in found if p.name.rsplit("_seed", 1)[1].isdigit()]
    return sorted(runs, key=lambda p: int(p.name.rsplit("_seed", 1)[1]))


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var)


def _top_answer(items: list[dict]) -> int:
    """Label with the highest summed soft score over ``items``."""
    total: Counter = Counter()
    for item in items:
        for label, score in zip(item["labels"], item["scores"]):
            total[label] += score
    return total.most_common(1)[0][0]


def vqa_question_prior_score(data_root: PathLike, split: str = "val") -> float:
    """VQA score (%) of a blind model: each question gets the top training answer of the same question text (the
    top answer over all training questions for a question never seen in training). Fine-tuning must beat this to
    show that it looks at the image; on the demo data it is ~2x the majority answer (yes/no and count priors)."""
    root = Path(data_root)
    train = [i for i in read_jsonl(root / "vqa.train.jsonl") if i["labels"]]
    by_question: dict[tuple, list[dict]] = {}
    for item in train:
        by_question.setdefault(tuple(item["text_segment"]), []).append(item)
    fallback = _top_answer(train)
    prior = {q: _top_answer(group) for q, group in by_question.items()}
    items = read_jsonl(root / f"vqa.{split}.jsonl")
    hits = (dict(zip(i["labels"], i["scores"])).get(prior.get(tuple(i["text_segment"]), fallback), 0.0) for i in items)
    return 100.0 * sum(hits) / max(1, len(items))


def caption_constant_cider(data_root: PathLike, split: str = "val") -> float:
    """CIDEr of giving every image the most frequent training caption (a language-only baseline)."""
    from beit3.finetune.captioning import read_references
    from beit3.metrics import caption_scores

    root = Path(data_root)
    caps = Counter(c for r in read_jsonl(root / "captions.jsonl") if r["split"] == "train" for c in r["captions"])
    constant = caps.most_common(1)[0][0]
    refs = read_references(root / f"coco_karpathy_{split}_gt.json")
    return float(caption_scores({k: constant for k in refs}, refs, backend="python")["CIDEr"])


def random_ranking_recall(captions_per_image: list[int], ks: tuple[int, ...] = (1, 5, 10)) -> dict[str, float]:
    """Expected recall@K (%) of a random ranking, both ways: text→image K / images; image→text 1 - C(T-n, K) / C(T, K)
    for an image with n of the T captions (at least one of its captions in a random top K)."""
    images, texts = len(captions_per_image), sum(captions_per_image)
    out = {}
    for k in ks:
        out[f"ir_r{k}"] = 100.0 * min(k, images) / images
        top = min(k, texts)
        out[f"tr_r{k}"] = 100.0 * sum(1.0 - math.comb(texts - n, top) / math.comb(texts, top)
                                      for n in captions_per_image) / images
    return out


def baselines(data_root: PathLike, split: str = "val") -> dict[str, float]:
    """Chance / trivial baselines on ``split``: retrieval R@1 of a random ranking (text→image: 1 / images;
    image→text: at least one of the image's captions ranked first) and its mean over R@1/5/10 both ways, VQA answer
    from the question alone, captioning constant caption."""
    out: dict[str, float] = {}
    root = Path(data_root)
    items = read_jsonl(root / f"coco_retrieval.{split}.jsonl") if (root / f"coco_retrieval.{split}.jsonl").is_file() else []
    if items:
        chance = random_ranking_recall(list(Counter(i["image_id"] for i in items).values()))
        out["retrieval_r1"] = chance["ir_r1"]
        out["retrieval_tr_r1"] = chance["tr_r1"]
        out["retrieval_mean"] = sum(chance.values()) / len(chance)
    if (root / "vqa.train.jsonl").is_file():
        out["vqa_prior"] = vqa_question_prior_score(root, split)
    if (root / "captions.jsonl").is_file() and (root / f"coco_karpathy_{split}_gt.json").is_file():
        out["caption_constant"] = caption_constant_cider(root, split)
    return out


def results_table(run_dir: PathLike, data_root: Optional[PathLike] = None, which: str = "final") -> dict:
    """Rows ``{task, metric, scratch, pretrained, baseline, ...}`` from ``run_dir/ft/<task>_<init>_seed<K>``: per init
    the mean over seeds, ``<init>_std`` (sample std), ``<init>_values`` and ``<init>_seeds``; ``margin`` = pretrained
    minus scratch and ``beyond_noise`` = the margin is larger than both standard deviations (with >= 2 seeds each)."""
    run_dir = Path(run_dir)
    data_root = Path(data_root) if data_root else run_dir / "data"
    base = baselines(data_root)
    rows = []
    for name, task, key, kind in ROWS:
        row = {"task": task, "metric": name, "key": key, "baseline": base.get(kind), "baseline_kind": kind}
        for init in INITS:
            found = [run_metrics(run, which) for run in seed_runs(run_dir, task, init)]
            values = [float(m[key]) for m in found if m is not None and key in m]
            mean, std = mean_std(values) if values else (None, None)
            row.update({init: mean, f"{init}_std": std, f"{init}_values": values, f"{init}_seeds": len(values),
                        f"{init}_step": next((m["_step"] for m in found if m), None)})
        if row["scratch"] is not None and row["pretrained"] is not None:
            row["margin"] = row["pretrained"] - row["scratch"]
            enough = min(row["scratch_seeds"], row["pretrained_seeds"]) >= 2
            row["beyond_noise"] = enough and row["margin"] > max(row["scratch_std"], row["pretrained_std"])
        rows.append(row)
    return {"which": which, "split": "val", "rows": rows}


EVAL_COLUMNS = (  # (header, log key, scale): the held-out evaluation rows of the pretraining log
    ("pair-MLM own", "eval_acc_pair_text", 100), ("pair-MLM other image", "eval_acc_pair_text_other", 100),
    ("grounding gap MLM", "eval_grounding_gap_text", 100), ("grounding gap MIM", "eval_grounding_gap_image", 100),
    ("image MIM acc", "eval_acc_image", 100), ("text MLM acc", "eval_acc_text", 100),
)


def probe_classes(records: list[dict]) -> list[str]:
    """The word classes of the grounding probe in a log's ``eval_probe_<class>_gap`` keys, in order of appearance."""
    found = [k[len("eval_probe_"):-len("_gap")] for r in records for k in r
             if k.startswith("eval_probe_") and k.endswith("_gap")]
    return list(dict.fromkeys(found))


def pretraining_eval_markdown(records: list[dict]) -> str:
    """The ``eval_*`` rows of a pretraining log as a table (accuracies and gaps in points), one line per evaluation:
    the stream metrics, then own / other / gap of every probe word class."""
    rows = [r for r in records if any(k.startswith("eval_") for k in r)]
    probes = [(f"{c} {part}", f"eval_probe_{c}_{key}", 100) for c in probe_classes(rows)
              for part, key in (("own", "acc"), ("other", "acc_other"), ("gap", "gap"))]
    columns = [c for c in EVAL_COLUMNS + tuple(probes) if any(c[1] in r for r in rows)]
    if not rows or not columns:
        return ""
    lines = ["| step | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in rows:
        cells = [f"{scale * r[key]:+.1f}" if "gap" in key else f"{scale * r[key]:.1f}" if key in r else "—"
                 for _, key, scale in columns]
        lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


_BASELINE_NAMES = {"retrieval_r1": "chance (1 / images)", "retrieval_tr_r1": "chance (captions / texts)",
                   "retrieval_mean": "chance (random ranking)",
                   "vqa_prior": "answer from the question alone", "caption_constant": "most frequent caption"}


def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _cell(row: dict, init: str, digits: int) -> str:
    if row[init] is None:
        return "—"
    if row[f"{init}_seeds"] > 1:
        return f"{row[init]:.{digits}f} ± {row[f'{init}_std']:.{digits}f}"
    return f"{row[init]:.{digits}f}"


def markdown(table: dict, extra: str = "") -> str:
    seeds = max((r[f"{i}_seeds"] for r in table["rows"] for i in INITS), default=0)
    lines = ["| task | metric | scratch | pretrained | chance / baseline |" + (" beyond seed noise |" if seeds > 1 else ""),
             "|---|---|---|---|---|" + ("---|" if seeds > 1 else "")]
    for r in table["rows"]:
        digits = 3 if r["key"] == "CIDEr" else 1
        base = f"{_fmt(r['baseline'], digits)} ({_BASELINE_NAMES.get(r['baseline_kind'], r['baseline_kind'])})"
        verdict = ("yes" if r.get("beyond_noise") else "no") if seeds > 1 else ""
        lines.append(f"| {r['task']} | {r['metric']} | {_cell(r, 'scratch', digits)} | {_cell(r, 'pretrained', digits)} "
                     f"| {base} |" + (f" {verdict} |" if seeds > 1 else ""))
    if seeds > 1:
        lines.append(f"\nMean ± sample standard deviation over {seeds} fine-tuning seeds; \"beyond seed noise\": "
                     "pretrained minus scratch is larger than the standard deviation of either.")
    return "\n".join(lines) + "\n" + (f"\n{extra}\n" if extra else "")


def retrieval_examples(model_dir: PathLike, data_root: PathLike, out: PathLike, num_queries: int = 6,
                       top_k: int = 3, split: str = "val") -> Path:
    """PNG grid: query captions of the held-out split and the top-k images the retrieval model ranks for them (green
    frame: the query's own image)."""
    import torch
    from PIL import Image

    from beit3.data.transforms import build_finetune_transform
    from beit3.models import from_pretrained
    from beit3.text import TextTokenizer

    root = Path(data_root)
    model = from_pretrained(model_dir).eval()
    tok = TextTokenizer.from_file(root / "beit3.spm")
    items = read_jsonl(root / f"coco_retrieval.{split}.jsonl")
    paths = {}
    for it in items:
        paths.setdefault(it["image_id"], it["image_path"])
    ids = list(paths)
    pil = [Image.open(root / paths[i]).convert("RGB") for i in ids]
    transform = build_finetune_transform(model.config.img_size, train=False)
    step = max(1, len(ids) // num_queries)
    queries = [next(it for it in items if it["image_id"] == ids[k]) for k in range(0, len(ids), step)][:num_queries]
    tokens, pads = tok.pad_ids([q["text_segment"] for q in queries], 64)
    with torch.no_grad():
        image_feats = torch.cat([model.encode_image(torch.stack([transform(p) for p in pil[s:s + 64]]))
                                 for s in range(0, len(pil), 64)])
        text_feats = model.encode_text(tokens, pads)
    rank = (text_feats @ image_feats.T).topk(min(top_k, len(ids)), dim=1).indices
    rows = [{"text": tok.decode(q["text_segment"]), "images": [pil[j] for j in rank[n].tolist()],
             "marks": [ids[j] == q["image_id"] for j in rank[n].tolist()]} for n, q in enumerate(queries)]
    return image_grid(rows, out, title=f"text→image retrieval, {split} split ({len(ids)} images): top-{top_k}")


def caption_examples(run: PathLike, data_root: PathLike, out: PathLike, num_images: int = 8, split: str = "val") -> Path:
    """PNG grid: held-out images with the caption the captioning run generated (its ``best/`` predictions) and one
    reference caption."""
    from PIL import Image

    from beit3.finetune.captioning import read_references

    root = Path(data_root)
    results = json.loads((Path(run) / "best" / f"caption_results_{split}.json").read_text())
    refs = read_references(root / f"coco_karpathy_{split}_gt.json")
    files = {im["id"]: im["file_name"] for im in json.loads((root / f"coco_karpathy_{split}_gt.json").read_text())["images"]}
    rows = []
    for r in results[:num_images]:
        image = Image.open(root / files[r["image_id"]]).convert("RGB")
        rows.append({"text": f"generated: {r['caption']}\nreference: {refs[r['image_id']][0]}", "images": [image]})
    return image_grid(rows, out, title=f"generated captions, {split} split", image_px=1.2)


ENVIRONMENT_PACKAGES = ("torch", "torchvision", "deepspeed", "numpy", "pillow", "sentencepiece", "transformers", "timm")


def environment() -> dict:
    """What a demo run's numbers depend on besides the code and the seeds: package versions, Python, the CPU and
    the thread settings (floating-point sums, and so every trained weight, change with any of them)."""
    import os
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import torch

    packages = {}
    for name in ENVIRONMENT_PACKAGES:
        try:
            packages[name] = version(name)
        except PackageNotFoundError:
            packages[name] = None
    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"python": platform.python_version(), "packages": packages, "cpu": cpu, "cpus": os.cpu_count(),
            "cuda": torch.version.cuda if torch.cuda.is_available() else None,
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS")}


def summarize(run_dir: PathLike, data_root: Optional[PathLike] = None, which: str = "final", plots: bool = True,
              timings: Optional[dict] = None) -> dict:
    """Write ``results.json`` + ``results.md`` (and, with ``plots``, the PNGs) into ``run_dir``; returns the results.

    ``which``: the ``final`` (last step, the default: no selection on the evaluated split) or ``best`` evaluation.
    ``timings``: optional ``{stage: seconds}`` recorded in the results."""
    run_dir = Path(run_dir)
    data_root = Path(data_root) if data_root else run_dir / "data"
    table = results_table(run_dir, data_root, which)
    files: dict[str, str] = {}
    errors: dict[str, str] = {}
    if plots:
        def attempt(name: str, fn):
            try:
                files[name] = str(fn())
            except (OSError, ValueError, KeyError, StopIteration, RuntimeError) as err:
                errors[name] = f"{type(err).__name__}: {err}"

        pre = run_dir / "pretrain" / "log.jsonl"
        if pre.is_file():
            attempt("pretrain_loss", lambda: plot_logs([pre], run_dir / "pretrain_loss.png", keys=PRETRAIN_KEYS,
                                                       labels=["pretraining (masked data modeling) per stream"]))
            grounding = gap_keys(read_log(pre))
            if grounding:
                attempt("pretrain_grounding", lambda: plot_logs(
                    [pre], run_dir / "pretrain_grounding.png", keys=grounding,
                    labels=["held-out grounding: own minus another pair's image (accuracy)"]))
        ft_logs = [(run.name, run / "log.jsonl") for t in ("retrieval", "vqav2", "captioning") for i in INITS
                   for run in seed_runs(run_dir, t, i)[:1]]
        ft_logs = [(n, p) for n, p in ft_logs if p.is_file()]
        if ft_logs:
            attempt("finetune_loss", lambda: plot_logs([p for _, p in ft_logs], run_dir / "finetune_loss.png",
                                                       keys=["loss"], labels=[n for n, _ in ft_logs]))
        retrieval = seed_runs(run_dir, "retrieval", "pretrained")
        if retrieval and (retrieval[0] / "best").is_dir():
            best = retrieval[0] / "best"
            attempt("retrieval_examples", lambda: retrieval_examples(best, data_root, run_dir / "retrieval_examples.png"))
        captioning = seed_runs(run_dir, "captioning", "pretrained")
        cap = captioning[0] if captioning else run_dir / "ft" / "captioning_pretrained"
        if (cap / "best").is_dir():
            attempt("caption_examples", lambda: caption_examples(cap, data_root, run_dir / "caption_examples.png"))
        hist = run_dir / "tokenizer" / "codebook_usage.png"
        if hist.is_file():
            files["codebook_usage"] = str(hist)
    pre_log = read_log(run_dir / "pretrain" / "log.jsonl") if (run_dir / "pretrain" / "log.jsonl").is_file() else []
    env = environment()
    result = {**table, "files": files, "plot_errors": errors, "timings": timings or {}, "environment": env,
              "pretrain_last": next((r for r in reversed(pre_log) if "loss" in r), None),
              "pretrain_eval": [r for r in pre_log if any(k.startswith("eval_") for k in r)]}
    (run_dir / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    extra = [f"Held-out {table['split']} split of the demo data; {which} evaluation of each fine-tuning run."]
    eval_table = pretraining_eval_markdown(pre_log)
    if eval_table:
        extra.append("Pretraining, held-out evaluation (accuracy in %, gaps in points: own minus another pair's "
                     "image or text):\n\n" + eval_table)
    if timings:
        extra.append("Stage times (s): " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
    if files:
        extra.append("Plots: " + ", ".join(f"`{Path(f).name}`" for f in files.values()))
    extra.append("Environment (the numbers depend on it): Python " + env["python"] + ", "
                 + ", ".join(f"{k} {v}" for k, v in env["packages"].items() if v) + f"; {env['cpu']}")
    (run_dir / "results.md").write_text(markdown(table, "\n\n".join(extra)))
    return result
