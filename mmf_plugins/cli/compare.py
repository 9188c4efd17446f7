"""``mmf_compare RUN_DIR [RUN_DIR ...] --out DIR``: compare finished runs (table, plots, report files).

``--run "config=... model=... datasets=..."`` (repeatable) trains a config first and adds its run.
"""

from __future__ import annotations

import argparse
import shlex
import sys


def main(argv=None) -> int:
    from mmf_plugins.reports.comparison import compare, markdown_table

    p = argparse.ArgumentParser(prog="mmf_compare", description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="*", help="mmf_run save directories")
    p.add_argument("--run", action="append", default=[], help="mmf_run options to train first (quoted)")
    p.add_argument("--out", default="comparison")
    p.add_argument("--latency_samples", type=int, default=8)
    p.add_argument("--examples", type=int, default=4)
    p.add_argument("--device", default="cpu")
    p.add_argument("--no_latency", action="store_true")
    p.add_argument("--image_ablation", action="store_true",
                   help="add each run's metric with every question given another image (one more val pass per run)")
    a = p.parse_args(argv)
    dirs = list(a.runs)
    for spec in a.run:
        from mmf_plugins.cli.run import run
        from mmf_plugins.common.registry import registry

        run(shlex.split(spec))
        dirs.append(str(registry.get("config").env.save_dir))
    if not dirs:
        p.error("give run directories or --run")
    result = compare(dirs, a.out, a.latency_samples, a.examples, a.device, measure=not a.no_latency,
                     image_ablation=a.image_ablation)
    print(markdown_table(result["rows"]))
    for prob in result["problems"]:
        print(f"note: {prob}")
    print(f"report: {a.out}/report.md, {a.out}/report.html")
    return 0 if result["rows"] else 1


if __name__ == "__main__":
    sys.exit(main())
