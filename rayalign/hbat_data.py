"""Hbat's data on the workers (Algorithm 1, l. 3, and the per-phase scores): D_IFA and D_HPA
cut into N parts (`split_parts`, `HbatData`), each rank's shard of a phase tokenized
(`phase_rows`), the reference columns of a preference phase from the policy at its start
(`reference_logps`), and the held-out scores of both objectives after every phase
(`held_out_scores`). `rayalign.hbat` runs the schedule on them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

from .config import DataConfig
from .config_hbat import HbatConfig
from .config_train import TrainConfig
from .data import collate, load_dataset
from .hbat_schedule import HbatPhase
from .logprobs import sequence_logprobs
from .train_batches import DataPlan, plan_data, to_rows, tokenize_rows

T = TypeVar("T")


def split_parts(rows: Sequence[T], num_parts: int) -> list[list[T]]:
    """``rows`` cut into ``num_parts`` contiguous, mutually exclusive parts (Algorithm 1, l. 3).

    Part k holds rows ``[k*L//N, (k+1)*L//N)``, so sizes differ by at most one and every row
    is in exactly one part. Shuffle beforehand if the file is ordered.
    """
    if num_parts < 1 or len(rows) < num_parts:
        raise ValueError(f"cannot split {len(rows)} rows into {num_parts} non-empty parts")
    cuts = [k * len(rows) // num_parts for k in range(num_parts + 1)]
    return [list(rows[a:b]) for a, b in zip(cuts, cuts[1:])]


def rank_shard(rows: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Rank ``rank``'s contiguous share of ``rows``: ``len // world_size`` rows, as Ray Train."""
    k = len(rows) // world_size
    return list(rows[rank * k:(rank + 1) * k])


def score(trainer, rows: Sequence[Mapping], sides: Sequence[str], batch_size: int
          ) -> dict[str, tuple[list[float], list[int]]]:
    """Summed response log-probs and response token counts of ``rows`` under the current policy.

    ``rows`` are `rayalign.train_batches.tokenize_rows` output; ``sides`` the response fields to
    score (``"chosen"``, ``"rejected"``, ``"response"``, ``"completion"``). One no-grad pass in
    eval mode, every rank on its own rows: collective under ZeRO-3, so all ranks must pass the
    same number of rows.
    """
    out: dict[str, tuple[list[float], list[int]]] = {side: ([], []) for side in sides}
    trainer.module.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(rows), batch_size):
                chunk = rows[start:start + batch_size]
                seqs = [(r["prompt_ids"], r[f"{side}_ids"]) for side in sides for r in chunk]
                batch = collate(seqs, trainer.tokenizer.pad_token_id).to(trainer.device)
                logps, counts = sequence_logprobs(trainer.engine, batch)
                logps, counts = logps.float().cpu().tolist(), counts.cpu().tolist()
                for s, side in enumerate(sides):
                    out[side][0].extend(logps[s * len(chunk):(s + 1) * len(chunk)])
                    out[side][1].extend(counts[s * len(chunk):(s + 1) * len(chunk)])
    finally:
        trainer.module.train()
    return out


def reference_logps(trainer, rows: Sequence[Mapping], batch_size: int) -> list[dict]:
    """``rows`` (`rayalign.train_batches.tokenize_rows` output) with reference log-prob columns
    from the trainer's *current* policy (`score`): ``ref_chosen_logps`` / ``ref_rejected_logps``
    for pairs, ``ref_logps`` for unpaired rows."""
    sides = ("chosen", "rejected") if "chosen" in rows[0] else ("completion",)
    scores = score(trainer, rows, sides, batch_size)
    out = [dict(r) for r in rows]
    for side in sides:
        key = "ref_logps" if side == "completion" else f"ref_{side}_logps"
        for r, v in zip(out, scores[side][0]):
            r[key] = v
    return out


def held_out_scores(trainer, ifa_rows: Sequence[Mapping] | None,
                    hpa_rows: Sequence[Mapping] | None, batch_size: int) -> dict[str, float]:
    """Both objectives on held-out rows (each rank its shard, totals all-reduced):
    ``ifa_nll`` = -sum log p(response) / response tokens on SFT rows, ``hpa_accuracy`` = share
    of pairs with log p(chosen) > log p(rejected)."""
    totals = torch.zeros(4, dtype=torch.float64, device=trainer.device)
    if ifa_rows:
        logps, counts = score(trainer, ifa_rows, ("response",), batch_size)["response"]
        totals[0], totals[1] = -sum(logps), sum(counts)
    if hpa_rows:
        pairs = score(trainer, hpa_rows, ("chosen", "rejected"), batch_size)
        totals[2] = sum(c > r for c, r in zip(pairs["chosen"][0], pairs["rejected"][0]))
        totals[3] = len(hpa_rows)
    if dist.get_world_size() > 1:
        dist.all_reduce(totals)
    nll, tokens, wins, n = totals.tolist()
    out = {}
    if ifa_rows:
        out["ifa_nll"] = nll / tokens
    if hpa_rows:
        out["hpa_accuracy"] = wins / n
    return out


def _has_reference(examples: Sequence) -> bool:
    keys = ("ref_logps",) if hasattr(examples[0], "ref_logps") else ("ref_chosen_logps",
                                                                      "ref_rejected_logps")
    return all(getattr(e, k, None) is not None for e in examples for k in keys)


def interleave_labels(examples: Sequence) -> list:
    """Unpaired rows reordered true, false, true, false, ... (the surplus of the larger side
    dropped), so that every contiguous part and rank shard holds both labels equally, as
    aot_unpaired's micro-batches need (`rayalign.train_batches.micro_batches`)."""
    chosen = [e for e in examples if e.label]
    rejected = [e for e in examples if not e.label]
    return [e for pair in zip(chosen, rejected) for e in pair]


@dataclass(frozen=True)
class HbatData:
    """The N parts of D_IFA and of D_HPA (validated `rayalign.data` examples, all ranks' rows).

    Unpaired D_HPA is first `interleave_labels`-ed.
    """

    ifa: list[list]
    hpa: list[list]
    eval_ifa: list | None  # held-out sets, whole
    eval_hpa: list | None

    @classmethod
    def load(cls, cfg: HbatConfig, tokenizer) -> HbatData:
        n, hpa = cfg.num_splits, load_dataset(cfg.hpa, tokenizer)
        if cfg.hpa.kind == "unpaired":
            hpa = interleave_labels(hpa)
        held_out = [None if c is None else load_dataset(c, tokenizer)
                    for c in (cfg.eval_ifa, cfg.eval_hpa)]
        return cls(split_parts(load_dataset(cfg.ifa, tokenizer), n), split_parts(hpa, n),
                   *held_out)

    def part(self, phase: HbatPhase) -> list:
        return (self.ifa if phase.kind == "ifa" else self.hpa)[phase.round - 1]

    def held_out_rows(self, cfg: HbatConfig, tokenizer, rank: int, world_size: int
                      ) -> list[list[dict] | None]:
        """This rank's tokenized shards of ``eval_ifa`` and ``eval_hpa`` (None where not given);
        ``cfg`` is the `rayalign.hbat.resolve_inputs` config the data was loaded from."""
        return [None if examples is None else shard_rows(tokenizer, examples, c, rank, world_size)
                for examples, c in ((self.eval_ifa, cfg.eval_ifa), (self.eval_hpa, cfg.eval_hpa))]


def shard_rows(tokenizer, examples: Sequence, data: DataConfig, rank: int, world_size: int
               ) -> list[dict]:
    """Rank ``rank``'s `rank_shard` of ``examples`` as tokenized row dicts."""
    return tokenize_rows(tokenizer, to_rows(rank_shard(examples, rank, world_size)), data.kind,
                         data)


def phase_rows(trainer, examples: Sequence, data: DataConfig, train: TrainConfig,
               preference: bool) -> tuple[list[dict], DataPlan]:
    """This rank's tokenized rows of one phase and the phase's `DataPlan` (all ranks' rows).

    A ``preference`` phase whose examples have no reference columns gets them from the
    trainer's *current* policy (`reference_logps`): the policy at the phase start, theta^IFA,
    is its reference model (`rayalign.hbat`).
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    plan = plan_data(examples, train, world)
    rows = shard_rows(trainer.tokenizer, examples, data, rank, world)
    if preference and not _has_reference(examples):
        rows = reference_logps(trainer, rows, train.micro_batch_size)
        plan = dataclasses.replace(plan, precomputed_ref=True)
    return rows, plan
