"""End-to-end trainer behaviour on the test plugin (tests/fixtures/user_dir): loss falls, exact resume,
accumulation equivalence, bf16, checkpoint keys, bad-data budget, predictions."""

import json

import pytest
import torch

from mmf_plugins.cli.run import run
from mmf_plugins.zoo.conversion import load_weights_file

MMF_KEYS = {"model", "optimizer", "lr_scheduler", "config", "num_updates", "current_iteration", "current_epoch",
            "best_update", "best_metric_value"}


def _train_log(save):
    return [json.loads(line) for line in (save / "train.log").read_text().splitlines()]


def test_training_lowers_loss_and_writes_mmf_checkpoints(base_opts, tmp_path):
    save = tmp_path / "save"
    run(base_opts + ["run_type=train_val", "training.max_updates=30", "training.log_interval=1", "optimizer.params.lr=0.05",
                     "training.evaluation_interval=15", "training.checkpoint_interval=10", "checkpoint.max_to_keep=2"])
    log = [r for r in _train_log(save) if "train/total_loss" in r]
    first, last = log[0]["train/total_loss"], sum(r["train/total_loss"] for r in log[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    assert (save / "current.ckpt").exists() and (save / "best.ckpt").exists() and (save / "config.yaml").exists()
    assert sorted(p.name for p in (save / "models").glob("*.ckpt")) == ["model_20.ckpt", "model_30.ckpt"]  # max_to_keep
    ckpt = load_weights_file(save / "current.ckpt")  # weights_only=True must succeed
    assert MMF_KEYS <= set(ckpt)
    assert ckpt["num_updates"] == 30 and ckpt["best_update"] in (15, 30)
    assert (save / "simple_model_final.safetensors").exists()
    summary = json.loads((save / "summary.json").read_text())
    assert summary["num_updates"] == 30 and "val/numbers/ce" in summary["results"]


@pytest.mark.parametrize("workers", [0, 2])
def test_stop_and_resume_equals_uninterrupted(base_opts, tmp_path, workers):
    common = [o for o in base_opts if not o.startswith("env.save_dir")] + [
        "run_type=train", "training.checkpoint_interval=4", f"training.num_workers={workers}",
        "model_config.simple_model.dropout=0.3", "scheduler.params.num_training_steps=12"]
    run(common + [f"env.save_dir={tmp_path / 'full'}", "training.max_updates=12"])
    run(common + [f"env.save_dir={tmp_path / 'half'}", "training.max_updates=5"])  # stops at 5 (ckpt at 4 and 5)
    run(common + [f"env.save_dir={tmp_path / 'half'}", "training.max_updates=12", "checkpoint.resume=True"])
    a = load_weights_file(tmp_path / "full" / "current.ckpt")
    b = load_weights_file(tmp_path / "half" / "current.ckpt")
    assert a["num_updates"] == b["num_updates"] == 12
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, st in a["optimizer"]["state"].items():
        assert torch.equal(st["exp_avg"], b["optimizer"]["state"][i]["exp_avg"])
        assert torch.equal(st["exp_avg_sq"], b["optimizer"]["state"][i]["exp_avg_sq"])
    assert a["lr_scheduler"]["last_epoch"] == b["lr_scheduler"]["last_epoch"]


def test_accumulation_x2_equals_double_batch(base_opts, tmp_path):
    common = [o for o in base_opts if not o.startswith("env.save_dir")] + [
        "run_type=train", "training.max_updates=4", "model_config.simple_model.dropout=0.0"]
    run(common + [f"env.save_dir={tmp_path / 'acc'}", "training.batch_size=4", "training.update_frequency=2"])
    run(common + [f"env.save_dir={tmp_path / 'big'}", "training.batch_size=8"])
    a = load_weights_file(tmp_path / "acc" / "current.ckpt")["model"]
    b = load_weights_file(tmp_path / "big" / "current.ckpt")["model"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_bf16_on_cpu_runs(base_opts, tmp_path):
    run(base_opts + ["run_type=train", "training.max_updates=3", "training.precision=bf16-mixed"])
    ckpt = load_weights_file(tmp_path / "save" / "current.ckpt")
    assert ckpt["num_updates"] == 3
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values())


def test_corrupt_items_counted_then_budget_stops(base_opts, tmp_path):
    run(base_opts + ["run_type=train", "training.max_updates=20", "dataset_config.numbers.corrupt_indices=[3]",
                     "training.max_bad_fraction=0.05"])
    summary = json.loads((tmp_path / "save" / "summary.json").read_text())
    assert summary["bad_items"] >= 1
    with pytest.raises(RuntimeError, match="max_bad_fraction"):
        run(base_opts[:-1] + [f"env.save_dir={tmp_path / 'b'}", "run_type=train", "training.max_updates=30",
                              "dataset_config.numbers.corrupt_indices=[0,1,2,3,4,5,6,7]",
                              "training.max_bad_fraction=0.01"])


def test_predict_writes_submission_rows(base_opts, tmp_path):
    from mmf_plugins.cli.predict import predict

    run(base_opts + ["run_type=train", "training.max_updates=10"])
    predict(base_opts + [f"checkpoint.resume_file={tmp_path / 'save' / 'simple_model_final.safetensors'}"])
    files = list((tmp_path / "save" / "reports").glob("numbers_run_test_*.json"))
    assert len(files) == 1
    rows = json.loads(files[0].read_text())
    assert len(rows) == 64 and set(rows[0]) == {"id", "label"}
    # a full training checkpoint as resume_file gives the same (trained) predictions
    predict(base_opts + [f"checkpoint.resume_file={tmp_path / 'save' / 'current.ckpt'}",
                         "training.experiment_name=from_ckpt"])
    (ckpt_file,) = list((tmp_path / "save" / "reports").glob("numbers_from_ckpt_test_*.json"))
    assert json.loads(ckpt_file.read_text()) == rows


def test_nan_loss_stops_with_update_number(base_opts, tmp_path):
    with pytest.raises(FloatingPointError, match=r"loss .* at update [2-3]"):
        run(base_opts + ["run_type=train", "training.max_updates=3", "optimizer.type=sgd", "optimizer.params.lr=1e30",
             "scheduler.params.num_warmup_steps=0"])


def test_batch_of_only_bad_items_is_skipped_not_fed_to_the_model(base_opts, tmp_path):
    # 60 of 64 items unreadable: most batches of 2 have no good item at all; the run still reaches its
    # update count (the budget is raised to allow it) instead of handing an empty batch to the model
    corrupt = list(range(60))
    run(base_opts + ["run_type=train", "training.max_updates=10", "training.batch_size=2",
                     f"dataset_config.numbers.corrupt_indices={corrupt}", "training.max_bad_fraction=1.0"])
    summary = json.loads((tmp_path / "save" / "summary.json").read_text())
    assert summary["num_updates"] == 10 and summary["bad_items"] >= 10


def test_cpu_thread_policy(monkeypatch):
    from omegaconf import OmegaConf

    from mmf_plugins.trainers import mmf_trainer as T

    monkeypatch.setattr(T, "available_cpus", lambda: 8)

    def cfg(threads="auto", workers=2):
        return OmegaConf.create({"training": {"cpu_threads": threads, "num_workers": workers}})

    assert T.cpu_thread_count(cfg(), "cpu", environ={}) == 6  # workers get their own cores
    assert T.cpu_thread_count(cfg(workers=0), "cpu", environ={}) == 8
    assert T.cpu_thread_count(cfg(workers=16), "cpu", environ={}) == 1
    assert T.cpu_thread_count(cfg(), "cpu", environ={"OMP_NUM_THREADS": "3"}) is None  # the user's choice wins
    assert T.cpu_thread_count(cfg(), "gpu", environ={}) is None
    assert T.cpu_thread_count(cfg(3), "gpu", environ={"OMP_NUM_THREADS": "1"}) == 3
    for bad in (0, -1, "many"):
        with pytest.raises(ValueError, match="cpu_threads"):
            T.cpu_thread_count(cfg(bad), "cpu", environ={})


def test_run_applies_cpu_threads(base_opts, tmp_path):
    before = torch.get_num_threads()
    try:
        run(base_opts + ["run_type=train", "training.max_updates=2", "training.cpu_threads=1"])
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
