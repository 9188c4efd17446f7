"""Image ablation: zeroed / shuffled visual input, and the run-level check that reuses the run's own evaluation."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmf_plugins.reports.image_ablation import (
    ablate_batch,
    ablation_table,
    image_ablation,
    other_image_order,
)

ROOT = Path(__file__).resolve().parents[2]


def _batch(B=4):
    torch.manual_seed(0)
    return {
        "input_ids": torch.arange(B * 3).view(B, 3),
        "image_id": [7, 7, 9, 11][:B],
        "image": torch.rand(B, 3, 8, 8) + 0.1,
        "image_mask": torch.rand(B, 8, 8) > 0.5,
        "image_feature_0": torch.rand(B, 5, 6) + 0.1,
        "image_info_0": {"bbox": torch.rand(B, 5, 4), "num_boxes": torch.tensor([5, 4, 3, 2])[:B],
                         "object_names": [[f"obj{i}"] for i in range(B)], "image_width": torch.full((B,), 64)},
    }


def test_zeroed_clears_pixels_and_features_but_keeps_boxes_and_text():
    b, ref = _batch(), _batch()
    out = ablate_batch(b, "zeroed")
    assert out["image"].abs().sum() == 0 and out["image_feature_0"].abs().sum() == 0
    assert out["image"].shape == ref["image"].shape
    torch.testing.assert_close(out["image_mask"], ref["image_mask"])  # which pixels are real does not change
    torch.testing.assert_close(out["image_info_0"]["bbox"], ref["image_info_0"]["bbox"])
    torch.testing.assert_close(out["input_ids"], ref["input_ids"])


def test_shuffled_moves_every_visual_field_with_one_permutation():
    b, ref = _batch(), _batch()
    order = other_image_order(ref["image_id"], 4)
    out = ablate_batch(b, "shuffled")
    torch.testing.assert_close(out["image"], ref["image"][order])
    torch.testing.assert_close(out["image_mask"], ref["image_mask"][order])
    assert out["image_id"] == ref["image_id"]
    torch.testing.assert_close(out["image_feature_0"], ref["image_feature_0"][order])
    info, ref_info = out["image_info_0"], ref["image_info_0"]
    torch.testing.assert_close(info["bbox"], ref_info["bbox"][order])
    torch.testing.assert_close(info["num_boxes"], ref_info["num_boxes"][order])
    assert info["object_names"] == [ref_info["object_names"][int(i)] for i in order]
    torch.testing.assert_close(out["input_ids"], ref["input_ids"])  # the questions stay where they are


def test_shuffled_order_hands_every_question_another_image():
    ids = [3, 3, 3, 5, 5, 8, 8, 8, 1, 2, 2, 9]  # an image's questions together, as in VQA files
    order = other_image_order(ids, len(ids))
    assert sorted(order.tolist()) == list(range(len(ids)))  # a permutation
    assert all(ids[int(order[i])] != ids[i] for i in range(len(ids)))
    assert torch.equal(other_image_order([4, 4, 4], 3).sort().values, torch.arange(3))  # one image: nothing to swap


def test_intact_is_identity_and_bad_input_is_named():
    b, ref = _batch(), _batch()
    out = ablate_batch(b, "intact")
    torch.testing.assert_close(out["image"], ref["image"])
    with pytest.raises(ValueError, match="intact"):
        ablate_batch(b, "blurred")
    with pytest.raises(KeyError, match="no visual input"):
        ablate_batch({"input_ids": torch.zeros(2, 3)}, "zeroed")


def test_run_ablation_reproduces_the_logged_metric_and_changes_the_model_input(soho_run):
    # a batch of 16 holds questions of several val images (the fixture's loader gives one image per batch of 4)
    res = image_ablation(soho_run, overrides=["training.batch_size=16"])
    summary = json.loads((soho_run / "summary.json").read_text())
    assert set(res) == {"intact", "zeroed", "shuffled"}
    key = "val/vqa2/vqa_accuracy"
    assert res["intact"][key] == pytest.approx(summary["results"][key], abs=1e-6)
    # the grid model's outputs depend on its pixels, so each ablation changes the val loss
    loss = "val/vqa2/logit_bce"
    assert res["zeroed"][loss] != pytest.approx(res["intact"][loss], rel=1e-6)
    assert res["shuffled"][loss] != pytest.approx(res["intact"][loss], rel=1e-6)
    table = ablation_table([("soho", key, res)])
    assert f"{100 * res['intact'][key]:.2f}" in table and "| soho |" in table


def test_cli_prints_the_table_and_reports_a_missing_run(soho_run, tmp_path):
    out = tmp_path / "ablation.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "image_ablation.py"), str(soho_run),
                           str(tmp_path / "nope"), "--max_batches", "1", "--json", str(out)],
                          check=False, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| run | metric | intact | zeroed | shuffled |" in proc.stdout
    assert "skipped" in proc.stderr and "nope" in proc.stderr
    assert set(json.loads(out.read_text())[str(soho_run)]) == {"intact", "zeroed", "shuffled"}


def test_compare_adds_the_shuffled_image_column(soho_run, tmp_path):
    from mmf_plugins.reports.comparison import compare

    out = compare([str(soho_run)], str(tmp_path / "report"), measure=False, image_ablation=True)
    (row,) = out["rows"]
    expected = image_ablation(soho_run, modes=("shuffled",))["shuffled"]["val/vqa2/vqa_accuracy"]
    assert row["value, shuffled images"] == round(100 * expected, 2)
    assert "value, shuffled images" in (tmp_path / "report" / "report.md").read_text()
    plain = compare([str(soho_run)], str(tmp_path / "plain"), measure=False)
    assert "value, shuffled images" not in plain["rows"][0]
