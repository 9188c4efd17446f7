"""``mmf_compare``: several runs side by side — the table, learning curves, accuracy vs end-to-end
latency, parameters, training time, peak memory, and a page of example answers.

Input: run directories written by ``mmf_run`` (``config.yaml``, ``train.log``, ``summary.json``,
``<model>_final.safetensors``). Runs are grouped by dataset and primary metric (the early-stop
criteria); runs that share none with the others are reported as not comparable, never dropped
silently. Latency is measured through ``mmf_plugins.pipeline`` on the same val images and questions
for every model, so region models pay for their feature extractor (image in, answer out).

Output in ``--out``: ``report.md``, ``report.html`` (self-contained apart from its PNGs),
``curves.png``, ``accuracy_vs_latency.png``, ``examples.png``, ``comparison.json``.
"""

from __future__ import annotations

import html
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)


class RunNotReadable(ValueError):
    """A run directory that is missing or unfinished."""


@dataclass
class Run:
    path: Path
    model: str
    datasets: list[str]
    config: dict
    summary: dict
    curve: list[tuple[int, float]] = field(default_factory=list)
    criteria: str = ""
    final_metric: float | None = None
    latency_ms: float | None = None
    answers: list[str] = field(default_factory=list)
    shuffled_metric: float | None = None  # the metric with each question given another image (image_ablation)

    @property
    def name(self) -> str:
        return f"{self.model} ({self.path.name})"


def load_run(path: str | os.PathLike) -> Run:
    from omegaconf import OmegaConf

    p = Path(path)
    if not p.is_dir():
        raise RunNotReadable(f"run directory {p} does not exist")
    for name in ("config.yaml", "summary.json", "train.log"):
        if not (p / name).exists():
            raise RunNotReadable(f"run {p} is unfinished or not an mmf_run save_dir: {name} is missing")
    cfg = OmegaConf.to_container(OmegaConf.load(p / "config.yaml"), resolve=False)
    summary = json.loads((p / "summary.json").read_text())
    crit = str(cfg["training"]["early_stop"]["criteria"])
    key = crit if crit.startswith("val/") else f"val/{crit}"
    curve = []
    for line in (p / "train.log").read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if key in row and "num_updates" in row:
            curve.append((int(row["num_updates"]), float(row[key])))
    final = summary.get("results", {}).get(key)
    if final is None and curve:
        final = curve[-1][1]
    return Run(p, cfg["model"], str(cfg["datasets"]).split(","), cfg, summary, curve, key, final)


def group_runs(runs: list[Run]) -> tuple[dict[str, list[Run]], list[str]]:
    groups: dict[str, list[Run]] = {}
    for r in runs:
        groups.setdefault(r.criteria, []).append(r)
    notes = []
    for crit, rs in list(groups.items()):
        if len(rs) == 1 and len(groups) > 1:
            notes.append(f"{rs[0].name} reports '{crit}', which no other run reports: not compared")
    return groups, notes


def measure_latency(run: Run, samples: list[tuple], device: str = "cpu", repeat: int = 1) -> tuple[float, list[str]]:
    """Median ms per question at batch 1, end to end through the pipeline; also returns the answers."""
    from mmf_plugins.pipelines import pipeline

    pipe = pipeline("vqa", checkpoint=str(run.path), device=device)
    pipe(samples[0][0], samples[0][1])  # warm-up
    times, answers = [], []
    for img, q in samples:
        t0 = time.perf_counter()
        for _ in range(repeat):
            out = pipe(img, q)
        times.append((time.perf_counter() - t0) / repeat * 1000)
        answers.append(out[0]["answer"])
    times.sort()
    return times[len(times) // 2], answers


def vqa_examples(run: Run, n: int) -> list[tuple[Path, str, list[str]]]:
    """(image path, question, GT answers) for the first ``n`` val questions of the run's VQA dataset."""
    from mmf_plugins.datasets.builders.vl_builder import resolve
    from omegaconf import OmegaConf

    ds_name = run.datasets[0]
    ds_cfg = OmegaConf.create(run.config["dataset_config"][ds_name])
    OmegaConf.resolve(ds_cfg)
    ann = ds_cfg.annotations.val
    seen, qs = set(), []
    for q in json.loads(resolve(ds_cfg, ann.questions).read_text())["questions"]:
        if q["image_id"] not in seen:  # one question per image: examples show different scenes
            seen.add(q["image_id"])
            qs.append(q)
        if len(qs) >= n:
            break
    answers = {a["question_id"]: a for a in json.loads(resolve(ds_cfg, ann.answers).read_text())["annotations"]}
    fmt = str(ds_cfg.get("image_name_format", "{image_id}.jpg"))
    img_dir = resolve(ds_cfg, ds_cfg.images.val)
    out = []
    for q in qs:
        path = img_dir / fmt.format(image_id=int(q["image_id"]), split="val")
        gt = [a["answer"] for a in answers[q["question_id"]]["answers"]]
        out.append((path, q["question"], gt))
    return out


def _plots(out: Path, groups: dict[str, list[Run]], runs: list[Run], examples, show_examples: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, len(groups), figsize=(6 * len(groups), 4), squeeze=False)
    for ax, (crit, rs) in zip(axes[0], groups.items()):
        for r in rs:
            if r.curve:
                xs, ys = zip(*r.curve)
                ax.plot(xs, ys, marker="o", label=r.name)
        ax.set_xlabel("updates")
        ax.set_ylabel(crit)
        ax.set_title(crit)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=100)
    plt.close(fig)
    files.append("curves.png")

    timed = [r for r in runs if r.latency_ms is not None and r.final_metric is not None]
    if timed:
        fig, ax = plt.subplots(figsize=(6, 4))
        for r in timed:
            ax.scatter(r.latency_ms, r.final_metric, s=60)
            ax.annotate(r.model, (r.latency_ms, r.final_metric), textcoords="offset points", xytext=(5, 5))
        ax.set_xlabel("end-to-end latency, ms / question (batch 1, image in, answer out)")
        ax.set_ylabel(timed[0].criteria)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(out / "accuracy_vs_latency.png", dpi=100)
        plt.close(fig)
        files.append("accuracy_vs_latency.png")

    if examples and show_examples:
        from PIL import Image

        k = min(show_examples, len(examples))
        fig, axes = plt.subplots(1, k, figsize=(4 * k, 4.8), squeeze=False)
        for i, ax in enumerate(axes[0]):
            path, q, gt = examples[i]
            ax.imshow(Image.open(path).convert("RGB"))
            ax.axis("off")
            lines = [q, f"GT: {max(set(gt), key=gt.count)}"] + [f"{r.model}: {r.answers[i]}" for r in runs if r.answers]
            ax.set_title("\n".join(lines), fontsize=8, loc="left")
        fig.tight_layout()
        fig.savefig(out / "examples.png", dpi=90)
        plt.close(fig)
        files.append("examples.png")
    return files


def _metric_cell(r: Run, value: float | None):
    return None if value is None else round(100 * value, 2) if "accuracy" in r.criteria else round(value, 4)


def table_rows(runs: list[Run], image_ablation: bool = False) -> list[dict]:
    """One row per run; ``image_ablation`` adds "value, shuffled images" (the metric with each question given
    another image's visual input: a model that reads the image drops there, one that ignores it does not)."""
    rows = []
    for r in runs:
        s = r.summary
        rows.append({
            "model": r.model, "run": r.path.name, "datasets": ",".join(r.datasets), "metric": r.criteria,
            "value": _metric_cell(r, r.final_metric),
            **({"value, shuffled images": _metric_cell(r, r.shuffled_metric)} if image_ablation else {}),
            "params (M)": round(s.get("num_parameters", 0) / 1e6, 2),
            "train time (s)": s.get("train_time_s"),
            "peak RSS (MiB)": s.get("peak_rss_mib"),
            "latency (ms)": None if r.latency_ms is None else round(r.latency_ms, 1),
        })
    return rows


def markdown_table(rows: list[dict]) -> str:
    if not rows:
        return "(no runs)"
    cols = list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for r in rows:
        lines.append("| " + " | ".join("" if r[c] is None else str(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def compare(run_dirs: list[str], out_dir: str, latency_samples: int = 8, examples: int = 4, device: str = "cpu",
            measure: bool = True, image_ablation: bool = False) -> dict:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs, problems = [], []
    for d in run_dirs:
        try:
            runs.append(load_run(d))
        except RunNotReadable as e:
            problems.append(str(e))
            logger.warning("%s", e)
    groups, notes = group_runs(runs)
    problems += notes
    ex = []
    vqa_runs = [r for r in runs if any(d in ("vqa2", "shapes") for d in r.datasets)]
    if measure and vqa_runs:
        try:
            ex = vqa_examples(vqa_runs[0], max(latency_samples, examples))
        except (OSError, KeyError, ValueError) as e:
            problems.append(f"no VQA examples for latency ({e})")
        for r in vqa_runs:
            if ex:
                try:
                    r.latency_ms, r.answers = measure_latency(r, [(p, q) for p, q, _ in ex], device)
                except Exception as e:  # a run whose pipeline cannot be built is reported, not fatal
                    problems.append(f"{r.name}: latency not measured ({type(e).__name__}: {e})")
    if image_ablation:
        from mmf_plugins.reports.image_ablation import image_ablation as run_ablation

        for r in runs:
            try:
                res = run_ablation(r.path, modes=("shuffled",))["shuffled"]
                r.shuffled_metric = res.get(r.criteria)
            except Exception as e:  # reported, not fatal: the rest of the report still stands
                problems.append(f"{r.name}: image ablation not measured ({type(e).__name__}: {e})")
    pngs = _plots(out, groups, runs, ex, examples) if runs else []
    rows = table_rows(runs, image_ablation)
    md = ["# Comparison", "", markdown_table(rows), ""]
    if problems:
        md += ["## Not compared / problems", *[f"- {p}" for p in problems], ""]
    md += [f"![{p}]({p})" for p in pngs]
    (out / "report.md").write_text("\n".join(md) + "\n")
    cells = "".join(f"<th>{html.escape(c)}</th>" for c in (rows[0] if rows else []))
    body = "".join("<tr>" + "".join(f"<td>{html.escape('' if v is None else str(v))}</td>" for v in r.values()) + "</tr>"
                   for r in rows)
    probs = "".join(f"<li>{html.escape(p)}</li>" for p in problems)
    imgs = "".join(f'<figure><img src="{p}" alt="{p}"><figcaption>{p}</figcaption></figure>' for p in pngs)
    (out / "report.html").write_text(
        "<!DOCTYPE html><html><head><meta charset='utf-8'><title>mmf_compare</title>"
        "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        "padding:4px 8px}img{max-width:100%}</style></head><body><h1>Comparison</h1>"
        f"<table><thead><tr>{cells}</tr></thead><tbody>{body}</tbody></table>"
        + (f"<h2>Not compared / problems</h2><ul>{probs}</ul>" if problems else "") + imgs + "</body></html>\n")
    result = {"rows": rows, "problems": problems, "images": pngs}
    (out / "comparison.json").write_text(json.dumps(result, indent=2, default=str))
    return result
