"""Step metrics of a running training stage, so a long run can be watched while it runs.

Rank 0 of a stage holds a `StepLogger`, which writes every step's metrics to

- ``steps.jsonl`` in the stage's log directory (one JSON object per line, flushed at once):
  the driver tails it (`ProgressTail`) to print progress lines, since worker output does
  not reach the driver's console;
- TensorBoard event files in the same directory (tensorboardX), always: view them with
  ``tensorboard --logdir <run_dir>/logs``;
- MLflow and/or Weights & Biases when named in ``report_to`` (as TRL's ``report_to``) and
  installed; a backend that is not installed is skipped with a message saying so, never an
  error (the run's own files still have everything). MLflow reads ``MLFLOW_TRACKING_URI``
  (default ``./mlruns``), W&B its usual environment (``WANDB_MODE=offline`` works offline).

The log directory must be on storage the driver can read (the run directory: local or NFS).
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

STEPS_FILE = "steps.jsonl"
BACKENDS = ("mlflow", "wandb")
SHOWN = ("loss", "margin", "accuracy", "weight", "grad_norm", "lr", "examples_per_s")


def shown(record: Mapping, lines: int = 20) -> bool:
    """Whether the console shows this step: the first, the last and every ceil(steps / lines)-th,
    so a stage prints about `lines` progress lines however long it is (all steps still go to
    steps.jsonl and TensorBoard). A record without a step total is always shown."""
    step, total = int(record["step"]), record.get("steps")
    if not total:
        return True
    return step in (1, int(total)) or step % math.ceil(int(total) / lines) == 0


def progress_line(stage: str, record: Mapping) -> str:
    """One human-readable line for a step record: stage, step/steps and the main metrics."""
    total = record.get("steps")
    head = f"[{stage}] step {int(record['step'])}" + (f"/{int(total)}" if total else "")
    parts = [f"{k}={record[k]:.4g}" for k in SHOWN if isinstance(record.get(k), (int, float))]
    return head + (" " + " ".join(parts) if parts else "")


class StepLogger:
    """Writes one stage's step metrics (see module docstring); use on one rank only."""

    def __init__(self, log_dir: str | Path, stage: str, report_to: Sequence[str] = (),
                 config: Mapping | None = None, say=print):
        from tensorboardX import SummaryWriter

        self.dir = Path(log_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.stage = stage
        self._steps = (self.dir / STEPS_FILE).open("a", encoding="utf-8")
        self._tb = SummaryWriter(logdir=str(self.dir), flush_secs=5)
        self._mlflow = self._wandb = None
        for name in report_to:
            if name not in BACKENDS:
                raise ValueError(f"report_to: unknown backend {name!r}; expected {BACKENDS}")
            if importlib.util.find_spec(name) is None:
                say(f"[{stage}] report_to includes {name!r} but {name} is not installed "
                    f"(pip install {name}); skipping it, TensorBoard and {STEPS_FILE} still log")
            elif name == "mlflow":
                import mlflow

                mlflow.set_experiment("rayalign")
                self._mlflow = mlflow.start_run(run_name=stage)
                mlflow.log_params(dict(config or {}))
            else:
                import wandb

                self._wandb = wandb.init(project="rayalign", name=stage, config=dict(config or {}),
                                         reinit=True)

    def log(self, step: int, metrics: Mapping[str, float], steps: int | None = None) -> None:
        """Record `metrics` of optimizer step `step` (of `steps`) everywhere at once."""
        scalars = {k: float(v) for k, v in metrics.items()
                   if isinstance(v, (int, float)) and math.isfinite(v)}
        record = {**scalars, "step": step, **({"steps": steps} if steps else {})}
        self._steps.write(json.dumps(record) + "\n")
        self._steps.flush()
        for key, value in scalars.items():
            self._tb.add_scalar(f"{self.stage}/{key}", value, step)
        self._tb.flush()
        if self._mlflow is not None:
            import mlflow

            mlflow.log_metrics(scalars, step=step)
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        self._steps.close()
        self._tb.close()
        if self._mlflow is not None:
            import mlflow

            mlflow.end_run()
        if self._wandb is not None:
            self._wandb.finish()


class ProgressTail:
    """Reads the records a `StepLogger` appends to ``steps.jsonl`` from now on (a resumed
    stage appends to its file; what an earlier attempt wrote is not shown again)."""

    def __init__(self, log_dir: str | Path):
        self.path = Path(log_dir) / STEPS_FILE
        self.offset = self.path.stat().st_size if self.path.exists() else 0

    def new_records(self) -> list[dict]:
        """Complete lines added since the last call (a half-written last line waits)."""
        if not self.path.exists():
            return []
        with self.path.open("rb") as f:
            f.seek(self.offset)
            data = f.read()
        complete = data[:data.rfind(b"\n") + 1]
        self.offset += len(complete)
        return [json.loads(line) for line in complete.splitlines() if line.strip()]
