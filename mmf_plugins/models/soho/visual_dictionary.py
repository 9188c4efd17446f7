"""SOHO's visual dictionary (VD): an online k-means codebook over visual grid features.

Paper: Huang et al., "Seeing Out of tHe bOx", CVPR 2021, §3.2 (Eqs. 2-5). Code followed:
researchmm/soho ``SOHO/models/necks/utils.py`` ``SOHO_Pre_VD`` (commit 95824a8).

* Assignment (Eq. 2): each feature goes to its nearest entry by squared L2,
  ``‖x‖² + ‖e‖² − 2·x·e``, computed as one ``addmm`` (no Python loops, no one-hot matrix).
* Update, training only, once per forward (``update_rule="release"``, the default): per-entry
  counts ``n`` and feature sums ``s`` of the step are summed over all processes
  (``torch.distributed.all_reduce`` when a process group is initialised), then
  ``cluster_size ← d·cluster_size + (1−d)·n``, ``embed_avg ← d·embed_avg + (1−d)·s``, Laplace
  smoothing ``ñ = (cluster_size + ε) / (Σ cluster_size + K·ε) · Σ cluster_size`` and
  ``embed = embed_avg / ñ``. ``cluster_sum`` accumulates raw counts (usage statistics).
  NOTE(parity): the release's ``curr_decay`` stays at the configured ``decay`` (0.4 in its config,
  i.e. 40 % of the old value is kept per step; ``set_decay_updates``/``max_decay`` are never called).
  The paper gives no value for its momentum γ.
* ``update_rule="paper"`` is Eq. 4 literally: ``d_j ← γ·d_j + (1−γ)·mean(assigned x)`` only for
  entries that received features this step (``cluster_size``/``embed_avg``/``cluster_sum`` are still
  tracked as above).
* Output (Eq. 5): the assigned entry with a straight-through gradient, ``x + sg(e_h − x)``; the
  entry is read AFTER this step's update, as in the release.

Deliberate differences from the release: statistics are reduced with one ``all_reduce`` of a packed
tensor instead of two ``all_gather``s, and the codebook is broadcast from rank 0 once on the first
distributed update instead of being averaged over ranks every step (both keep ranks identical); an
optional ``valid`` mask keeps padded positions out of the statistics (the release counts them); a
step whose global count is zero leaves the codebook untouched instead of dividing by zero.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

UPDATE_RULES = ("release", "paper")


def _distributed(process_group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


class VisualDictionary(nn.Module):
    """Codebook ``embed`` ``(K, D)`` with EMA buffers ``cluster_size`` ``(K,)``, ``cluster_sum`` ``(K,)``
    and ``embed_avg`` ``(K, D)``; ``forward(x (N, D), valid (N,) bool | None) -> (quantized (N, D), ids (N,))``.
    """

    def __init__(self, num_embeddings: int = 2048, dim: int = 768, *, decay: float = 0.4, eps: float = 1e-5,
                 update_rule: str = "release", process_group=None):
        super().__init__()
        if num_embeddings < 1 or dim < 1:
            raise ValueError(f"num_embeddings and dim must be positive, got {num_embeddings} and {dim}")
        if not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"decay must be in [0, 1] (fraction of the old value kept per step), got {decay}")
        if float(eps) <= 0:
            raise ValueError(f"eps (Laplace smoothing) must be > 0, got {eps}")
        if update_rule not in UPDATE_RULES:
            raise ValueError(f"update_rule must be one of {UPDATE_RULES}, got {update_rule!r}")
        self.num_embeddings = int(num_embeddings)
        self.dim = int(dim)
        self.decay = float(decay)
        self.eps = float(eps)
        self.update_rule = update_rule
        self.process_group = process_group
        self.register_buffer("embed", torch.randn(self.num_embeddings, self.dim))
        self.register_buffer("cluster_size", torch.zeros(self.num_embeddings))
        self.register_buffer("cluster_sum", torch.zeros(self.num_embeddings))
        self.register_buffer("embed_avg", torch.zeros(self.num_embeddings, self.dim))
        self._synced = False

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.dim}, decay={self.decay}, eps={self.eps}, update_rule={self.update_rule!r}"

    # ------------------------------------------------------------------ assignment
    @torch.no_grad()
    def distances(self, x: torch.Tensor) -> torch.Tensor:
        """Squared L2 distances ``(N, K)`` between features and entries (fp32)."""
        x = x.float()
        e = self.embed.float()
        norms = (x * x).sum(1, keepdim=True) + (e * e).sum(1)
        return torch.addmm(norms, x, e.t(), beta=1.0, alpha=-2.0)

    @torch.no_grad()
    def assign(self, x: torch.Tensor) -> torch.Tensor:
        """Index of the nearest entry for each row of ``x`` ``(N, D)`` -> ``(N,)`` long."""
        if x.dim() != 2 or x.shape[1] != self.dim:
            raise ValueError(f"VisualDictionary expects features (N, {self.dim}), got {tuple(x.shape)}")
        if x.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=x.device)
        return self.distances(x).argmin(1)

    # ------------------------------------------------------------------ EMA update
    @torch.no_grad()
    def batch_statistics(self, x: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor | None = None):
        """Per-entry counts ``(K,)`` and feature sums ``(K, D)`` of this process's batch (fp32)."""
        x = x.detach().float()
        if valid is not None:
            keep = valid.reshape(-1).bool()
            x, indices = x[keep], indices[keep]
        counts = torch.bincount(indices, minlength=self.num_embeddings).to(x.dtype)
        sums = torch.zeros(self.num_embeddings, self.dim, dtype=x.dtype, device=x.device).index_add_(0, indices, x)
        return counts, sums

    @torch.no_grad()
    def _sync_once(self) -> None:
        if self._synced:
            return
        for buf in (self.embed, self.cluster_size, self.cluster_sum, self.embed_avg):
            dist.broadcast(buf, src=dist.get_global_rank(self.process_group, 0) if self.process_group else 0,
                           group=self.process_group)
        self._synced = True

    @torch.no_grad()
    def update(self, x: torch.Tensor, indices: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """One EMA step with this batch (summed over processes when distributed)."""
        counts, sums = self.batch_statistics(x, indices, valid)
        if _distributed(self.process_group):
            packed = torch.cat([counts[:, None], sums], dim=1)
            dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=self.process_group)
            counts, sums = packed[:, 0], packed[:, 1:]
        if float(counts.sum()) == 0.0:
            return
        d = self.decay
        self.cluster_sum.add_(counts.to(self.cluster_sum.dtype))
        self.cluster_size.mul_(d).add_(counts.to(self.cluster_size.dtype), alpha=1.0 - d)
        self.embed_avg.mul_(d).add_(sums.to(self.embed_avg.dtype), alpha=1.0 - d)
        if self.update_rule == "release":
            total = self.cluster_size.sum()
            smoothed = (self.cluster_size + self.eps) / (total + self.num_embeddings * self.eps) * total
            self.embed.copy_(self.embed_avg / smoothed.unsqueeze(1))
        else:
            used = counts > 0
            means = sums[used] / counts[used].unsqueeze(1)
            self.embed[used] = (d * self.embed[used].float() + (1.0 - d) * means).to(self.embed.dtype)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.training and _distributed(self.process_group):
            self._sync_once()  # before the first assignment, so every rank quantises with rank 0's codebook
        indices = self.assign(x)
        if self.training:
            self.update(x, indices, valid)
        quantized = F.embedding(indices, self.embed).to(x.dtype)
        # straight-through estimator (paper Eq. 5): value of the entry, gradient of x
        return x + (quantized - x).detach(), indices

    def cosine_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """MVM scores: cosine similarity ``(M, K)`` between hidden states ``(M, D)`` and the entries
        (no temperature, as the release); the codebook gets no gradient."""
        return F.normalize(hidden.float(), dim=-1) @ F.normalize(self.embed.detach().float(), dim=-1).t()


__all__ = ["UPDATE_RULES", "VisualDictionary"]
