"""`make demo` end to end at a tiny size: corpus -> detector -> features -> SOHO, VinVL, VL-BERT -> report."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_demo_pipeline_tiny(tmp_path):
    out = tmp_path / "demo"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--tiny", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    comparison = json.loads((out / "report" / "comparison.json").read_text())
    rows = {r["model"]: r for r in comparison["rows"]}
    assert set(rows) == {"soho", "vinvl", "vl_bert"}
    for model, row in rows.items():
        summary = json.loads((out / "runs" / f"{model}_vqa2" / "summary.json").read_text())
        assert row["value"] == round(100 * summary["results"]["val/vqa2/vqa_accuracy"], 2)
        assert row["latency (ms)"] and row["latency (ms)"] > 0  # end to end, detector included for region models
    html = (out / "report" / "report.html").read_text()
    for png in comparison["images"]:
        assert f'src="{png}"' in html and (out / "report" / png).exists()
    # region features came from the trained shapes detector through mmf_extract_features
    assert (out / "data" / "shapes" / "features" / "detector.lmdb").exists()
    assert "shapes_detector" in (out / "runs" / "vinvl_vqa2" / "config.yaml").read_text()
    # a second run reuses every finished stage
    again = subprocess.run([sys.executable, str(ROOT / "tools" / "demo.py"), "--tiny", "--out", str(out)],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert again.returncode == 0 and again.stdout.count("already done") >= 7
