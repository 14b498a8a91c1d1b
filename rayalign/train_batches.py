"""A phase's rows and micro-batches: examples -> row dicts (`to_rows`, `tokenize_rows`) ->
the per-rank count of micro-batches (`plan_data`) -> one epoch's micro-batches
(`micro_batches`) -> tensors (`build_micro_batch`), and the policy forward of either layout
(`batch_logprobs`). Pure; `rayalign.train.Trainer` runs the forward and backward.

Each epoch the rank's rows are put in the length-grouped order of
`rayalign.grouping.grouped_batches` (seeded by ``seed`` and the epoch; ``length_window`` 0
keeps the shard's order), and each micro-batch is padded to its own longest sequence; the step
metrics report the padding share. Paired objectives and SFT take ``micro_batch_size``
consecutive rows of that order. ``aot_unpaired`` and ``kto`` read (prompt, completion, label) rows in
that order and fills two buffers; a micro-batch is the first ``micro_batch_size`` rows
labelled true (chosen) and the first ``micro_batch_size`` labelled false (rejected), so
chosen and rejected sets have equal sizes on every rank (AOT's gather needs equal per-rank
sizes); rows left in a buffer at the end of an epoch are dropped for that epoch. A shard
therefore needs both labels in about equal numbers (the Ray driver, actors/trainer.py, ships
them so). ``kto`` also forwards, without gradient, each micro-batch's mismatched pairs
(`kl_pairs`: prompt i with completion i - 1, TRL's shift) through the policy and the
reference for KTO's reference point z0, averaged over the ranks (`rayalign.kto`).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .config import DataConfig
from .config_train import TrainConfig
from .data import (
    Example,
    PreferenceExample,
    SFTExample,
    SequenceBatch,
    UnpairedExample,
    collate,
    encode,
)
from .grouping import grouped_batches
from .logprobs import sequence_logprobs
from .pairpack import PairPack, pack_pairs, pair_logprobs

OBJECTIVE_DATA_KIND = {
    "sft": "sft",
    "dpo": "preference",
    "weighted_dpo": "preference",
    "ipo": "preference",
    "aot": "preference",
    "aot_unpaired": "unpaired",
    "kto": "unpaired",
}
_EXAMPLE_TYPE = {"sft": SFTExample, "preference": PreferenceExample, "unpaired": UnpairedExample}


def to_rows(examples: Sequence[Example]) -> list[dict]:
    """Validated examples (`rayalign.data.load_dataset`) as plain row dicts for Ray Data."""
    return [dataclasses.asdict(e) for e in examples]


def _present(value) -> bool:
    return value is not None and not (isinstance(value, float) and math.isnan(value))


@dataclass(frozen=True)
class DataPlan:
    """What the loop needs to know about a phase's whole dataset before it starts."""

    batches_per_epoch: int  # micro-batches per rank per epoch (sets the schedule length)
    precomputed_ref: bool  # reference log-prob columns present (else a reference model)


def plan_data(examples: Sequence[Example], train: TrainConfig, world_size: int) -> DataPlan:
    """Check that the examples fit the objective and count the micro-batches per rank.

    Ray Train splits a dataset into equal shards of ``len // world_size`` rows. Reference
    log-probs must be present in every row or in none (a mix is a data error).
    """
    kind = OBJECTIVE_DATA_KIND[train.objective]
    expected = _EXAMPLE_TYPE[kind]
    if not all(isinstance(e, expected) for e in examples):
        got = next(type(e).__name__ for e in examples if not isinstance(e, expected))
        raise ValueError(f"objective {train.objective!r} needs {kind} data, got {got} rows")
    if kind == "unpaired":
        chosen = sum(e.label for e in examples)
        rows = min(chosen, len(examples) - chosen) // world_size
        ref_flags = [_present(e.ref_logps) for e in examples]
    else:
        rows = len(examples) // world_size
        ref_flags = [_present(e.ref_chosen_logps) and _present(e.ref_rejected_logps)
                     for e in examples] if kind == "preference" else [False]
    if any(ref_flags) and not all(ref_flags):
        missing = ref_flags.index(False) + 1
        raise ValueError(f"reference log-probs are present in some rows but not in row {missing}")
    if rows == 0:
        raise ValueError(f"{len(examples)} rows cannot fill one micro-batch on {world_size} ranks")
    return DataPlan(math.ceil(rows / train.micro_batch_size), all(ref_flags) and kind != "sft")


def micro_batches(rows: Iterable[Mapping], objective: str, size: int, window: int = 0,
                  seed: int = 0, epoch: int = 0) -> Iterator[list[Mapping]]:
    """One epoch of a rank's rows grouped into micro-batches (module docstring), in the
    length-grouped order of `rayalign.grouping.grouped_batches` (``window`` > 0)."""
    if window > 0:
        rows = list(rows)
        unpaired = OBJECTIVE_DATA_KIND[objective] == "unpaired"
        batches = grouped_batches([_row_length(r) for r in rows],
                                  size * (2 if unpaired else 1), window, seed, epoch)
        rows = [rows[i] for batch in batches for i in batch]
    if OBJECTIVE_DATA_KIND[objective] != "unpaired":
        it = iter(rows)
        while chunk := list(itertools.islice(it, size)):
            yield chunk
        return
    buffers: dict[bool, list[Mapping]] = {True: [], False: []}
    for row in rows:
        buffers[bool(row["label"])].append(row)
        if len(buffers[True]) >= size and len(buffers[False]) >= size:
            yield buffers[True][:size] + buffers[False][:size]
            buffers = {k: v[size:] for k, v in buffers.items()}


def _row_length(row: Mapping) -> int:
    """The padded width a row needs: prompt + its longest response, in tokens when the row is
    tokenized (`tokenize_rows`), else in characters (a proxy with the same order, roughly)."""
    sides = [f for f in _RESPONSE_FIELDS["sft"] + _RESPONSE_FIELDS["preference"]
             + _RESPONSE_FIELDS["unpaired"] if f in row or f"{f}_ids" in row]
    if "prompt_ids" in row:
        return len(row["prompt_ids"]) + max(len(row[f"{f}_ids"]) for f in sides)
    return len(row["prompt"]) + max(len(row[f]) for f in sides)


@dataclass
class MicroBatch:
    """Tokenized sequences of one micro-batch; pairs put chosen rows before rejected rows, in
    two rows each or packed into one (`rayalign.pairpack`)."""

    sequences: SequenceBatch | PairPack
    num_examples: int  # pairs, or SFT rows
    ref_logps: Tensor | None  # (2B,) chosen then rejected, when precomputed
    weights: Tensor | None  # (B,) for weighted_dpo
    identical: Tensor | None = None  # (B,) bool, pairs: rejected == chosen token for token
    kl_sequences: SequenceBatch | None = None  # kto: prompt i with completion i-1 (z0's estimate)


_RESPONSE_FIELDS = {"sft": ("response",), "preference": ("chosen", "rejected"),
                    "unpaired": ("completion",)}


def tokenize_rows(tokenizer, rows: Iterable[Mapping], kind: str, data: DataConfig) -> list[dict]:
    """Rows plus their token ids, so that the training step does no tokenization.

    Adds ``prompt_ids`` and ``<field>_ids`` for each response field of the kind (``chosen`` /
    ``rejected``, ``response`` or ``completion``), exactly `rayalign.data.encode`'s output.
    TRL likewise tokenizes its dataset before training; the Ray driver does it once per job
    instead of once per epoch on every worker.
    """
    lengths = (data.max_prompt_length, data.max_length)
    out = []
    for row in rows:
        new = dict(row)
        for side in _RESPONSE_FIELDS[kind]:
            new["prompt_ids"], new[f"{side}_ids"] = encode(tokenizer, row["prompt"], row[side],
                                                           *lengths)
        out.append(new)
    return out


def build_micro_batch(
    tokenizer, rows: Sequence[Mapping], objective: str, data: DataConfig, precomputed_ref: bool,
    pack: bool = False,
) -> MicroBatch:
    """Collate one micro-batch of row dicts (`to_rows` format, optionally `tokenize_rows`);
    ``pack``: pairs as `rayalign.pairpack.PairPack` rows.

    Rows without token ids are tokenized here (`rayalign.data.encode`, the same ids).
    """
    kind = OBJECTIVE_DATA_KIND[objective]
    lengths = (data.max_prompt_length, data.max_length)

    def ids(row: Mapping, field: str) -> tuple[list[int], list[int]]:
        if "prompt_ids" in row:
            return list(row["prompt_ids"]), list(row[f"{field}_ids"])
        return encode(tokenizer, row["prompt"], row[field], *lengths)

    if kind == "sft":
        return MicroBatch(collate([ids(r, "response") for r in rows], tokenizer.pad_token_id),
                          len(rows), None, None)
    if kind == "unpaired":
        ordered = [r for r in rows if r["label"]] + [r for r in rows if not r["label"]]
        ref = [r["ref_logps"] for r in ordered] if precomputed_ref else None
        seqs = [ids(r, "completion") for r in ordered]
        kl = collate(kl_pairs(seqs, data.max_length), tokenizer.pad_token_id) \
            if objective == "kto" else None
        return MicroBatch(collate(seqs, tokenizer.pad_token_id), sum(bool(r["label"]) for r in rows),
                          _tensor(ref), None, kl_sequences=kl)
    # chosen rows, then rejected rows: one forward (as rayalign.data.collate_pairs)
    chosen, rejected = [ids(r, "chosen") for r in rows], [ids(r, "rejected") for r in rows]
    seqs = (pack_pairs(chosen, rejected, tokenizer.pad_token_id) if pack
            else collate(chosen + rejected, tokenizer.pad_token_id))
    ref = ([r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows]
           if precomputed_ref else None)
    weights = _tensor([r["weight"] for r in rows]) if objective == "weighted_dpo" else None
    identical = torch.tensor([c == r for c, r in zip(chosen, rejected)], dtype=torch.bool)
    return MicroBatch(seqs, len(rows), _tensor(ref), weights, identical)


def kl_pairs(seqs: Sequence[tuple[list[int], list[int]]], max_length: int
             ) -> list[tuple[list[int], list[int]]]:
    """KTO's mismatched pairs for its KL estimate z0: prompt i with the completion of example
    i - 1 (the first prompt gets the last completion), as TRL's ``_get_kl_dataset`` shifts
    the completions within a batch; the completion is cut to fit ``max_length``."""
    return [(prompt, seqs[i - 1][1][:max(1, max_length - len(prompt))])
            for i, (prompt, _) in enumerate(seqs)]


def batch_logprobs(model: torch.nn.Module, batch: SequenceBatch | PairPack) -> tuple[Tensor, Tensor]:
    """Summed response log-probs and response token counts of either layout (chosen first)."""
    if isinstance(batch, PairPack):
        return pair_logprobs(model, batch)
    return sequence_logprobs(model, batch)


def _tensor(values: Sequence[float] | None) -> Tensor | None:
    return None if values is None else torch.tensor([float(v) for v in values],
                                                    dtype=torch.float32)
