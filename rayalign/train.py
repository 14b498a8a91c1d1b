"""The per-worker training loop: one DeepSpeed engine, one or more phases.

Ray-free. The caller (Ray Train, torchrun, or a test with a one-rank process group) has
initialized ``torch.distributed``; every rank builds the same :class:`Trainer` and runs the
same phases on its own shard of rows.

A **phase** (`rayalign.train_phase.Phase`) is one objective over one dataset with one `TrainConfig`
(DESIGN.md, Hbat: phases alternate between SFT and a preference objective). Several phases
run on the same engine without reloading the model; the engine-level settings (ZeRO stage,
micro-batch size, gradient accumulation, clipping) are fixed when the engine is built, the
rest (objective, beta, learning rate, weight decay, length) may change per phase.

One optimizer step (the loop in `Trainer.run_phase`):

1. ``gradient_accumulation_steps`` micro-batches, each one forward of the policy over chosen
   rows then rejected rows (the `rayalign.data.collate_pairs` layout), or with
   ``train.pack_pairs`` over one row per pair whose shared prompt is computed once
   (`rayalign.pairpack`, same log-probs; models it cannot serve keep the two rows); token ids
   from `rayalign.train_batches.tokenize_rows` or tokenized on the fly; `rayalign.logprobs`;
   reference log-probs from the precomputed columns or a frozen reference model, the loss
   from `rayalign.losses`, ``engine.backward``. DeepSpeed divides each micro-batch loss by
   the accumulation steps and *averages* gradients over data-parallel ranks, which is what
   `rayalign.aot.aot_terms` requires.
2. The optional gradient hook (:data:`GradHook`, e.g. Hbat's EWC term) on the reduced,
   unclipped gradients; then the learning rate of `rayalign.train_phase.lr_at`; then
   ``engine.step()`` (clipping + AdamW).

Micro-batches: `rayalign.train_batches` (rows -> length-grouped micro-batches -> tensors);
the loss of each objective: `rayalign.train_objective`; the step schedule and a phase's
position: `rayalign.train_phase`; the DeepSpeed config and the policy it wraps:
`rayalign.train_engine`; the step metrics: `rayalign.train_metrics`.

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
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch
import torch.distributed as dist
from torch import Tensor

from . import dsparams
from .config import ModelConfig
from .config_train import ENGINE_FIELDS, TrainConfig
from .data import SequenceBatch
from .dsops import ensure_ops
from .kto import kto_mean_reference_point
from .logprobs import sequence_logprobs
from .lora import adapters_disabled, export_lora
from .models import load_model, load_tokenizer, resolve_dtype, save_checkpoint
from .pairpack import PairPack, supports_pair_packing
from .train_batches import OBJECTIVE_DATA_KIND, batch_logprobs, build_micro_batch, micro_batches
from .train_engine import clips_in_torch, deepspeed_config, engine_zero_stage, load_policy
from .train_metrics import add, add_micro_batch, step_metrics
from .train_objective import objective_loss
from .train_phase import Phase, PhaseResult, PhaseState, lr_at

log = logging.getLogger(__name__)

_DS_TAG = "deepspeed"


class NonFiniteLossError(RuntimeError):
    """Too many consecutive micro-batches had a NaN or infinite loss."""


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
        model = load_policy(self.policy_path, train, ds_config)
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

    # -- the loop ------------------------------------------------------------------------

    def run_phase(
        self,
        phase: Phase,
        state: PhaseState | None = None,
        on_step: StepCallback | None = None,
        grad_hook: GradHook | None = None,
    ) -> PhaseResult:
        """Train ``phase`` from ``state`` (a fresh start if None) to its last step."""
        state = self._start_phase(phase, state)
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
                lr = self._optimizer_step(phase.train, state, steps, grad_hook)
                now = time.perf_counter()
                metrics = step_metrics(sums, now - started, lr, state, self.device,
                                       self.world_size, self._step_grad_norm())
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

    def _start_phase(self, phase: Phase, state: PhaseState | None) -> PhaseState:
        """Check that ``phase`` fits the engine and ``state`` belongs to it; set its weight
        decay. Returns the state to start from (a fresh one if None)."""
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
        return state

    def _optimizer_step(self, train: TrainConfig, state: PhaseState, steps: int,
                        grad_hook: GradHook | None) -> float:
        """At an accumulation boundary: the gradient hook, clipping (`clips_in_torch`), the
        learning rate of step ``state.step`` of ``steps``, ``engine.step()``; returns the rate."""
        if grad_hook is not None:
            grad_hook(self)
        if self.clips_in_torch:
            self._grad_norm = float(torch.nn.utils.clip_grad_norm_(
                self.module.parameters(), train.max_grad_norm, foreach=True))
        lr = lr_at(state.step, steps, train)
        for group in self.engine.optimizer.param_groups:
            group["lr"] = lr
        self.engine.step()
        state.step += 1
        return lr

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
            add(sums, skipped=1.0)
            return False
        state.nonfinite_run = 0
        self.engine.backward(loss)
        add_micro_batch(sums, loss, batch, seqs, terms, weights,
                        paired=OBJECTIVE_DATA_KIND[train.objective] != "unpaired")
        return True

    def _step_grad_norm(self) -> float | Tensor | None:
        """The gradient norm of the step just taken (before clipping), by whoever clipped."""
        return self._grad_norm if self.clips_in_torch else self.engine.get_global_grad_norm()

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
