"""``make demo``: the grid-vs-region comparison end to end on the generated `shapes` corpus.

Stages (each reused when already finished, so a re-run only does what is missing):
  1. generate the shapes corpus                       -> <out>/data/shapes
  2. train the shapes detector                        -> <out>/detector/shapes_detector.safetensors
  3. extract region features with mmf_extract_features -> <out>/data/shapes/features/detector.lmdb
  4-6. train SOHO (pixels), VinVL and VL-BERT (region features) on shapes VQA with their demo.yaml
  7. mmf_compare: table (with each model's accuracy when every question gets another image's input: does it
     read the image?), plots, report.md / report.html -> <out>/report

Every stage runs as a child process (its log in <out>/logs/<stage>.log); one progress display shows the
stage, elapsed time and ETA; the table printed at the end is report.md's. ``--tiny`` shrinks every stage
(the test suite runs the whole pipeline that way).

SOHO needs no detector, so it trains in the background (one core) while the region chain (detector ->
features -> VinVL -> VL-BERT) runs on the other. On a 2-core machine every stage runs with one intra-op
thread: the demo models are small, and two threads per job spent more time handing work over than
computing (measured: a VinVL demo step 0.21 s with 1 thread vs 0.53 s with 2 while another job ran).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable


def _cli(module: str) -> list[str]:
    return [PY, "-m", module]


def stages(out: Path, tiny: bool) -> list[dict]:
    data = out / "data"
    shapes = data / "shapes"
    det = out / "detector" / "shapes_detector.safetensors"
    feats = shapes / "features" / "detector.lmdb"
    runs = out / "runs"
    n_images = ["--num_images", "36"] if tiny else []
    det_args = ["--max_minutes", "0.3"] if tiny else []
    common = [f"env.data_dir={data}", "training.progress_bar=False"]
    small = (["training.max_updates=6", "training.evaluation_interval=6", "training.checkpoint_interval=6",
              "training.log_interval=3", "training.batch_size=8", "training.num_workers=0",
              "dataset_config.vqa2.max_samples.val=16"] if tiny else [])
    extractor = ["dataset_config.vqa2.feature_extractor.type=shapes_detector",
                 f"dataset_config.vqa2.feature_extractor.params.model_file={det}"]

    def train(model: str, region: bool) -> dict:
        save = runs / f"{model}_vqa2"
        cmd = [*_cli("mmf_plugins.cli.run"), f"config=projects/{model}/configs/vqa2/demo.yaml", f"model={model}",
               "datasets=vqa2", "run_type=train_val", f"env.save_dir={save}", *common, *(extractor if region else []),
               *small]
        return {"name": f"train {model}", "done": save / "summary.json", "cmd": cmd, "eta": 20 if tiny else 200}

    extract = []
    for split in ("train", "val", "test"):
        extract.append([*_cli("mmf_plugins.cli.extract"), "--extractor", "shapes_detector", "--model_file", str(det),
                        "--image_dir", str(shapes / "images" / split), "--output_folder", str(feats), "--writer", "lmdb",
                        "--batch_size", "8", "--num_workers", "0" if tiny else "1"])
    return [
        {"name": "generate shapes", "done": shapes / ".built", "eta": 5 if tiny else 30,
         "cmd": [PY, str(ROOT / "tools" / "make_demo_data.py"), "--out", str(shapes), "--no_progress", *n_images]},
        {**train("soho", region=False), "background": True},
        {"name": "train shapes detector", "done": det, "eta": 20 if tiny else 250,
         "cmd": [PY, str(ROOT / "tools" / "train_shapes_detector.py"), "--data_dir", str(shapes), "--out", str(det), *det_args]},
        {"name": "extract region features", "done": feats.with_name("detector.lmdb.done"), "eta": 10 if tiny else 60,
         "cmds": extract},
        train("vinvl", region=True),
        train("vl_bert", region=True),
        {"name": "compare", "done": out / "report" / "report.md", "eta": 10 if tiny else 80,
         "cmd": [*_cli("mmf_plugins.cli.compare"), str(runs / "soho_vqa2"), str(runs / "vinvl_vqa2"),
                 str(runs / "vl_bert_vqa2"), "--out", str(out / "report"),
                 "--latency_samples", "2" if tiny else "16", "--examples", "2" if tiny else "4", "--image_ablation"]},
    ]


def _env(threads: int | None) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def _run(cmd: list[str], log, threads: int | None = None) -> int:
    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    return subprocess.call(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env(threads))


def main(argv=None) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "demo_out"))
    p.add_argument("--tiny", action="store_true", help="minutes-scale smoke run (used by the tests)")
    p.add_argument("--force", action="store_true", help="redo every stage")
    a = p.parse_args(argv)
    out = Path(a.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    console = Console()
    plan = stages(out, a.tiny)
    total_eta = sum(s["eta"] for s in plan)
    timings = {}
    background: list[tuple[str, subprocess.Popen, float, Path]] = []
    threads = 1 if (os.cpu_count() or 1) <= 2 else None
    t_start = time.time()
    with Progress(SpinnerColumn(), TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed:.0f}/{task.total:.0f} s est."),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=console, transient=False) as progress:
        task = progress.add_task("mmf_plugins demo", total=total_eta)
        for i, st in enumerate(plan, 1):
            label = f"[{i}/{len(plan)}] {st['name']}"
            if st["done"].exists() and not a.force:
                progress.console.print(f"{label}: already done, reused ({st['done']})")
                progress.advance(task, st["eta"])
                continue
            progress.update(task, description=label)
            t0 = time.time()
            log_path = out / "logs" / f"{i:02d}_{st['name'].replace(' ', '_')}.log"
            if st.get("background"):
                log = open(log_path, "w")
                log.write(f"$ {' '.join(st['cmd'])}\n")
                log.flush()
                proc = subprocess.Popen(st["cmd"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=_env(threads))
                background.append((label, proc, t0, log_path))
                progress.console.print(f"{label}: started in the background (log {log_path})")
                progress.advance(task, st["eta"])
                continue
            if st["name"] == "compare":  # the report needs every run: wait for the background ones
                for blabel, proc, bt0, blog in background:
                    progress.update(task, description=f"waiting for {blabel}")
                    rc = proc.wait()
                    if rc:
                        progress.stop()
                        console.print(f"[red]{blabel} failed (exit {rc}); see {blog}[/red]")
                        console.print("".join(open(blog).readlines()[-25:]))
                        return rc
                    timings[blabel] = round(time.time() - bt0, 1)
                    progress.console.print(f"{blabel}: done in {timings[blabel]:.0f} s")
                progress.update(task, description=label)
            with open(log_path, "w") as log:
                for cmd in st.get("cmds", [st.get("cmd")]):
                    rc = _run(cmd, log, threads)
                    if rc:
                        for _, proc, _, _ in background:  # leave no orphan training behind
                            proc.terminate()
                        progress.stop()
                        console.print(f"[red]{label} failed (exit {rc}); see {log_path}[/red]")
                        console.print("".join(open(log_path).readlines()[-25:]))
                        return rc
            if "cmds" in st:
                st["done"].write_text("ok\n")
            timings[st["name"]] = round(time.time() - t0, 1)
            progress.advance(task, st["eta"])
            progress.console.print(f"{label}: done in {timings[st['name']]:.0f} s")
    wall = time.time() - t_start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    report = out / "report" / "report.md"
    console.print(report.read_text() if report.exists() else "(no report)")
    summary = {"wall_s": round(wall, 1), "stage_s": timings, "peak_child_rss_mib": round(peak, 1)}
    (out / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    console.print(f"demo finished in {wall / 60:.1f} min; largest stage peak RSS {peak:.0f} MiB; "
                  f"report: {out / 'report' / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
