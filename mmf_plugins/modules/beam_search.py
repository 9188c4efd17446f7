"""Greedy and beam-search decoding over a step function (works with or without a KV cache).

Follows the 2019 Hugging Face ``generate`` that Oscar ships (microsoft/Oscar
``oscar/modeling/modeling_utils.py``: ``_generate_no_beam_search``, ``_generate_beam_search``,
``BeamHypotheses``), which is what the released VinVL captioning numbers were decoded with:

* every sequence starts with ``bos``; decoding stops at ``eos`` or after ``max_length`` tokens
  (``max_length`` counts ``bos``);
* beam search keeps ``2 * num_beams`` candidates per step; a candidate ending in ``eos`` (or any
  candidate on the last step) becomes a finished hypothesis scored ``sum_logprob / len(hyp) ** length_penalty``
  where ``len(hyp)`` counts ``bos`` and not ``eos``; on the last step the final word's log-prob is in
  the score but the word itself is replaced by ``eos`` (upstream quirk, kept for parity);
* an example is done when it holds ``num_keep_best`` hypotheses and none of this step's candidates can
  beat the worst of them (``worst >= best_candidate / (max_length - 1) ** length_penalty``);
* greedy search (``num_beams == 1``) returns the mean log-prob of the emitted tokens (``eos`` included).

The model side is a ``step_fn(tokens) -> log_probs``: ``tokens`` is ``(N, t)`` (all tokens so far,
``bos`` first; finished rows are fed ``pad``), the result ``(N, vocab)`` log-probabilities of token
``t + 1``. A cached model keeps its own state and gets ``reorder_fn(index)`` whenever rows are
re-gathered; ``index`` always keeps a row inside its own example's group of ``num_beams`` rows, so a
cache may share per-example state (e.g. an encoded image prefix) across the group.

Deliberate differences from upstream: candidate selection is vectorised over the batch (no Python loop
over examples or candidates); padding rows of finished examples point at their own example's first
beam (upstream points at row 0 of the batch); examples with fewer than ``num_keep_best`` hypotheses get
score ``-1e5`` and all-``pad`` tokens, as upstream; sampling / repetition penalty are not implemented.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

StepFn = Callable[[Tensor], Tensor]
ReorderFn = Callable[[Tensor], None]

MISSING_HYPOTHESIS_SCORE = -1e5


def _check(max_length: int, num: int, name: str) -> None:
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (it counts the bos token), got {max_length}")
    if num < 1:
        raise ValueError(f"{name} must be >= 1, got {num}")


@torch.no_grad()
def greedy_search(
    step_fn: StepFn,
    batch_size: int,
    *,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    max_length: int,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Argmax decoding. Returns ``tokens (B, 1, max_length)`` (``bos`` first, ``eos``, then ``pad``)
    and ``scores (B, 1)``: the mean log-prob of the emitted tokens."""
    _check(max_length, batch_size, "batch_size")
    tokens = torch.full((batch_size, 1), bos_token_id, dtype=torch.long, device=device)
    unfinished = torch.ones(batch_size, dtype=torch.bool, device=device)
    logprobs, alive = [], []
    cur_len = 1
    while cur_len < max_length:
        log_probs = step_fn(tokens)
        next_token = log_probs.argmax(dim=-1)
        logprobs.append(log_probs.gather(-1, next_token[:, None]).squeeze(-1))
        alive.append(unfinished)
        next_token = torch.where(unfinished, next_token, torch.full_like(next_token, pad_token_id))
        tokens = torch.cat([tokens, next_token[:, None]], dim=1)
        unfinished = unfinished & (next_token != eos_token_id)
        cur_len += 1
        if not bool(unfinished.any()):
            break
    if cur_len == max_length:  # unfinished rows end with eos in place of their last word
        tokens[:, -1] = torch.where(unfinished, torch.full_like(tokens[:, -1], eos_token_id), tokens[:, -1])
    logprobs_t = torch.stack(logprobs, dim=1)
    alive_t = torch.stack(alive, dim=1).to(logprobs_t.dtype)
    scores = (logprobs_t * alive_t).sum(dim=1) / alive_t.sum(dim=1)
    if tokens.size(1) < max_length:
        tokens = torch.cat([tokens, tokens.new_full((batch_size, max_length - tokens.size(1)), pad_token_id)], dim=1)
    return tokens[:, None, :], scores[:, None]


@torch.no_grad()
def beam_search(
    step_fn: StepFn,
    batch_size: int,
    *,
    num_beams: int,
    bos_token_id: int,
    eos_token_id: int,
    pad_token_id: int,
    max_length: int,
    length_penalty: float = 1.0,
    num_keep_best: int = 1,
    reorder_fn: ReorderFn | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor]:
    """Beam search over ``batch_size`` examples with ``num_beams`` rows each (row ``b * num_beams + k``).

    ``step_fn`` sees ``(batch_size * num_beams, t)`` tokens. Returns ``tokens (B, num_keep_best,
    max_length)`` (``bos`` first, ``eos`` after the last word, then ``pad``) and ``scores (B,
    num_keep_best)`` (length-normalised sum log-prob), best first.
    """
    _check(max_length, num_beams, "num_beams")
    if num_keep_best < 1:
        raise ValueError(f"num_keep_best must be >= 1, got {num_keep_best}")
    B, K, L = batch_size, num_beams, max_length
    N = B * K
    num_cand = 2 * K
    rows = torch.arange(B, device=device)
    tokens = torch.full((N, 1), bos_token_id, dtype=torch.long, device=device)
    beam_scores = torch.zeros(B, K, device=device)
    beam_scores[:, 1:] = -1e9  # only the first beam of each example expands at step one
    beam_scores = beam_scores.view(-1)
    hyp_scores = torch.full((B, num_keep_best), float("-inf"), device=device)
    hyp_tokens = torch.full((B, num_keep_best, L), pad_token_id, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    done_bound = float(L - 1) ** length_penalty

    cur_len = 1
    while cur_len < L:
        log_probs = step_fn(tokens).float()  # (N, V)
        V = log_probs.size(-1)
        cand = (log_probs + beam_scores[:, None]).view(B, K * V)
        next_scores, next_ids = cand.topk(num_cand, dim=1, largest=True, sorted=True)  # (B, 2K)
        beam_id = torch.div(next_ids, V, rounding_mode="floor")
        word = next_ids % V

        # an example is done once no candidate can beat its worst kept hypothesis
        full = torch.isfinite(hyp_scores).all(dim=1)
        worst = hyp_scores.min(dim=1).values
        done = done | (full & (worst >= next_scores[:, 0] / done_bound))

        last = cur_len + 1 == L
        to_hyp = (word == eos_token_id) | last
        to_beam = ~to_hyp
        # candidates are read in score order until num_beams of them went to the beam
        beams_before = torch.cumsum(to_beam.long(), dim=1) - to_beam.long()
        considered = beams_before < K
        add = to_hyp & considered & ~done[:, None]

        # finished hypotheses: tokens so far (+ eos), score normalised by their length
        src_rows = rows[:, None] * K + beam_id  # (B, 2K)
        cand_scores = torch.where(add, next_scores / float(cur_len) ** length_penalty, torch.full_like(next_scores, float("-inf")))
        if bool(add.any()):
            cand_tokens = torch.full((B, num_cand, L), pad_token_id, dtype=torch.long, device=device)
            cand_tokens[:, :, :cur_len] = tokens[src_rows.view(-1)].view(B, num_cand, cur_len)
            cand_tokens[:, :, cur_len] = eos_token_id
            all_scores = torch.cat([hyp_scores, cand_scores], dim=1)
            order = torch.sort(all_scores, dim=1, descending=True, stable=True).indices[:, :num_keep_best]
            hyp_scores = all_scores.gather(1, order)
            all_tokens = torch.cat([hyp_tokens, cand_tokens], dim=1)
            hyp_tokens = all_tokens.gather(1, order[:, :, None].expand(-1, -1, L))

        if last:
            break
        # next beams: the first K non-finishing candidates; finished examples get padding rows
        pick = torch.sort((~(to_beam & considered)).long(), dim=1, stable=True).indices[:, :K]  # (B, K)
        new_scores = next_scores.gather(1, pick)
        new_words = word.gather(1, pick)
        new_src = src_rows.gather(1, pick)
        keep = ~done[:, None]
        new_scores = torch.where(keep, new_scores, torch.zeros_like(new_scores))
        new_words = torch.where(keep, new_words, torch.full_like(new_words, pad_token_id))
        new_src = torch.where(keep, new_src, (rows * K)[:, None].expand(-1, K))
        beam_scores = new_scores.reshape(-1)
        index = new_src.reshape(-1)
        tokens = torch.cat([tokens[index], new_words.reshape(-1, 1)], dim=1)
        if reorder_fn is not None:
            reorder_fn(index)
        cur_len += 1
        if bool(done.all()):
            break

    missing = ~torch.isfinite(hyp_scores)
    hyp_scores = hyp_scores.masked_fill(missing, MISSING_HYPOTHESIS_SCORE)
    hyp_tokens = hyp_tokens.masked_fill(missing[:, :, None], pad_token_id)
    return hyp_tokens, hyp_scores
