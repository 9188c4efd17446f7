"""The one LightningModule that wraps any registered model (research code stays in the model).

Manual optimization, so that several optimizers (SOHO: SGD backbone + AdamW rest), MMF's
``update_frequency`` accumulation and clipping are explicit: ``num_updates`` counts optimizer updates
exactly as MMF does, independent of how many optimizers step. Lightning still owns devices, DDP/FSDP,
precision (autocast + GradScaler) and checkpoint I/O.

Checkpoints are Lightning checkpoints with MMF's keys added (``model``, ``optimizer``, ``lr_scheduler``,
``config``, ``num_updates``, ``current_iteration``, ``current_epoch``, ``best_update``,
``best_metric_value``); ``model``/``optimizer`` reference the same tensors as Lightning's
``state_dict``/``optimizer_states``, so torch.save stores them once.
"""

from __future__ import annotations

import logging
import random

import lightning.pytorch as pl
import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from mmf_plugins.models.base_model import check_finite
from mmf_plugins.trainers.optimizers import build_optimizers, build_scheduler

logger = logging.getLogger(__name__)


def rng_state() -> dict:
    """RNG states as tensors and plain containers, so checkpoints load with weights_only=True."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy_state = [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)]
    return {"torch": torch.get_rng_state(), "numpy": numpy_state, "python": list(random.getstate()),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class MMFLightningModule(pl.LightningModule):
    def __init__(self, model: torch.nn.Module, config: DictConfig, data_module=None):
        super().__init__()
        self.model = model
        self.config = config
        self.data_module = data_module
        self.automatic_optimization = False
        self.update_frequency = max(1, int(config.training.get("update_frequency", 1)))
        self.num_updates = 0
        self.batches_consumed = 0  # training batches fully processed (the sampler's resume point)
        self.best_update = 0
        self.best_metric_value = None
        self.bad_items = 0
        self.seen_items = 0
        self.last_losses: dict[str, float] = {}
        self._loss_sums: dict[str, tuple[float, int]] = {}
        self._pending_rng = None

    # ------------------------------------------------------------------ data
    def train_dataloader(self):
        dm = self.data_module
        dm.rank, dm.world_size = self.trainer.global_rank, self.trainer.world_size
        # an endless sampler: the loop callback stops at training.max_updates, so a finished run can be
        # resumed with a larger max_updates and a killed one continues mid-"epoch"
        return dm.train_dataloader(start_batch=self.batches_consumed)

    # ------------------------------------------------------------- optimizers
    def configure_optimizers(self):
        optimizers = build_optimizers(self.model, self.config)
        schedulers = []
        for opt in optimizers:
            s = build_scheduler(opt, self.config)
            if s is not None:
                schedulers.append({"scheduler": s, "interval": "step"})
        return optimizers, schedulers

    # --------------------------------------------------------------- training
    def on_train_start(self) -> None:
        if self._pending_rng is not None:
            set_rng_state(self._pending_rng)
            self._pending_rng = None

    def training_step(self, batch, batch_idx):
        self._count_bad(batch)
        self._maybe_new_epoch()
        if batch.get_batch_size() == 0:
            # every item of this batch was unreadable (counted above): nothing to learn from, but the
            # batch still counts, so accumulation and the resume position stay aligned
            self.batches_consumed += 1
            if self.batches_consumed % self.update_frequency == 0:
                self._optimizer_step()
            return None
        output = self.model(batch)
        losses = output.get("losses") or {}
        if not losses:
            raise ValueError(f"model returned no losses for a training batch of '{batch.get('dataset_name')}'; "
                             "check that the batch carries targets (the dataset's answer/label processor)")
        if self.config.training.get("exit_on_nan_losses", True):
            check_finite(losses, self.num_updates + 1, batch.get("id", batch.get("question_id")))
        total = sum(losses.values())
        self.manual_backward(total / self.update_frequency)
        self.batches_consumed += 1
        # logged losses: the mean of each loss over the batches since the last log line (every dataset of
        # a multi-dataset run shows its losses, not only the last batch's dataset); the loop callback resets
        named = {f"train/{k.split('/', 1)[1]}" if k.count("/") >= 2 else f"train/{k}": float(v.detach())
                 for k, v in losses.items()}
        named["train/total_loss"] = float(total.detach())
        for k, v in named.items():
            s, n = self._loss_sums.get(k, (0.0, 0))
            self._loss_sums[k] = (s + v, n + 1)
        self.last_losses = {k: s / n for k, (s, n) in self._loss_sums.items()}
        if self.batches_consumed % self.update_frequency == 0:
            self._optimizer_step()
        return total.detach()

    def _optimizer_step(self) -> None:
        optimizers = self.optimizers()
        optimizers = optimizers if isinstance(optimizers, list) else [optimizers]
        clip = self.config.training.get("clip_norm")
        for opt in optimizers:
            if clip:
                self.clip_gradients(opt, gradient_clip_val=float(clip), gradient_clip_algorithm="norm")
            opt.step()
            opt.zero_grad(set_to_none=True)
        schedulers = self.lr_schedulers()
        if schedulers is not None:
            for s in schedulers if isinstance(schedulers, list) else [schedulers]:
                s.step()
        self.num_updates += 1

    def reset_logged_losses(self) -> None:
        """Start a new averaging window for ``last_losses`` (called after each train log line)."""
        self._loss_sums = {}

    def _maybe_new_epoch(self) -> None:
        """Models with epoch schedules (SOHO's backbone freeze) get ``on_train_epoch_start(epoch)``;
        an epoch is one pass over the training data in MMF's sense (batches_per_epoch updates)."""
        hook = getattr(self.model, "on_train_epoch_start", None)
        if hook is None or self.data_module is None:
            return
        epoch = self.batches_consumed // max(1, self.data_module.batches_per_epoch())
        if epoch != getattr(self, "_epoch_seen", None):
            self._epoch_seen = epoch
            hook(epoch)

    def _count_bad(self, batch) -> None:
        n_bad = len(batch.get("bad_items", []) or [])
        self.seen_items += n_bad + batch.get_batch_size()
        if n_bad:
            self.bad_items += n_bad
            limit = float(self.config.training.get("max_bad_fraction", 0.01))
            frac = self.bad_items / max(1, self.seen_items)
            if self.seen_items >= 100 and frac > limit:
                raise RuntimeError(
                    f"{self.bad_items} of {self.seen_items} training items were unreadable ({frac:.1%} > "
                    f"training.max_bad_fraction={limit}); last: {batch['bad_items'][-1]}. Fix or remove them, "
                    "or raise the budget"
                )

    def current_lr(self) -> float:
        opts = self.optimizers()
        opt = opts[0] if isinstance(opts, list) else opts
        return float(opt.param_groups[0]["lr"])

    # ------------------------------------------------------------ checkpoints
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        prefix = "model."
        checkpoint["model"] = {k[len(prefix):]: v for k, v in checkpoint["state_dict"].items() if k.startswith(prefix)}
        opt_states = checkpoint.get("optimizer_states", [])
        checkpoint["optimizer"] = opt_states[0] if len(opt_states) == 1 else opt_states
        sched = checkpoint.get("lr_schedulers", [])
        checkpoint["lr_scheduler"] = sched[0] if len(sched) == 1 else sched
        checkpoint["config"] = OmegaConf.to_container(self.config, resolve=True)
        checkpoint["num_updates"] = self.num_updates
        checkpoint["current_iteration"] = self.batches_consumed
        checkpoint["current_epoch"] = self.batches_consumed // max(1, self.data_module.batches_per_epoch()) if self.data_module else 0
        checkpoint["best_update"] = self.best_update
        checkpoint["best_iteration"] = self.best_update * self.update_frequency
        checkpoint["best_metric_value"] = self.best_metric_value
        checkpoint["mmf_plugins"] = {"batches_consumed": self.batches_consumed, "bad_items": self.bad_items,
                                     "seen_items": self.seen_items, "rng": rng_state()}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.num_updates = int(checkpoint.get("num_updates", 0))
        self.best_update = int(checkpoint.get("best_update", 0))
        self.best_metric_value = checkpoint.get("best_metric_value")
        extra = checkpoint.get("mmf_plugins", {})
        self.batches_consumed = int(extra.get("batches_consumed", self.num_updates * self.update_frequency))
        self.bad_items = int(extra.get("bad_items", 0))
        self.seen_items = int(extra.get("seen_items", 0))
        self._pending_rng = extra.get("rng")
