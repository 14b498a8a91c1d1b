"""The per-worker training loop: one DeepSpeed engine, one or more phases.

Ray-free. The caller (Ray Train, torchrun, or a test with a one-rank process group) has
initialized ``torch.distributed``; every rank builds the same :class:`Trainer` and runs the
same phases on its own shard of rows.

A **phase** (:class:`Phase`) is one objective over one dataset with one `TrainConfig`
(DESIGN.md, Hbat: phases alternate between SFT and a preference objective). Several phases
run on the same engine without reloading the model; the engine-level settings (ZeRO stage,
micro-batch size, gradient accumulation, clipping) are fixed when the engine is built, the
rest (objective, beta, learning rate, weight decay, length) may change per phase.

One optimizer step (the loop in `Trainer.run_phase`):

1. ``gradient_accumulation_steps`` micro-batches, each one forward of the policy over chosen
   rows then rejected rows (the `rayalign.data.collate_pairs` layout), or with
   ``train.pack_pairs`` over one row per pair whose shared prompt is computed once
   (`rayalign.pairpack`, same log-probs; models it cannot serve keep the two rows); token ids
   from `tokenize_rows` or tokenized on the fly; `rayalign.logprobs`; reference
   log-probs from the precomputed columns or a frozen reference model, the loss from
   `rayalign.losses`, ``engine.backward``. DeepSpeed divides each micro-batch loss by the
   accumulation steps and *averages* gradients over data-parallel ranks, which is what
   `rayalign.losses.aot_terms` requires.
2. The optional gradient hook (:data:`GradHook`, e.g. Hbat's EWC term) on the reduced,
   unclipped gradients; then the learning rate of :func:`lr_at`; then ``engine.step()``
   (clipping + AdamW).

Micro-batches. Each epoch the rank's rows are put in the length-grouped order of
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

Non-finite loss: all ranks agree (one all-reduce) and skip the micro-batch (no backward, so
no rank's gradients see it); more than ``max_nan_steps`` consecutive skips raise
`NonFiniteLossError`.

Data position: ranks agree before every micro-batch that all still have data (one
all-reduce of a flag), so a shard that runs dry ends the epoch on every rank instead of
hanging a collective. A phase runs for exactly `Phase.steps` optimizer steps, cycling over
epochs, so it always ends on an accumulation boundary. `PhaseState` (step, epoch, micro-batch
within the epoch) is saved with the DeepSpeed checkpoint; resuming skips the consumed
micro-batches of the current epoch, which is exact when a re-iteration of the rows yields
the same order (plain lists do).

Reductions: DPO / IPO losses are means over a rank's micro-batch, so the averaged gradient
is that of the mean over the global micro-batch (equal per-rank sizes); AOT sorts over the
global micro-batch; SFT's token mean is per rank (ranks with fewer response tokens weigh
each token more, as in TRL and most trainers). The reference model, when the data has no
reference columns, is the policy checkpoint the `Trainer` was built from, for every phase.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from . import dsparams, losses
from .config import DataConfig, ModelConfig
from .config_train import ENGINE_FIELDS, TrainConfig
from .data import (
    Example,
    PreferenceExample,
    SFTExample,
    SequenceBatch,
    UnpairedExample,
    collate,
    encode,
)
from .dsops import ensure_ops
from .grouping import grouped_batches
from .kto import kto_mean_reference_point, kto_terms
from .logprobs import sequence_logprobs
from .pairpack import PairPack, pack_pairs, pair_logprobs, supports_pair_packing
from .lora import adapters_disabled, apply_lora, export_lora
from .models import load_model, load_tokenizer, resolve_dtype, save_checkpoint

log = logging.getLogger(__name__)

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
_DS_TAG = "deepspeed"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive micro-batches had a NaN or infinite loss."""


# --------------------------------------------------------------------------------------
# Schedule and DeepSpeed config (pure)
# --------------------------------------------------------------------------------------


def total_steps(train: TrainConfig, batches_per_epoch: int) -> int:
    """Optimizer steps of a phase: ``max_steps``, else ``epochs`` full accumulation cycles.

    A trailing partial accumulation of an epoch carries into the next epoch; the last one of
    the phase is dropped, so a phase always ends on a step boundary.
    """
    if train.max_steps is not None:
        return train.max_steps
    steps = train.epochs * batches_per_epoch // train.gradient_accumulation_steps
    if steps < 1:
        raise ValueError(
            f"{batches_per_epoch} micro-batches per epoch x {train.epochs} epochs is less than "
            f"one optimizer step of {train.gradient_accumulation_steps} micro-batches"
        )
    return steps


def lr_at(step: int, total: int, train: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to 0.

    ``warmup = floor(warmup_ratio * total)`` steps ramp ``lr * (step+1)/warmup`` (the first
    step already moves, unlike a ramp from 0); the rest follow
    ``lr * 0.5 * (1 + cos(pi * (step - warmup) / (total - warmup)))``.
    """
    warmup = int(train.warmup_ratio * total)
    if step < warmup:
        return train.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return train.lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def process_group_backend(use_gpu: bool) -> str:
    """The ``torch.distributed`` backend of the training process group.

    NCCL serves CUDA tensors only; the GPU group also gets a gloo backend for CPU tensors
    (torch dispatches each collective by the tensor's device), so a host-side collective in
    DeepSpeed or in this loop cannot crash a multi-GPU run. The loop's own reductions use
    tensors on the training device either way (`Trainer._all`), so a plain NCCL group set up
    by torchrun works too.
    """
    return "cpu:gloo,cuda:nccl" if use_gpu else "gloo"


def clips_in_torch(train: TrainConfig, dtype: torch.dtype) -> bool:
    """Whether the loop clips gradients itself (ZeRO-0 in float32) instead of DeepSpeed.

    There the gradients are plain ``param.grad`` tensors and torch's multi-tensor
    ``clip_grad_norm_`` is one fused pass, where DeepSpeed's clipping is a Python loop over
    the tensors (~10% of a tiny model's step). Partitioned (ZeRO 1-3) or bf16 master
    gradients live in DeepSpeed's buffers, so DeepSpeed clips those.
    """
    return train.zero_stage == 0 and dtype == torch.float32


def engine_zero_stage(train: TrainConfig, dtype: torch.dtype) -> int:
    """The ZeRO stage DeepSpeed runs: ``train.zero_stage``, but at least 1 in bfloat16.

    DeepSpeed's bf16 at ZeRO-0 is ``FP16_UnfusedOptimizer``: no fp32 master weights reachable
    by ``safe_get_full_fp32_param`` (Hbat's anchor, C and penalty would see bf16-rounded
    weights), optimizer state keyed by an fp32 copy (Hbat-Freeze's momentum reset finds
    nothing) and gradients accumulated in bf16. ZeRO-1 with fp32 gradient accumulation is
    DeepSpeed's ``BF16_Optimizer``: fp32 master weights, state and gradient buffers, linked
    to each bf16 parameter through ``_hp_mapping``. With one rank it partitions nothing.
    """
    if dtype == torch.bfloat16 and train.zero_stage == 0:
        return 1
    return train.zero_stage


def deepspeed_config(train: TrainConfig, world_size: int, dtype: torch.dtype) -> dict:
    """The DeepSpeed config dict of a `TrainConfig` (AdamW; the learning rate is set per step).

    ``dtype`` is the training precision: bfloat16 turns on DeepSpeed's bf16 mode (fp32 master
    weights and optimizer state), float32 trains in full precision (the CPU default).
    Clipping is DeepSpeed's unless `clips_in_torch`.
    """
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"training precision must be float32 or bfloat16, got {dtype}")
    zero: dict = {"stage": engine_zero_stage(train, dtype)}
    if train.offload == "cpu":
        pin = torch.cuda.is_available()  # page-locked host memory needs a CUDA runtime
        zero.update(offload_param={"device": "cpu", "pin_memory": pin},
                    offload_optimizer={"device": "cpu", "pin_memory": pin})
    return {
        "train_micro_batch_size_per_gpu": train.micro_batch_size,
        "gradient_accumulation_steps": train.gradient_accumulation_steps,
        "train_batch_size": train.micro_batch_size * train.gradient_accumulation_steps * world_size,
        "gradient_clipping": 0.0 if clips_in_torch(train, dtype) else train.max_grad_norm,
        "zero_optimization": zero,
        # offloaded optimizer state: torch's AdamW on the CPU tensors (DeepSpeedCPUAdam would
        # compile a C++ op on first use)
        **({"zero_force_ds_cpu_optimizer": False} if train.offload == "cpu" else {}),
        "bf16": {"enabled": dtype == torch.bfloat16},
        **({"data_types": {"grad_accum_dtype": "fp32"}}
           if engine_zero_stage(train, dtype) == 1 and dtype == torch.bfloat16 else {}),
        "optimizer": {
            "type": "AdamW",
            # torch.optim.AdamW with its fused kernel (CPU and CUDA): one pass per tensor over
            # param, grad and both moments. The multi-tensor (foreach) form allocates
            # model-sized temporaries: on SmolLM2-135M +0.5 GB peak RSS and 8x the CPU time
            # of the update (bench/results/training.md)
            "params": {"lr": train.lr, "weight_decay": train.weight_decay, "torch_adam": True,
                       "adam_w_mode": True, "fused": True},
        },
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


# --------------------------------------------------------------------------------------
# Data: examples -> rows -> micro-batches
# --------------------------------------------------------------------------------------


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


def batch_counts(batch: SequenceBatch | PairPack) -> tuple[float, float, float]:
    """Tokens of the sequences, non-padding positions the forward computes, and all its
    positions (rows x width): the step metrics' tokens and padding share."""
    if isinstance(batch, PairPack):
        return (float(batch.sequence_lengths.sum()), float(batch.lengths.sum()),
                float(batch.input_ids.numel()))
    tokens = float(batch.attention_mask.sum())
    return tokens, tokens, float(batch.attention_mask.numel())


def _tensor(values: Sequence[float] | None) -> Tensor | None:
    return None if values is None else torch.tensor([float(v) for v in values],
                                                    dtype=torch.float32)


# --------------------------------------------------------------------------------------
# Objective
# --------------------------------------------------------------------------------------


def objective_loss(
    objective: str,
    train: TrainConfig,
    policy_logps: Tensor,
    num_tokens: Tensor,
    ref_logps: Tensor | None,
    weights: Tensor | None,
    num_chosen: int,
    reference_point: Tensor | None = None,
) -> tuple[Tensor, losses.PreferenceTerms | None]:
    """The loss of one micro-batch, and the preference terms (rewards) for logging.

    ``policy_logps`` / ``num_tokens`` / ``ref_logps`` hold the chosen sequences first
    (``num_chosen`` of them), then the rejected ones; SFT has no reference and no terms.
    ``reference_point``: KTO's z0 (`rayalign.kto`), computed by the trainer.
    """
    if objective == "sft":
        return losses.sft_loss(policy_logps, num_tokens), None
    pc, pr = policy_logps[:num_chosen], policy_logps[num_chosen:]
    rc, rr = ref_logps[:num_chosen], ref_logps[num_chosen:]
    if objective in ("dpo", "weighted_dpo"):
        terms = losses.dpo_terms(pc, pr, rc, rr, beta=train.beta, weights=weights,
                                 label_smoothing=train.label_smoothing)
    elif objective == "ipo":
        terms = losses.ipo_terms(pc, pr, rc, rr, beta=train.beta,
                                 chosen_lengths=num_tokens[:num_chosen],
                                 rejected_lengths=num_tokens[num_chosen:])
    elif objective in ("aot", "aot_unpaired"):
        terms = losses.aot_terms(pc, pr, rc, rr, beta=train.beta, paired=objective == "aot",
                                 loss=train.aot_loss, label_smoothing=train.label_smoothing)
    elif objective == "kto":
        terms = kto_terms(pc, pr, rc, rr, beta=train.beta, reference_point=reference_point,
                          desirable_weight=train.desirable_weight,
                          undesirable_weight=train.undesirable_weight)
    else:
        raise ValueError(f"unknown objective {objective!r}")
    return terms.loss, terms


# --------------------------------------------------------------------------------------
# Phases and the trainer
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Phase:
    """One objective over one dataset: ``train.objective`` on this rank's ``rows``.

    ``rows`` are row dicts (`to_rows`) of this rank's shard; iterating it again starts a new
    epoch (a list, or an adapter over a Ray Data shard). ``plan`` comes from `plan_data` on
    the whole dataset.
    """

    name: str
    train: TrainConfig
    data: DataConfig
    rows: Iterable[Mapping]
    plan: DataPlan

    @property
    def steps(self) -> int:
        return total_steps(self.train, self.plan.batches_per_epoch)


@dataclass
class PhaseState:
    """Position in a phase; saved with every DeepSpeed checkpoint for exact resume."""

    phase: str
    step: int = 0  # optimizer steps done
    epoch: int = 0
    batch_in_epoch: int = 0  # micro-batches consumed in the current epoch (skipped ones too)
    nonfinite_run: int = 0  # consecutive skipped micro-batches


@dataclass
class PhaseResult:
    state: PhaseState
    history: list[dict[str, float]] = field(default_factory=list)  # one entry per step


GradHook = Callable[["Trainer"], None]
"""Called once per optimizer step, after the last backward of the accumulation (gradients
reduced and averaged over ranks) and before clipping and the optimizer step. Use
`Trainer.local_params` and `Trainer.update_local_grads` inside it, e.g. an L2 pull toward
an anchor taken when the phase starts (the gradient of ``c/2 ||theta - anchor||^2``)::

    anchor = {n: t.clone() for n, t in trainer.local_params().items()}
    hook = lambda tr: tr.update_local_grads(
        lambda name, theta, grad: grad.add_(theta - anchor[name].to(theta), alpha=c))
    trainer.run_phase(phase, grad_hook=hook)
"""

StepCallback = Callable[[PhaseState, dict[str, float]], None]
"""Called on every rank after each optimizer step with the state and the step's metrics."""


class Trainer:
    """A policy in a DeepSpeed engine on this rank, plus its tokenizer and reference model.

    Args:
        policy: checkpoint of the initial policy; also the reference model of objectives
            without precomputed reference log-probs (loaded lazily, frozen, unpartitioned).
        train: the engine-level settings (`ENGINE_FIELDS`) of every phase run on it.
        dtype: ModelConfig dtype name; "auto" = bfloat16 on GPU, float32 on CPU.
    """

    def __init__(self, policy: str | Path, train: TrainConfig, dtype: str = "auto"):
        import deepspeed

        if not dist.is_initialized():
            raise RuntimeError("Trainer needs an initialized torch.distributed process group")
        self.policy_path, self.engine_train = str(policy), train
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = (torch.device("cuda", torch.cuda.current_device())
                       if train.use_gpu and torch.cuda.is_available() else torch.device("cpu"))
        self.dtype = resolve_dtype(dtype, self.device)
        self.tokenizer = load_tokenizer(policy)
        ds_config = deepspeed_config(train, self.world_size, self.dtype)
        model = self._load_policy(train, ds_config)
        torch.manual_seed(train.seed)
        ensure_ops(train.startup_timeout_s)  # never wait forever on a killed worker's lock
        self.engine, *_ = deepspeed.initialize(
            model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config, dist_init_required=False,
        )
        if self.world_size == 1 and engine_zero_stage(train, self.dtype) == 0:
            # Nothing to average with one data-parallel rank: skip the flatten + all-reduce +
            # copy-back of every gradient that DeepSpeed's ZeRO-0 backward does regardless.
            self.engine.enable_backward_allreduce = False
        self.clips_in_torch = clips_in_torch(train, self.dtype)
        # the reference model is loaded from the same checkpoint, so it packs alike
        self.packs_pairs = supports_pair_packing(self.module)
        self._grad_norm: float | None = None
        self._reference: torch.nn.Module | None = None

    def _load_policy(self, train: TrainConfig, ds_config: dict) -> torch.nn.Module:
        """The float32 policy on the CPU (DeepSpeed casts it to the training dtype before
        moving it to the device, so no GPU ever holds the fp32 copy); under ZeRO-3 built
        partitioned (zero.Init) so no process holds it whole; then dropout, checkpointing
        and LoRA as configured."""
        from transformers import AutoModelForCausalLM

        from transformers.integrations import HfDeepSpeedConfig

        # while this object lives, from_pretrained builds each parameter under zero.Init;
        # dropped right after, so that later loads (the reference model) are plain
        zero3 = None
        if train.zero_stage == 3:
            import deepspeed

            # zero.Init reads the world size from deepspeed.comm, which is 1 until it wraps
            # the existing torch.distributed group (it does not create another one)
            deepspeed.init_distributed(dist_backend=dist.get_backend())
            zero3 = HfDeepSpeedConfig(ds_config)
        extra = {} if train.attn_implementation is None else {
            "attn_implementation": train.attn_implementation}
        model = AutoModelForCausalLM.from_pretrained(self.policy_path, dtype=torch.float32,
                                                     **extra)
        del zero3
        model.train()
        if train.disable_dropout:  # before LoRA: the adapters keep their own dropout
            for module in model.modules():
                if isinstance(module, torch.nn.Dropout):
                    module.p = 0.0
        if train.gradient_checkpointing:
            model.config.use_cache = False
            model.gradient_checkpointing_enable(
                gradient_checkpointing_kwargs={"use_reentrant": False})
        if train.lora is not None:
            return apply_lora(model, train.lora)
        return model.requires_grad_(True)

    # -- the loop ------------------------------------------------------------------------

    def run_phase(
        self,
        phase: Phase,
        state: PhaseState | None = None,
        on_step: StepCallback | None = None,
        grad_hook: GradHook | None = None,
    ) -> PhaseResult:
        """Train ``phase`` from ``state`` (a fresh start if None) to its last step."""
        for name in ENGINE_FIELDS:
            if getattr(phase.train, name) != getattr(self.engine_train, name):
                raise ValueError(f"phase {phase.name!r}: {name} differs from the engine's "
                                 f"({getattr(phase.train, name)} vs "
                                 f"{getattr(self.engine_train, name)})")
        state = state or PhaseState(phase.name)
        if state.phase != phase.name:
            raise ValueError(f"state belongs to phase {state.phase!r}, not {phase.name!r}")
        for group in self.engine.optimizer.param_groups:
            group["weight_decay"] = phase.train.weight_decay
        result, steps = PhaseResult(state), phase.steps
        sums: dict[str, float] = {}
        started = time.perf_counter()
        while state.step < steps:  # one epoch (or the rest of one) per iteration
            batches = micro_batches(phase.rows, phase.train.objective,
                                    phase.train.micro_batch_size, phase.train.length_window,
                                    phase.train.seed, state.epoch)
            batches = itertools.islice(batches, state.batch_in_epoch, None)
            consumed_any = False
            while state.step < steps and self._all((rows := next(batches, None)) is not None):
                consumed_any = True
                state.batch_in_epoch += 1
                if not self._micro_step(phase, rows, state, sums):
                    continue
                if not self.engine.is_gradient_accumulation_boundary():
                    self.engine.step()
                    continue
                if grad_hook is not None:
                    grad_hook(self)
                if self.clips_in_torch:
                    self._grad_norm = float(torch.nn.utils.clip_grad_norm_(
                        self.module.parameters(), phase.train.max_grad_norm, foreach=True))
                lr = lr_at(state.step, steps, phase.train)
                for group in self.engine.optimizer.param_groups:
                    group["lr"] = lr
                self.engine.step()
                state.step += 1
                now = time.perf_counter()
                metrics = self._reduce_metrics(sums, now - started, lr, state)
                sums, started = {}, now
                result.history.append(metrics)
                if self.rank == 0:
                    log.info("phase %s step %d/%d %s", phase.name, state.step, steps, metrics)
                if on_step is not None:
                    on_step(state, metrics)
            if state.step >= steps:
                break
            if not consumed_any and state.batch_in_epoch == 0:
                raise ValueError(f"phase {phase.name!r}: a rank has no rows for epoch "
                                 f"{state.epoch}")
            state.epoch, state.batch_in_epoch = state.epoch + 1, 0
        return result

    def _micro_step(self, phase: Phase, rows: list[Mapping], state: PhaseState,
                    sums: dict[str, float]) -> bool:
        """Forward + backward of one micro-batch; False if it was skipped as non-finite."""
        train = phase.train
        pack = (train.pack_pairs and self.packs_pairs
                and OBJECTIVE_DATA_KIND[train.objective] == "preference")
        batch = build_micro_batch(self.tokenizer, rows, train.objective, phase.data,
                                  phase.plan.precomputed_ref, pack)
        seqs = batch.sequences.to(self.device)
        policy_logps, num_tokens = batch_logprobs(self.engine, seqs)
        ref = batch.ref_logps
        if ref is None and train.objective != "sft":
            ref = self.reference_logps(seqs)
        ref = None if ref is None else ref.to(self.device, policy_logps.dtype)
        weights = None if batch.weights is None else batch.weights.to(self.device)
        z0 = None if batch.kl_sequences is None else self.kto_reference_point(
            batch.kl_sequences.to(self.device))
        loss, terms = objective_loss(train.objective, train, policy_logps, num_tokens, ref,
                                     weights, batch.num_examples, z0)
        if not self._all(bool(torch.isfinite(loss))):
            state.nonfinite_run += 1
            if state.nonfinite_run > train.max_nan_steps:
                raise NonFiniteLossError(
                    f"phase {phase.name!r}: {state.nonfinite_run} consecutive micro-batches "
                    f"with a non-finite loss (last: epoch {state.epoch}, micro-batch "
                    f"{state.batch_in_epoch}, optimizer step {state.step}); max_nan_steps="
                    f"{train.max_nan_steps}")
            log.warning("phase %s: non-finite loss at epoch %d micro-batch %d, skipped",
                        phase.name, state.epoch, state.batch_in_epoch)
            _add(sums, skipped=1.0)
            return False
        state.nonfinite_run = 0
        self.engine.backward(loss)
        tokens, computed, slots = batch_counts(seqs)
        _add(sums, loss=loss.item(), micro_batches=1.0, examples=float(batch.num_examples),
             tokens=tokens, computed=computed, slots=slots)
        if terms is not None:
            chosen, rejected = terms.chosen_rewards.mean().item(), terms.rejected_rewards.mean().item()
            _add(sums, chosen_reward=chosen, rejected_reward=rejected, margin=chosen - rejected)
            if OBJECTIVE_DATA_KIND[train.objective] != "unpaired":  # accuracy needs pairs
                wins = (terms.chosen_rewards > terms.rejected_rewards).float().mean().item()
                _add(sums, accuracy=wins)
            if batch.identical is not None:
                distinct_wins, distinct = losses.distinct_pair_wins(
                    terms.chosen_rewards, terms.rejected_rewards, batch.identical.to(self.device))
                _add(sums, pairs=float(batch.num_examples), distinct_pairs=distinct,
                     distinct_wins=distinct_wins)
        if weights is not None:
            _add(sums, weight=weights.mean().item())
        return True

    def _reduce_metrics(self, sums: dict[str, float], seconds: float, lr: float,
                        state: PhaseState) -> dict[str, float]:
        """Per-step metrics: means over micro-batches and ranks, rates over all ranks."""
        keys = ("loss", "chosen_reward", "rejected_reward", "margin", "accuracy", "weight",
                "micro_batches", "examples", "tokens", "computed", "slots", "skipped", "pairs",
                "distinct_pairs", "distinct_wins")
        # on the training device: an NCCL-only group rejects CPU tensors
        totals = torch.tensor([sums.get(k, 0.0) for k in keys], dtype=torch.float64,
                              device=self.device)
        if self.world_size > 1:
            dist.all_reduce(totals)
        t = dict(zip(keys, totals.tolist()))
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
        norm = self._grad_norm if self.clips_in_torch else self.engine.get_global_grad_norm()
        if norm is not None:
            metrics["grad_norm"] = float(norm)
        return metrics

    def _all(self, flag: bool) -> bool:
        """True iff ``flag`` is true on every rank (one all-reduce when distributed)."""
        if self.world_size == 1:
            return flag
        t = torch.tensor([0 if flag else 1], dtype=torch.int32, device=self.device)
        dist.all_reduce(t)
        return int(t) == 0

    def kto_reference_point(self, kl_seqs: SequenceBatch) -> Tensor:
        """KTO's z0 for this micro-batch: the mismatched pairs' mean log-ratio under the policy
        and the reference (no gradient), averaged over the ranks as TRL gathers it, >= 0."""
        with torch.no_grad():
            policy, _ = sequence_logprobs(self.engine, kl_seqs)
        ratio = (policy - self.reference_logps(kl_seqs).to(policy.dtype)).mean().reshape(1)
        if self.world_size > 1:
            means = [torch.empty_like(ratio) for _ in range(self.world_size)]
            dist.all_gather(means, ratio)
            ratio = torch.cat(means)
        return kto_mean_reference_point(ratio.detach())

    def reference_logps(self, seqs: SequenceBatch | PairPack) -> Tensor:
        """Summed response log-probs under the reference model (no gradient): the policy with
        its LoRA adapters disabled, else the frozen initial policy (`reference`)."""
        with torch.inference_mode():
            if self.engine_train.lora is not None:
                with adapters_disabled(self.module):
                    ref, _ = batch_logprobs(self.module, seqs)
            else:
                ref, _ = batch_logprobs(self.reference(), seqs)
        return ref.clone()  # an inference tensor cannot enter the loss's autograd graph

    def reference(self) -> torch.nn.Module:
        """The frozen initial policy, loaded on first use."""
        if self._reference is None:
            self._reference = load_model(ModelConfig(path=self.policy_path), self.device)
            self._reference.to(self.dtype)
        return self._reference

    # -- gradient hook helpers -------------------------------------------------------------

    @property
    def module(self) -> torch.nn.Module:
        return self.engine.module

    def local_params(self) -> dict[str, Tensor]:
        """This rank's pieces of the fp32 (master) parameters, by name; no communication.

        ZeRO-0: the full tensor (shape of the parameter). ZeRO 1/2: the rank's flat 1-D
        fragment of the parameter inside its optimizer partition; a parameter wholly in other
        ranks' partitions is absent. ZeRO-3: the rank's flat 1-D partition (the full numel is
        `rayalign.dsparams.full_numel`). Summing a per-piece quantity over ranks covers each tensor once
        under ZeRO 1/2/3 (`pieces_partitioned`).
        """
        with torch.no_grad():
            return {name: piece.detach() for name, p in self._trainable()
                    if (piece := dsparams.local_param(p)) is not None}

    def pieces_partitioned(self) -> bool:
        """True when `local_params` pieces are partitions (ZeRO 1/2/3), False when full (ZeRO-0)."""
        return any(dsparams.partitioned(p) for _, p in self._trainable())

    def update_local_grads(self, fn: Callable[[str, Tensor, Tensor], Tensor]) -> None:
        """``grad_piece <- fn(name, param_piece, grad_piece)`` for every trainable parameter.

        Pieces are those of `local_params`; the gradient is the reduced, averaged, unclipped
        one in the accumulation dtype (`rayalign.dsparams.update_local_grad`). No
        communication. ``fn`` may modify the gradient in place and return it.
        """
        with torch.no_grad():
            for name, p in self._trainable():
                dsparams.update_local_grad(p, lambda theta, g, name=name: fn(name, theta, g))

    def _trainable(self) -> Iterator[tuple[str, torch.nn.Parameter]]:
        return ((n, p) for n, p in self.module.named_parameters() if p.requires_grad)

    # -- checkpoints -----------------------------------------------------------------------

    def save_state(self, directory: str | Path, state: PhaseState) -> None:
        """DeepSpeed checkpoint (weights, optimizer, this rank's partitions) + `state`.

        Collective: every rank calls it with a directory of its own or a shared one.
        """
        self.engine.save_checkpoint(str(directory), tag=_DS_TAG,
                                    client_state={"phase_state": dataclasses.asdict(state)})

    def load_state(self, directory: str | Path) -> PhaseState:
        """Restore weights, optimizer and the phase position saved by `save_state`."""
        path, client = self.engine.load_checkpoint(str(directory), tag=_DS_TAG)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}")
        return PhaseState(**client["phase_state"])

    def export(self, out_dir: str | Path) -> Path | None:
        """Hugging Face checkpoint (safetensors + tokenizer) of the current policy.

        Collective. Under ZeRO-3 the weights are gathered module by module to rank 0 only
        (`rayalign.dsparams.rank0_state_dict`). With LoRA: merged into a plain checkpoint or
        peft's adapter directory (`rayalign.lora.export_lora`). Rank 0 writes atomically and
        returns the path; other ranks return None.
        """
        state = dsparams.rank0_state_dict(self.engine) if self.engine_train.zero_stage == 3 \
            else None
        out = None
        if self.rank == 0:
            if self.engine_train.lora is not None:
                out = export_lora(self.module, self.tokenizer, self.policy_path,
                                  self.engine_train.lora, out_dir)
            else:
                out = save_checkpoint(self.module, self.tokenizer, out_dir, state_dict=state)
        dist.barrier()
        return out


def _add(sums: dict[str, float], **values: float) -> None:
    for key, value in values.items():
        sums[key] = sums.get(key, 0.0) + value
