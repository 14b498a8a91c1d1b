"""Hbat: alternating SFT / preference phases held together by the modified EWC.

Paper: shared/papers/hbat.txt, Section 4 and Algorithm 1; contract: shared/DESIGN.md, "Hbat".
The numerics (C, AC, F, the penalty gradient, the freeze selection) are `rayalign.ewc`, the
penalty as it runs in the trainer `rayalign.hbat_penalty`, the data of the phases (parts,
rank shards, reference columns, held-out scores) `rayalign.hbat_data`, the order of the
phases `rayalign.hbat_schedule`; this module is the per-worker run of that schedule on one
`rayalign.train.Trainer`, and its inputs and summary.

**Schedule** (Algorithm 1). D_IFA and D_HPA are each split into N parts
(`rayalign.hbat_data.split_parts`), then

    n = 1:     SFT on D_IFA^1 (no penalty: nothing has been learnt from D_HPA yet, Sec. 4.3)
               preference on D_HPA^1, penalty toward theta^IFA weighted by F^IFA   (Eq. 5)
    n = 2..N:  SFT on D_IFA^n, penalty toward theta^HPA weighted by F^HPA            (Eq. 8)
               preference on D_HPA^n, penalty toward theta^IFA weighted by F^IFA   (Eq. 5)

theta^IFA is the policy right after the SFT phase n (so: at the start of preference phase n),
theta^HPA the policy after preference phase n-1 (at the start of SFT phase n): the anchor of a
phase is always the snapshot taken when it starts, which is also theta_before of its own C
(Eq. 7). F^k = F_max softmax(g(AC^k)) with AC^k the sum of C over all finished phases of type k
(Eq. 10): for preference phase n that includes SFT phase n, for SFT phase n the preference
phases 1..n-1. The baselines (`rayalign.config_hbat.HBAT_VARIANTS`) change only the penalty mode
(ewc / freeze / none) and N (no_alternating and sequential use N = 1).

**Hbat-Freeze**: where Hbat would add the penalty, the ``freeze_fraction`` tensors with the
largest AC^k instead get a zero gradient, and their Adam first moment is zeroed when the phase
starts, so AdamW leaves them exactly where they were (weight decay 0 is required).

**ZeRO**: the hook works on `Trainer.local_params` / `Trainer.update_local_grads` pieces: a
ZeRO-3 rank handles its own flat partition, a ZeRO 1/2 rank its fragments of the optimizer
partition, so a step adds no communication; the anchor is a copy of the same pieces (on the
CPU with ``offload_anchor``; with parameters on a GPU every step then copies the rank's anchor
pieces to the GPU, pinned and asynchronous: set ``offload_anchor: false`` when memory allows).
C needs whole-tensor sums: under ZeRO 1/2/3 the per-rank sums are all-reduced once per phase
and divided by the full numel.

**Reference model of a preference phase**: the policy at the phase start (theta^IFA, also the
phase's anchor), as the SFT model is for the sequential two-stage baseline; the paper leaves it
open. Its log-probs are computed once when the phase starts (one no-grad pass over each rank's
rows) and travel as the reference columns, so no second model is held. A D_HPA file that
already has reference columns is used as it is.

**Checkpoints and resume.** After every phase all ranks write a DeepSpeed checkpoint (weights,
optimizer, each rank's partitions) and rank 0 then records the phase in the run directory's
manifest (`rayalign.rundir.RunDir`; atomic) with its C, the importance statistics it used and
its training metrics. That is the whole state: the next phase is the first one not recorded;
AC^k is the sum of the recorded C of type k; F follows from AC and the config; the anchor of the
next phase is the parameters at its start, i.e. the checkpoint itself. Nothing else (anchors,
F, data positions) needs saving. A run stopped inside a phase restarts that phase from the
previous phase's checkpoint (the checkpoint of phase k replaces that of phase k-1 once k is
recorded), so mid-phase checkpoints (`TrainConfig.checkpoint_every`) are not used here.
"""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch.distributed as dist

from .config_hbat import HbatConfig
from .ewc import AccumulatedChange, Snapshot
from .hbat_data import HbatData, held_out_scores, phase_rows
from .hbat_penalty import (
    PhasePenalty,
    accumulated_from_records,
    global_change,
    penalty_hook,
    phase_penalty,
)
from .hbat_schedule import HbatPhase, config_schedule, train_config
from .rundir import RunDir
from .tracking import StepLogger, progress_line, shown
from .train_phase import Phase, PhaseResult, PhaseState

log = logging.getLogger(__name__)

POLICY_STAGE = "policy"  # the run directory's stage for the final Hugging Face export


# --------------------------------------------------------------------------------------
# The whole schedule on one engine (per worker, Ray-free)
# --------------------------------------------------------------------------------------


def resolve_inputs(cfg: HbatConfig) -> HbatConfig:
    """``cfg`` with the embedded default's paths (under ``run_dir``) for a missing policy,
    D_IFA or D_HPA; writes nothing (`prepare_inputs` does)."""
    from .config import DataConfig, ModelConfig

    root = Path(cfg.run_dir) / "inputs"
    toy_ifa = DataConfig(path=str(root / "eval_ifa.jsonl"), kind="sft")
    toy_hpa = DataConfig(path=str(root / "eval_hpa.jsonl"), kind="preference")
    return cfg.model_copy(update={
        "policy": cfg.policy or ModelConfig(path=str(root / "base")),
        "ifa": cfg.ifa or DataConfig(path=str(root / "ifa.jsonl"), kind="sft"),
        "hpa": cfg.hpa or DataConfig(path=str(root / "hpa.jsonl"), kind="preference"),
        "eval_ifa": cfg.eval_ifa or (toy_ifa if cfg.ifa is None else None),
        "eval_hpa": cfg.eval_hpa or (toy_hpa if cfg.hpa is None else None),
    })


def prepare_inputs(cfg: HbatConfig) -> HbatConfig:
    """`resolve_inputs`, generating the embedded default's missing files (idempotent)."""
    from . import toytask
    from .tiny import build_tiny_checkpoint

    resolved, tiny = resolve_inputs(cfg), cfg.tiny
    if cfg.policy is None and not Path(resolved.policy.path).exists():
        build_tiny_checkpoint(resolved.policy.path, toytask.corpus(), arch=tiny.arch,
                              hidden_size=tiny.hidden_size, num_layers=tiny.num_layers,
                              seed=tiny.seed)
    if cfg.ifa is None and not Path(resolved.ifa.path).exists():
        toytask.write_jsonl(resolved.ifa.path, toytask.make_rows(tiny.train_rows, tiny.seed))
    if cfg.hpa is None and not Path(resolved.hpa.path).exists():
        toytask.write_jsonl(resolved.hpa.path,
                            toytask.make_preference_rows(tiny.train_rows, tiny.seed + 1))
    if cfg.eval_ifa is None and cfg.ifa is None and not Path(resolved.eval_ifa.path).exists():
        toytask.write_jsonl(resolved.eval_ifa.path,
                            toytask.make_rows(tiny.eval_rows, tiny.seed + 2))
    if cfg.eval_hpa is None and cfg.hpa is None and not Path(resolved.eval_hpa.path).exists():
        toytask.write_jsonl(resolved.eval_hpa.path,
                            toytask.make_preference_rows(tiny.eval_rows, tiny.seed + 3))
    return resolved


def fingerprint(cfg: HbatConfig) -> dict:
    """The run directory's configuration: a run resumes only under the same one."""
    return cfg.model_dump(mode="json")


def finished_phases(run: RunDir, phases: Sequence[HbatPhase]) -> list[HbatPhase]:
    """The recorded prefix of ``phases``; a later phase recorded without an earlier is an error."""
    done = [p for p in phases if run.done(p.name)]
    if done != list(phases[:len(done)]):
        raise RuntimeError(f"{run.root}: recorded phases {[p.name for p in done]} are not a "
                           f"prefix of the schedule")
    return done


PhaseCallback = Callable[[HbatPhase, dict], None]
"""Called on every rank after each phase is checkpointed (and recorded, on rank 0)."""


def _step_printer(step_log: StepLogger | None, name: str, steps: int):
    """Rank 0's per-step callback: every step to ``logs/<phase>`` (steps.jsonl, TensorBoard),
    about 20 progress lines a phase to the log."""
    if step_log is None:
        return None

    def on_step(state, metrics: dict) -> None:
        step_log.log(state.step, metrics, steps)
        record = {**metrics, "step": state.step, "steps": steps}
        if shown(record):
            log.info(progress_line(name, record))
    return on_step


def run_schedule(cfg: HbatConfig, trainer, on_phase: PhaseCallback | None = None) -> dict:
    """Run every unfinished phase of ``cfg``'s schedule on ``trainer``; return a summary.

    Every rank calls this with a `rayalign.train.Trainer` built from
    ``resolve_inputs(cfg).policy`` and ``cfg.sft``. The run directory (shared by all ranks)
    must exist with ``cfg``'s fingerprint (`fingerprint`; the driver creates it). Resumes
    after the last recorded phase (module docstring). The reference model of a preference
    phase is the policy at its start (theta^IFA, the phase's anchor), its log-probs computed
    once when the phase starts, unless the preference file already has reference columns.
    """
    rank, world = dist.get_rank(), dist.get_world_size()
    run = RunDir(cfg.run_dir, fingerprint(cfg))
    phases = config_schedule(cfg)
    done, ac = _resume(run, phases, trainer)
    inputs = resolve_inputs(cfg)
    data = HbatData.load(inputs, trainer.tokenizer)
    held_out = data.held_out_rows(inputs, trainer.tokenizer, rank, world)
    for phase in phases[len(done):]:
        started = time.perf_counter()
        if rank == 0:
            run.start(phase.name)
        train = train_config(cfg, phase)
        data_cfg = inputs.ifa if phase.kind == "ifa" else inputs.hpa
        rows, plan = phase_rows(trainer, data.part(phase), data_cfg, train, phase.kind == "hpa")
        anchor = Snapshot.take(trainer.local_params(),
                               device="cpu" if cfg.ewc.offload_anchor else None)
        penalty = phase_penalty(phase, ac, cfg.ewc)
        result = _train_phase(run, trainer, phase, Phase(phase.name, train, data_cfg, rows, plan),
                              penalty, anchor, cfg.ewc.lam)
        change = global_change(trainer, anchor)
        ac.add(phase.kind, change)
        evaluation = held_out_scores(trainer, *held_out, cfg.sft.micro_batch_size)
        metrics = {
            "kind": phase.kind, "round": phase.round, "objective": train.objective,
            "steps": result.state.step, "change": change,
            "penalty": None if penalty is None else penalty.to_log(), "eval": evaluation,
            "first": result.history[0] if result.history else {},
            "last": result.history[-1] if result.history else {},
        }
        _checkpoint(run, trainer, phase, result.state, metrics, done, started)
        done.append(phase)
        if on_phase is not None:
            on_phase(phase, metrics)
    started = time.perf_counter()
    policy = trainer.export(run.path("policy"))
    if rank == 0:
        run.record(POLICY_STAGE, {"policy": policy}, {}, time.perf_counter() - started)
    return {"phases": [p.name for p in phases], "policy": None if policy is None else str(policy)}


def _resume(run: RunDir, phases: Sequence[HbatPhase], trainer
            ) -> tuple[list[HbatPhase], AccumulatedChange]:
    """The recorded phases and their AC^k (Eq. 10), the trainer restored from the last one's
    checkpoint (module docstring: the checkpoint and the records are the whole state)."""
    done = finished_phases(run, phases)
    ac = accumulated_from_records(done, [run.get(p.name).metrics["change"] for p in done])
    if done:
        trainer.load_state(run.get(done[-1].name).outputs["checkpoint"])
        if dist.get_rank() == 0:
            log.info("hbat: resuming after %s (%d of %d phases done)", done[-1].name,
                     len(done), len(phases))
    return done, ac


def _train_phase(run: RunDir, trainer, phase: HbatPhase, job: Phase,
                 penalty: PhasePenalty | None, anchor: Snapshot, lam: float) -> PhaseResult:
    """Train ``job`` (the trainer's phase of ``phase``) with ``penalty`` toward ``anchor`` as its
    gradient hook; rank 0 logs the penalty and every step (`_step_printer`)."""
    rank = dist.get_rank()
    if rank == 0 and penalty is not None:
        log.info("hbat %s: %s penalty, F^%s entropy %.4f (normalized %.4f), max share %.4f, "
                 "top %s", phase.name, penalty.mode, phase.importance_from.upper(),
                 penalty.stats["entropy"], penalty.stats["normalized_entropy"],
                 penalty.stats["max_share"], penalty.stats["top"][:3])
    step_log = StepLogger(run.path("logs", phase.name), phase.name) if rank == 0 else None
    try:
        return trainer.run_phase(job, on_step=_step_printer(step_log, phase.name, job.steps),
                                 grad_hook=penalty_hook(trainer, penalty, anchor, lam))
    finally:
        if step_log is not None:
            step_log.close()


def _checkpoint(run: RunDir, trainer, phase: HbatPhase, state: PhaseState, metrics: dict,
                done: Sequence[HbatPhase], started: float) -> None:
    """Every rank writes its part of the phase's DeepSpeed checkpoint; then rank 0 records the
    phase with ``metrics`` and deletes the previous phase's checkpoint (only the newest is
    ever loaded)."""
    checkpoint = run.path(phase.name, "checkpoint")
    trainer.save_state(checkpoint, state)
    dist.barrier()
    if dist.get_rank() == 0:
        run.record(phase.name, {"checkpoint": checkpoint}, metrics, time.perf_counter() - started)
        if done:
            shutil.rmtree(run.path(done[-1].name, "checkpoint"), ignore_errors=True)


def check_inputs(cfg: HbatConfig) -> None:
    """Load, split and plan every phase's data as the workers will: bad rows or parts too
    small for a micro-batch on every worker fail here, before any worker starts."""
    from .models import load_tokenizer
    from .train_batches import plan_data

    resolved = resolve_inputs(cfg)
    data = HbatData.load(resolved, load_tokenizer(resolved.policy.path))
    for phase in config_schedule(cfg):
        try:
            plan_data(data.part(phase), train_config(cfg, phase), cfg.sft.num_workers)
        except ValueError as err:
            raise ValueError(f"{phase.name}: {err}") from None
    for name, examples in (("eval_ifa", data.eval_ifa), ("eval_hpa", data.eval_hpa)):
        if examples is not None and len(examples) < cfg.sft.num_workers:
            raise ValueError(f"{name}: {len(examples)} rows for {cfg.sft.num_workers} workers")


def summary_rows(run: RunDir, phases: Sequence[HbatPhase]) -> list[dict]:
    """One row per recorded phase for the job's table: objective, steps, last training loss and
    reward accuracy, the held-out scores after the phase (`rayalign.hbat_data.held_out_scores`),
    and the penalty actually used (mode, normalized entropy and max share of F, its top
    tensor, how many tensors were frozen)."""
    rows = []
    for phase in phases:
        if not run.done(phase.name):
            break
        m = run.get(phase.name).metrics
        penalty = m["penalty"] or {}
        rows.append({
            "phase": phase.name, "objective": m["objective"], "steps": m["steps"],
            "loss": m["last"].get("loss"), "accuracy": m["last"].get("accuracy"),
            "eval_ifa_nll": m["eval"].get("ifa_nll"), "eval_hpa_acc": m["eval"].get("hpa_accuracy"),
            "penalty": penalty.get("mode", "none"),
            "F_norm_entropy": penalty.get("normalized_entropy"),
            "F_max_share": penalty.get("max_share"),
            "F_top": penalty["top"][0][0] if penalty else None,
            "frozen": len(penalty.get("frozen", [])),
        })
    return rows


def summary_table(rows: Sequence[dict]) -> str:
    """`summary_rows` as a Markdown table."""
    if not rows:
        return "(no finished phase)"
    keys = list(rows[0])

    def cell(v) -> str:
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(cell(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)

