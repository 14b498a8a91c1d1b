"""Configuration of a training phase (`TrainConfig`, with LoRA) and of the one-phase training
jobs (`TrainJobConfig`: jobs/sft.py, jobs/dpo.py, jobs/aot.py); loaded by
`rayalign.config.load_config`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .config import DataConfig, ModelConfig, Section, TinyDefaultConfig

class LoraConfig(Section):
    """LoRA adapters through peft (Hu et al. 2021): W + (alpha / r) B A on `target_modules`.

    Only the adapters train (and enter the optimizer, so AdamW state is tiny); the reference
    model of objectives without precomputed reference columns is the same network with the
    adapters disabled, so no second model is loaded.
    """

    r: int = Field(8, gt=0, description="Rank of the update B A.")
    alpha: float = Field(16.0, gt=0.0, description="Scale alpha / r of the update.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the adapter input.")
    target_modules: tuple[str, ...] | Literal["all-linear"] = Field(
        "all-linear", description="Module names (e.g. [q_proj, v_proj]) or all-linear (every "
        "linear layer but the output head, peft's shorthand).",
    )
    export: Literal["merged", "adapter"] = Field(
        "merged", description="merged = a plain Hugging Face checkpoint with B A added into W; "
        "adapter = peft's adapter directory (adapter_config.json names the base checkpoint).",
    )


class TrainConfig(Section):
    """One training phase: objective, optimisation and DeepSpeed settings."""

    objective: Literal["sft", "dpo", "weighted_dpo", "aot", "aot_unpaired", "ipo", "kto"] = "dpo"
    beta: float = Field(0.1, gt=0.0)
    label_smoothing: float = Field(0.0, ge=0.0, lt=0.5)
    aot_loss: Literal["logistic", "hinge", "squared"] = "logistic"
    desirable_weight: float = Field(1.0, gt=0.0, description="kto: lambda_D (KTO Eq. 8).")
    undesirable_weight: float = Field(1.0, gt=0.0, description="kto: lambda_U.")
    lr: float = Field(1e-5, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0)
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    micro_batch_size: int = Field(4, gt=0, description="Rows per worker per forward.")
    gradient_accumulation_steps: int = Field(1, ge=1)
    max_grad_norm: float = Field(1.0, gt=0.0)
    zero_stage: Literal[0, 1, 2, 3] = 0
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, gt=0.0)
    resources_per_worker: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per training worker, e.g. "
        "{node_b: 1} to place the workers on the nodes started with that resource.",
    )
    max_nan_steps: int = Field(3, ge=0, description="Skipped non-finite steps before failing.")
    max_failures: int = Field(1, ge=0, description="Ray Train retries, resuming from checkpoint.")
    startup_timeout_s: float = Field(
        900.0, gt=0.0, description="Longest a worker waits for DeepSpeed's CPU op to be built "
        "or loaded on its host (rayalign/dsops.py); past it the job fails naming the holder.",
    )
    checkpoint_every: int | None = Field(None, gt=0, description="Optimizer steps; None = end only.")
    disable_dropout: bool = Field(True, description="Set every nn.Dropout of the policy to p=0 "
                                  "(TRL's default: dropout makes policy and reference log-probs "
                                  "of the same text differ).")
    length_window: int = Field(
        32, ge=0, description="Micro-batches per shuffle window whose rows are sorted by length "
        "(less padding; rayalign.grouping); 1 = a plain per-epoch shuffle, 0 = rows in their "
        "given order.")
    pack_pairs: bool = Field(
        True, description="Preference objectives: one forward per pair, the prompt shared by "
        "chosen and rejected computed once (rayalign.pairpack; exact). Models it cannot serve "
        "(sliding windows, ALiBi, flash-attention) run the two-row forward regardless.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the "
                                         "backward (less memory, ~1/3 more compute).")
    attn_implementation: Literal["eager", "sdpa", "flash_attention_2"] | None = Field(
        None, description="transformers' attention kernel; None = its default (sdpa where "
        "supported); flash_attention_2 needs the flash-attn package and a GPU.",
    )
    offload: Literal["none", "cpu"] = Field(
        "none", description="cpu = ZeRO-3 keeps parameters and optimizer state in CPU memory "
        "(needs zero_stage 3).",
    )
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters instead of every "
                                    "weight; None = full fine-tuning.")
    seed: int = 0

    @model_validator(mode="after")
    def _engine(self) -> "TrainConfig":
        if self.offload != "none" and self.zero_stage != 3:
            raise ValueError(f"offload={self.offload!r} needs zero_stage 3, got {self.zero_stage}")
        if self.lora is not None and self.zero_stage == 3:
            raise ValueError("lora with zero_stage 3 is not supported (the adapters are a few MB:"
                             " use zero_stage 0-2)")
        return self


# TrainConfig fields fixed when the DeepSpeed engine is built, so equal for all its phases,
ENGINE_FIELDS = ("zero_stage", "micro_batch_size", "gradient_accumulation_steps", "max_grad_norm",
                 "disable_dropout", "gradient_checkpointing", "attn_implementation", "offload",
                 "lora", "seed")
# and those plus the settings of the Ray Train job that hosts the engine.
JOB_FIELDS = ENGINE_FIELDS + ("num_workers", "use_gpu", "cpus_per_worker", "resources_per_worker",
                              "max_failures")


class TrainJobConfig(Section):
    """jobs/sft.py, jobs/dpo.py, jobs/aot.py: one training phase as a Ray Train job.

    With no `policy` / `data` this is the embedded tiny default: a tiny model and toy-task
    data of the kind `train.objective` needs are generated under `output_dir`.
    """

    output_dir: str = Field(description="Run directory: the HF export goes to <output_dir>/policy, "
                                        "Ray Train checkpoints to <output_dir>/ray (local or NFS).")
    policy: ModelConfig | None = Field(None, description="Starting checkpoint; None = tiny default.")
    data: DataConfig | None = Field(None, description="Training data; None = toy task.")
    tiny: TinyDefaultConfig = TinyDefaultConfig()
    train: TrainConfig = TrainConfig()
