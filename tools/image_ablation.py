"""Does each trained model look at the image? Val metrics with the visual input intact / zeroed / shuffled.

    python tools/image_ablation.py demo_out/runs/soho_vqa2 demo_out/runs/vinvl_vqa2 demo_out/runs/vl_bert_vqa2

See mmf_plugins/reports/image_ablation.py for what each mode changes. Extra ``key=value`` arguments are config
overrides for every run (e.g. ``training.batch_size=32``); ``--json`` writes every number.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmf_plugins.reports.comparison import RunNotReadable, load_run
from mmf_plugins.reports.image_ablation import ablation_table, image_ablation


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help="mmf_run save_dirs")
    p.add_argument("--split", default="val")
    p.add_argument("--max_batches", type=int, default=None)
    p.add_argument("--json", default=None, help="write {run: {mode: metrics}} here")
    a, overrides = p.parse_known_args(argv)
    bad = [o for o in overrides if "=" not in o]
    if bad:
        p.error(f"unrecognised arguments {bad}: config overrides are key=value")
    rows, out, failed = [], {}, 0
    for path in a.runs:
        try:
            run = load_run(path)
            res = image_ablation(path, split=a.split, overrides=overrides, max_batches=a.max_batches)
        except (RunNotReadable, KeyError, FileNotFoundError) as e:
            print(f"skipped {path}: {e}", file=sys.stderr)
            failed += 1
            continue
        key = run.criteria.replace("val/", f"{a.split}/", 1)
        rows.append((run.name, key, res))
        out[str(path)] = res
    if rows:
        print(ablation_table(rows))
    if a.json:
        Path(a.json).write_text(json.dumps(out, indent=2))
    return 1 if failed and not rows else 0


if __name__ == "__main__":
    sys.exit(main())
