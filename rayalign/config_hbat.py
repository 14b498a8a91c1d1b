"""Configuration of Hbat (`HbatConfig`: jobs/hbat.py): the variants, the modified EWC
(`EWCConfig`) and the two training phases that share one engine."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .config import DataConfig, ModelConfig, Section, TinyDefaultConfig
from .config_train import JOB_FIELDS, TrainConfig

class EWCConfig(Section):
    """Hbat's modified EWC (DESIGN.md, Hbat): importance from accumulated parameter change."""

    mode: Literal["ewc", "freeze", "none"] = "ewc"
    lam: float = Field(1.0, ge=0.0, description="lambda of the penalty.")
    f_max: float = Field(1.0, gt=0.0)
    scale: float = Field(
        1.0, gt=0.0,
        description="Softmax inverse temperature: multiplies AC/mean(AC) (normalize=mean) or raw "
        "AC (normalize=none; the authors' code amounts to 1e20).",
    )
    normalize: Literal["mean", "none"] = "mean"
    freeze_fraction: float = Field(0.2, gt=0.0, lt=1.0)
    offload_anchor: bool = Field(True, description="Keep theta* on the CPU.")


HbatVariant = Literal["hbat", "hbat_freeze", "no_ewc", "no_alternating", "sequential"]

# variant -> (EWC mode of the penalized phases, whether D_IFA and D_HPA are split into N parts)
HBAT_VARIANTS: dict[str, tuple[str, bool]] = {
    "hbat": ("ewc", True),  # Algorithm 1
    "hbat_freeze": ("freeze", True),  # Hbat-Freeze: freeze the top tensors instead of the penalty
    "no_ewc": ("none", True),  # ablation "w/o EWC"
    "no_alternating": ("ewc", False),  # ablation "w/o alternating": N = 1, with EWC
    "sequential": ("none", False),  # the two-stage baseline: SFT, then preference training
}
HBAT_PREFERENCE_OBJECTIVES = ("dpo", "weighted_dpo", "aot", "aot_unpaired")


class HbatConfig(Section):
    """jobs/hbat.py: Hbat (DESIGN.md "Hbat"; paper Algorithm 1) or one of its baselines.

    `variant` fixes the EWC mode and whether the data is split (`HBAT_VARIANTS`): hbat (EWC,
    N parts), hbat_freeze (freeze the top `ewc.freeze_fraction` tensors instead), no_ewc,
    no_alternating (N = 1 with EWC) and sequential (N = 1, no EWC: SFT then preference).
    `ewc.mode` and `num_splits` default from it; contradicting it is an error. All phases run
    on one engine, so the `JOB_FIELDS` of `sft` and `preference` must agree.

    With no `policy` / `ifa` / `hpa` this is the embedded tiny default: a tiny model, the toy
    sorting task as D_IFA (`tiny.train_rows` rows) and as D_HPA gold vs a near miss
    (`toytask.make_preference_rows`, as many rows), generated under `run_dir`, and held-out
    sets of `tiny.eval_rows` rows each for `eval_ifa` / `eval_hpa` unless those are given.
    After every phase the policy is scored on the held-out sets that exist (both objectives,
    so the conflict between them shows): token NLL on `eval_ifa`, and on `eval_hpa` the share
    of pairs whose chosen response the policy gives the higher log-probability.
    """

    policy: ModelConfig | None = Field(None, description="Starting checkpoint; None = tiny default.")
    ifa: DataConfig | None = Field(None, description="D_IFA: instruction-following (SFT) data, "
                                   "kind sft; None = toy task.")
    hpa: DataConfig | None = Field(None, description="D_HPA: preference data, kind preference "
                                   "(unpaired for aot_unpaired); None = toy task.")
    eval_ifa: DataConfig | None = Field(None, description="Held-out SFT data (kind sft); None = "
                                        "toy held-out set when ifa is None, else no IFA score.")
    eval_hpa: DataConfig | None = Field(None, description="Held-out pairs (kind preference); "
                                        "None = toy set when hpa is None, else no HPA score.")
    tiny: TinyDefaultConfig = TinyDefaultConfig()
    variant: HbatVariant = "hbat"
    num_splits: int = Field(2, ge=1, description="N of Algorithm 1 (default 2 when the variant "
                            "alternates, else 1).")
    ewc: EWCConfig = EWCConfig()
    sft: TrainConfig = Field(TrainConfig(objective="sft"), description="SFT phases.")
    preference: TrainConfig = Field(TrainConfig(), description="Preference phases; objective "
                                    "dpo, weighted_dpo, aot or aot_unpaired.")
    run_dir: str = Field("runs/hbat", description="Phase checkpoints, state and metrics; shared "
                         "storage on a multi-node cluster.")

    @model_validator(mode="before")
    @classmethod
    def _variant_defaults(cls, data: object) -> object:
        if not isinstance(data, dict) or data.get("variant", "hbat") not in HBAT_VARIANTS:
            return data
        mode, alternating = HBAT_VARIANTS[data.get("variant", "hbat")]
        data = {"num_splits": 2 if alternating else 1, **data}
        if isinstance(data.get("ewc", {}), dict):
            data["ewc"] = {"mode": mode, **data.get("ewc", {})}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> "HbatConfig":
        mode, alternating = HBAT_VARIANTS[self.variant]
        if self.ewc.mode != mode:
            raise ValueError(f"variant {self.variant!r} implies ewc.mode={mode!r}, "
                             f"got {self.ewc.mode!r}")
        if not alternating and self.num_splits != 1:
            raise ValueError(f"variant {self.variant!r} trains on undivided data: num_splits must "
                             f"be 1, got {self.num_splits}")
        if self.sft.objective != "sft":
            raise ValueError(f"sft.objective must be 'sft', got {self.sft.objective!r}")
        if self.preference.objective not in HBAT_PREFERENCE_OBJECTIVES:
            raise ValueError(f"preference.objective must be one of {HBAT_PREFERENCE_OBJECTIVES}, "
                             f"got {self.preference.objective!r}")
        if self.ifa is not None and self.ifa.kind != "sft":
            raise ValueError(f"ifa.kind must be 'sft', got {self.ifa.kind!r}")
        kind = "unpaired" if self.preference.objective == "aot_unpaired" else "preference"
        if self.hpa is None and kind == "unpaired":
            raise ValueError("the toy D_HPA is paired: give hpa (kind unpaired) for aot_unpaired")
        if self.eval_ifa is not None and self.eval_ifa.kind != "sft":
            raise ValueError(f"eval_ifa.kind must be 'sft', got {self.eval_ifa.kind!r}")
        if self.eval_hpa is not None and self.eval_hpa.kind != "preference":
            raise ValueError(f"eval_hpa.kind must be 'preference', got {self.eval_hpa.kind!r}")
        if self.hpa is not None and self.hpa.kind != kind:
            raise ValueError(f"hpa.kind must be {kind!r} for {self.preference.objective}, "
                             f"got {self.hpa.kind!r}")
        differ = [f for f in JOB_FIELDS
                  if getattr(self.sft, f) != getattr(self.preference, f)]
        if differ:
            raise ValueError(f"sft and preference run on one engine; these must be equal: {differ}")
        for name, train in (("sft", self.sft), ("preference", self.preference)):
            if train.checkpoint_every is not None:
                raise ValueError(f"{name}.checkpoint_every: Hbat checkpoints after every phase "
                                 "and resumes at a phase start; leave it unset")
            if mode == "freeze" and train.weight_decay != 0:
                raise ValueError(f"{name}.weight_decay must be 0 for hbat_freeze: decoupled "
                                 "weight decay would still move the frozen tensors")
        return self
