"""Pipeline answers equal mmf_predict's; mmf_compare writes a report whose rows match the runs' logs."""

import json
from html.parser import HTMLParser
from pathlib import Path

import pytest

from mmf_plugins import pipeline
from mmf_plugins.pipelines import PipelineInputError
from mmf_plugins.reports.comparison import compare


def test_pipeline_answers_equal_predict_output(soho_run, report_data_dir):
    (pred_file,) = list((soho_run / "reports").glob("vqa2_*_test_*.json"))
    predictions = {r["question_id"]: r["answer"] for r in json.loads(pred_file.read_text())}
    shapes = report_data_dir / "shapes"
    questions = json.loads((shapes / "annotations" / "v2_OpenEnded_mscoco_test_questions.json").read_text())["questions"][:6]
    images = [shapes / "images" / "test" / f"shapes_test_{q['image_id']:012d}.jpg" for q in questions]
    vqa = pipeline("vqa", checkpoint=str(soho_run))
    out = vqa(images, [q["question"] for q in questions], top_k=2, batch_size=4)
    assert [o[0]["answer"] for o in out] == [predictions[q["question_id"]] for q in questions]
    assert all(o[0]["score"] >= o[1]["score"] for o in out)
    single = vqa(str(images[0]), questions[0]["question"])
    assert single[0]["answer"] == out[0][0]["answer"]


def test_pipeline_rejects_bad_inputs(soho_run, report_data_dir):
    vqa = pipeline("vqa", checkpoint=str(soho_run))
    img = next((report_data_dir / "shapes" / "images" / "val").glob("*.jpg"))
    with pytest.raises(PipelineInputError, match="empty"):
        vqa(img, "   ")
    with pytest.raises(PipelineInputError, match="not found"):
        vqa(report_data_dir / "nope.jpg", "what color?")
    bad = report_data_dir / "broken.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0garbage")
    with pytest.raises(OSError):
        vqa(bad, "what color?")


class _Collect(HTMLParser):
    def __init__(self):
        super().__init__()
        self.imgs, self.cells = [], []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.imgs.append(dict(attrs)["src"])

    def handle_data(self, data):
        self.cells.append(data.strip())


def test_compare_report_matches_logged_metrics(soho_run, tmp_path):
    out = compare([str(soho_run), str(tmp_path / "missing_run")], str(tmp_path / "report"), latency_samples=2, examples=2)
    (row,) = out["rows"]
    summary = json.loads((soho_run / "summary.json").read_text())
    assert row["model"] == "soho"
    assert row["value"] == round(100 * summary["results"]["val/vqa2/vqa_accuracy"], 2)
    assert row["params (M)"] == round(summary["num_parameters"] / 1e6, 2)
    assert row["latency (ms)"] > 0
    assert any("missing_run" in p for p in out["problems"])
    md = (tmp_path / "report" / "report.md").read_text()
    assert "| soho |" in md and "missing_run" in md
    parser = _Collect()
    parser.feed((tmp_path / "report" / "report.html").read_text())
    assert parser.imgs and all((tmp_path / "report" / src).exists() for src in parser.imgs)
    assert "soho" in parser.cells and str(row["value"]) in parser.cells
