"""``make bench``: run every benchmark script at a CPU-friendly size and collect one table per device
in ``benchmarks/results/<device>.md`` (GPU and CPU runs sit side by side there).

    python benchmarks/run_all.py [--only data_pipeline,soho,...] [--full]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from common import RESULTS, device_tag  # noqa: E402

# script -> CPU-friendly arguments (--full drops them)
SCRIPTS = {
    "data_pipeline.py": ["--records", "2000", "--batches", "5"],
    "soho.py": ["--quick"],
    "vinvl.py": ["--quick"],
    "vl_bert.py": ["--quick"],
    "extraction.py": ["--grid_images", "4", "--x152_images", "1", "--records", "100"],
    "grid_vs_region.py": ["--quick"],
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default="")
    p.add_argument("--full", action="store_true")
    a = p.parse_args(argv)
    only = {s if s.endswith(".py") else s + ".py" for s in a.only.split(",") if s}
    sections, failed = [], []
    for script, args in SCRIPTS.items():
        if only and script not in only:
            continue
        if not (HERE / script).exists():
            sections.append(f"## {script}\n(not present)\n")
            continue
        cmd = [sys.executable, str(HERE / script), *([] if a.full else args)]
        print(f"==> {' '.join(cmd)}", flush=True)
        t0 = time.time()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        out = proc.stdout
        print(out, flush=True)
        tables = "\n".join(line for line in out.splitlines() if line.startswith(("|", "##")))
        status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
        if proc.returncode:
            failed.append(script)
            print(proc.stderr[-3000:], file=sys.stderr)
        sections.append(f"# {script} — {status}, {time.time() - t0:.0f} s\n\n{tables}\n")
    RESULTS.mkdir(parents=True, exist_ok=True)
    target = RESULTS / f"{device_tag()}.md"
    target.write_text(f"# Benchmarks on {device_tag()}\n\n" + "\n".join(sections))
    print(f"collected in {target}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
