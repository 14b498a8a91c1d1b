"""The per-step training metrics: each micro-batch's sums (`add_micro_batch`), reduced over
the accumulation and the ranks once per optimizer step (`step_metrics`)."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from . import losses
from .data import SequenceBatch
from .pairpack import PairPack
from .train_batches import MicroBatch
from .train_phase import PhaseState

_KEYS = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "weight",
         "micro_batches", "examples", "tokens", "computed", "slots", "skipped", "pairs",
         "distinct_pairs", "distinct_wins")


def add(sums: dict[str, float], **values: float) -> None:
    """``sums[key] += value`` for each keyword (missing keys start at 0)."""
    for key, value in values.items():
        sums[key] = sums.get(key, 0.0) + value


def batch_counts(batch: SequenceBatch | PairPack) -> tuple[float, float, float]:
    """Tokens of the sequences, non-padding positions the forward computes, and all its
    positions (rows x width): the step metrics' tokens and padding share."""
    if isinstance(batch, PairPack):
        return (float(batch.sequence_lengths.sum()), float(batch.lengths.sum()),
                float(batch.input_ids.numel()))
    tokens = float(batch.attention_mask.sum())
    return tokens, tokens, float(batch.attention_mask.numel())


def add_micro_batch(sums: dict[str, float], loss: Tensor, batch: MicroBatch,
                    seqs: SequenceBatch | PairPack, terms: losses.PreferenceTerms | None,
                    weights: Tensor | None, paired: bool) -> None:
    """Add one trained micro-batch to ``sums``: its loss, sizes and padding, and with
    preference ``terms`` the mean rewards, their margin, the reward accuracy (``paired``
    data only: accuracy needs pairs) and the accuracy over pairs whose responses differ."""
    tokens, computed, slots = batch_counts(seqs)
    add(sums, loss=loss.item(), micro_batches=1.0, examples=float(batch.num_examples),
        tokens=tokens, computed=computed, slots=slots)
    if terms is not None:
        chosen, rejected = terms.chosen_rewards.mean().item(), terms.rejected_rewards.mean().item()
        add(sums, chosen_reward=chosen, rejected_reward=rejected, margin=chosen - rejected)
        if paired:
            wins = (terms.chosen_rewards > terms.rejected_rewards).float().mean().item()
            add(sums, accuracy=wins)
        if batch.identical is not None:
            distinct_wins, distinct = losses.distinct_pair_wins(
                terms.chosen_rewards, terms.rejected_rewards,
                batch.identical.to(terms.chosen_rewards.device))
            add(sums, pairs=float(batch.num_examples), distinct_pairs=distinct,
                distinct_wins=distinct_wins)
    if weights is not None:
        add(sums, weight=weights.mean().item())


def step_metrics(sums: dict[str, float], seconds: float, lr: float, state: PhaseState,
                 device: torch.device, world_size: int, grad_norm: float | Tensor | None
                 ) -> dict[str, float]:
    """Per-step metrics: means over micro-batches and ranks, rates over all ranks.

    Collective when ``world_size`` > 1 (one all-reduce, on ``device``: an NCCL-only group
    rejects CPU tensors)."""
    totals = torch.tensor([sums.get(k, 0.0) for k in _KEYS], dtype=torch.float64, device=device)
    if world_size > 1:
        dist.all_reduce(totals)
    t = dict(zip(_KEYS, totals.tolist()))
    n = max(t["micro_batches"], 1.0)
    metrics = {"step": float(state.step), "epoch": float(state.epoch), "lr": lr,
               "loss": t["loss"] / n, "examples_per_s": t["examples"] / seconds,
               "tokens_per_s": t["tokens"] / seconds, "skipped": t["skipped"],
               # share of the padded [rows, width] slots of the step's forwards that are padding
               "padding": 1.0 - t["computed"] / t["slots"] if t["slots"] else 0.0}
    metrics.update({k: t[k] / n for k in ("chosen_reward", "rejected_reward", "margin",
                                          "accuracy", "weight") if k in sums})
    if t["pairs"]:  # accuracy over the pairs whose responses differ, and their share
        metrics["identical_share"] = 1.0 - t["distinct_pairs"] / t["pairs"]
        if t["distinct_pairs"]:
            metrics["accuracy_distinct"] = t["distinct_wins"] / t["distinct_pairs"]
    if grad_norm is not None:
        metrics["grad_norm"] = float(grad_norm)
    return metrics
