"""The console scripts as a user runs them (subprocesses)."""

import json
import subprocess
import sys
from pathlib import Path

BIN = Path(sys.executable).parent


def _run(args, **kw):
    return subprocess.run([str(BIN / args[0]), *args[1:]], capture_output=True, text=True, timeout=300, **kw)


def test_mmf_run_help_lists_registries():
    out = _run(["mmf_run", "--help"])
    assert out.returncode == 0
    for expected in ("models: ", "soho", "vinvl", "vl_bert", "datasets: ", "vqa2", "metrics: ", "vqa_accuracy",
                     "converters: "):
        assert expected in out.stdout


def test_mmf_run_user_errors_are_one_clear_line(tmp_path):
    out = _run(["mmf_run", "model=sohoo", "datasets=vqa2"])
    assert out.returncode == 2
    assert "unknown model 'sohoo'" in out.stderr and "Did you mean 'soho'" in out.stderr
    assert "Traceback" not in out.stderr
    out = _run(["mmf_run", "config=missing.yaml", "model=soho", "datasets=vqa2"])
    assert out.returncode == 2 and "not found" in out.stderr and "Traceback" not in out.stderr


def test_mmf_run_trains_then_resumes(user_dir, tmp_path):
    save = tmp_path / "save"
    base = [f"config={user_dir / 'configs' / 'experiment.yaml'}", "model=simple_model", "datasets=numbers",
            f"env.user_dir={user_dir}", f"env.save_dir={save}", "run_type=train"]
    out = _run(["mmf_run", *base, "training.max_updates=4", "training.checkpoint_interval=2"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert (save / "current.ckpt").exists()
    out = _run(["mmf_run", *base, "training.max_updates=8", "checkpoint.resume=True"])
    assert out.returncode == 0, out.stderr[-2000:]
    assert "resuming training from" in out.stdout
    progress = [json.loads(x)["progress"] for x in (save / "train.log").read_text().splitlines() if "progress" in x]
    assert progress[-1] == "8/8" and "4/8" not in progress  # continued from update 4, not restarted
