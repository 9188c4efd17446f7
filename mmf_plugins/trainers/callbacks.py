"""The MMF loop callback: logging, periodic evaluation, checkpoints, early stopping, stop at max_updates.

One callback does what MMF's ``LogisticsCallback``, ``CheckpointCallback`` and
``EarlyStoppingCallback`` do, in this order after every optimizer update: log (every
``log_interval``), evaluate on val (every ``evaluation_interval`` and at the end), save
``models/model_<update>.ckpt`` + ``current.ckpt`` (every ``checkpoint_interval`` and at the end; after
evaluation, so ``best_*`` is current), ``best.ckpt`` when the early-stop criteria improves, prune to
``max_to_keep``. Log lines follow MMF's keys (``progress``, ``train/<ds>/<loss>``, ``train/total_loss``,
``lr``, ``ups``, ``eta``; ``val/<ds>/<metric>``, ``best_update``, ``best_val/<criteria>``) and go to the
console, ``<save_dir>/train.log`` and Lightning's loggers (CSV, TensorBoard).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from mmf_plugins.trainers.evaluation import evaluate

logger = logging.getLogger("mmf_plugins.train")


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes checkpoints to a temp file in the same folder, then ``os.replace``: never a half file."""

    def save_checkpoint(self, checkpoint, path, storage_options=None):
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)

    def load_checkpoint(self, path, map_location=None, weights_only=None):
        from mmf_plugins.zoo.conversion import load_weights_file

        return load_weights_file(path, map_location=map_location or "cpu")


def _link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(f".{dst.name}.tmp{os.getpid()}")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        import shutil

        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


class MMFLoopCallback(pl.Callback):
    def __init__(self, config, data_module, save_dir: str | Path, run_val: bool = True):
        t = config.training
        self.config = config
        self.data_module = data_module
        self.save_dir = Path(save_dir)
        self.max_updates = int(t.max_updates)
        self.log_interval = max(1, int(t.log_interval))
        self.evaluation_interval = max(1, int(t.evaluation_interval))
        self.checkpoint_interval = max(1, int(t.checkpoint_interval))
        self.run_val = run_val
        es = t.early_stop
        self.criteria = str(es.criteria)
        self.minimize = bool(es.minimize)
        self.patience = int(es.patience)
        self.early_stop = bool(es.enabled)
        self.max_to_keep = int(config.checkpoint.get("max_to_keep", -1))
        self.limit_val = t.get("limit_val_batches")
        self._last_update = -1
        self._t0 = None
        self._t_last = None
        self._u_last = 0
        self.history: list[dict] = []

    # -------------------------------------------------------------- helpers
    @property
    def criteria_key(self) -> str:
        c = self.criteria
        return c if c.startswith("val/") else f"val/{c}"

    def _log(self, trainer, values: dict, step: int) -> None:
        if trainer.is_global_zero:
            line = ", ".join(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in values.items())
            logger.info(line)
            with open(self.save_dir / "train.log", "a") as f:
                f.write(json.dumps(values) + "\n")
        numeric = {k: float(v) for k, v in values.items() if isinstance(v, (int, float)) and k != "progress"}
        for lg in trainer.loggers:
            lg.log_metrics(numeric, step=step)

    def _save(self, trainer, pl_module, update: int) -> None:
        models = self.save_dir / "models"
        path = models / f"model_{update}.ckpt"
        trainer.save_checkpoint(path, weights_only=False)
        if trainer.is_global_zero:
            _link_or_copy(path, self.save_dir / "current.ckpt")
            if self.max_to_keep > 0:
                ckpts = sorted(models.glob("model_*.ckpt"), key=lambda p: int(p.stem.split("_")[1]))
                for old in ckpts[: -self.max_to_keep]:
                    old.unlink(missing_ok=True)

    # ---------------------------------------------------------------- hooks
    def on_train_start(self, trainer, pl_module) -> None:
        self._t0 = self._t_last = time.time()
        self._u_last = pl_module.num_updates
        self._last_update = pl_module.num_updates

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        u = pl_module.num_updates
        if u == self._last_update:  # accumulating, no update yet
            return
        self._last_update = u
        if u % self.log_interval == 0 or u == self.max_updates:
            now = time.time()
            ups = (u - self._u_last) / max(1e-9, now - self._t_last)
            self._t_last, self._u_last = now, u
            eta = (self.max_updates - u) / max(ups, 1e-9)
            values = {"progress": f"{u}/{self.max_updates}", **pl_module.last_losses,
                      "lr": pl_module.current_lr(), "ups": round(ups, 3), "num_updates": u,
                      "time_since_start": round(now - self._t0, 1), "eta": round(eta, 1)}
            if torch.cuda.is_available():
                values["max mem"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
            self._log(trainer, values, u)
            pl_module.reset_logged_losses()
        if self.run_val and (u % self.evaluation_interval == 0 or u == self.max_updates):
            self._validate(trainer, pl_module, u)
        if u % self.checkpoint_interval == 0 or u == self.max_updates or trainer.should_stop:
            self._save(trainer, pl_module, u)
        if u >= self.max_updates:
            trainer.should_stop = True

    def _validate(self, trainer, pl_module, u: int) -> None:
        loaders = self.data_module.eval_dataloaders("val")
        if not loaders:
            return
        t = time.time()
        values, _ = evaluate(pl_module.model, loaders, self.config, "val", pl_module.device,
                             max_batches=int(self.limit_val) if self.limit_val else None)
        values["val_time"] = round(time.time() - t, 2)
        current = values.get(self.criteria_key)
        if current is not None:
            best = pl_module.best_metric_value
            improved = best is None or (current < best if self.minimize else current > best)
            if improved:
                pl_module.best_metric_value = float(current)
                pl_module.best_update = u
                trainer.save_checkpoint(self.save_dir / "best.ckpt", weights_only=False)  # collective under DDP: every rank calls
            elif self.early_stop and u - pl_module.best_update >= self.patience:
                logger.info("early stop: %s did not improve for %d updates", self.criteria_key, u - pl_module.best_update)
                trainer.should_stop = True
        elif self.criteria_key != "val/total_loss" and u == self.evaluation_interval:
            logger.warning("early-stop criteria '%s' not among the logged values %s", self.criteria_key, sorted(values))
        values["num_updates"] = u
        values["best_update"] = pl_module.best_update
        if pl_module.best_metric_value is not None:
            values[f"best_{self.criteria_key}"] = pl_module.best_metric_value
        self.history.append(values)
        self._log(trainer, values, u)
