"""Policy sampling: one engine protocol, two engines (DESIGN.md, "Engines").

Both engines take plain prompt strings and return, per prompt, ``n`` `Completion`s with the
same schema: the decoded text, the generated token ids and why generation finished.

- `HFEngine`: Hugging Face ``generate``, batched and left-padded, CPU or GPU.
- `VLLMEngine`: ``vllm.LLM`` + ``SamplingParams``, imported lazily, for GPUs.
- `select_engine` decides between them from the config and what the machine has, and is a
  pure function so the decision is testable where vLLM is not installed.

Tokenization is the same in both engines and matches `rayalign.data.encode`: the prompt is
tokenized without special tokens and keeps its *last* ``max_prompt_length`` tokens, so a
sample is conditioned on exactly the prompt tokens its reference log-prob is computed on.

Seeds and determinism. Every (prompt, sample index) pair draws from its own random stream,
seeded from the prompt's seed (`derive_seed`). The HF engine samples by the Gumbel-max trick
with one ``torch.Generator`` per row: ``argmax(logits / T + G)``, ``G ~ Gumbel(0, 1)`` drawn
from the row's generator after top-p filtering, is an exact draw from the tempered, top-p
truncated softmax. Consequences, all covered by tests:

- same prompts, same seeds, same model -> same samples, token for token;
- a prompt's sample does not depend on the *other* prompts in its batch (batch size, order,
  actor count), up to float round-off from padding, which can flip a near-tie in rare cases;
- without explicit seeds, prompt ``i`` of a call gets ``derive_seed(cfg.seed, i)``, so
  results then depend on the position in the call: the pipeline therefore passes seeds
  derived from each row's index in the dataset.

vLLM draws from its own generator per request (``SamplingParams.seed``); it is deterministic
for a seed as vLLM documents, but its samples differ from the HF engine's.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass
from typing import Literal, Protocol

import torch

from .config import ModelConfig, SamplingConfig
from .models import load_model, load_tokenizer

FinishReason = Literal["stop", "length"]


@dataclass(frozen=True)
class Completion:
    """One sampled response. `token_ids` are the generated tokens, including the EOS that
    ended them; `text` is their decoding without special tokens, cut before a stop string."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: FinishReason

    def num_tokens(self, eos_token_id: int | None) -> int:
        """Generated tokens, not counting the EOS that ended them (the answer's length)."""
        ends = bool(self.token_ids) and self.token_ids[-1] == eos_token_id
        return len(self.token_ids) - int(ends)


class SamplingEngine(Protocol):
    """What the sampler actor and the service need from an engine."""

    cfg: SamplingConfig

    def generate(
        self, prompts: list[str], seeds: list[int] | None = None,
        params: SamplingConfig | None = None,
    ) -> list[list[Completion]]:
        """``params.n`` completions per prompt (params default to the engine's config)."""
        ...


def derive_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed that depends only on `seed` and `keys` (stable across processes)."""
    data = ",".join(str(int(k)) for k in (seed, *keys)).encode()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def prompt_token_ids(tokenizer, prompt: str, max_prompt_length: int | None) -> list[int]:
    """Prompt tokens as `rayalign.data.encode` makes them: no special tokens, left-truncated."""
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    return ids[-max_prompt_length:] if max_prompt_length else ids


def _seeds(params: SamplingConfig, n_prompts: int, seeds: list[int] | None) -> list[int]:
    if seeds is None:
        return [derive_seed(params.seed, i) for i in range(n_prompts)]
    if len(seeds) != n_prompts:
        raise ValueError(f"got {len(seeds)} seeds for {n_prompts} prompts")
    return [int(s) for s in seeds]


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


def select_engine(
    cfg: SamplingConfig, vllm_available: bool, gpu_available: bool
) -> Literal["hf", "vllm"]:
    """`auto` -> vLLM when it is installed and a GPU is visible, else HF; explicit choices
    are honoured or refused with the reason (never silently swapped)."""
    if cfg.engine == "hf":
        return "hf"
    if cfg.engine == "vllm":
        if not vllm_available:
            raise RuntimeError("sampling.engine is 'vllm' but vllm is not installed "
                               "(pip install 'rayalign[gpu]'), or set sampling.engine: hf")
        if not gpu_available:
            raise RuntimeError("sampling.engine is 'vllm' but no GPU is visible to this "
                               "process (give the sampler num_gpus), or set sampling.engine: hf")
        return "vllm"
    return "vllm" if vllm_available and gpu_available else "hf"


def make_engine(
    model_path: str, cfg: SamplingConfig, max_prompt_length: int | None = None,
    device: str = "auto", dtype: str = "auto",
) -> SamplingEngine:
    """The engine `select_engine` picks for this process; weights in `dtype` (a ModelConfig
    dtype name: the policy's `policy.dtype`)."""
    gpu = torch.cuda.is_available()
    if select_engine(cfg, vllm_installed(), gpu) == "vllm":
        return VLLMEngine(model_path, cfg, max_prompt_length, dtype)
    if device == "auto":
        device = "cuda" if gpu else "cpu"
    return HFEngine(model_path, cfg, max_prompt_length, device, dtype)


class _GumbelNoise:
    """Logits processor adding Gumbel(0, 1) noise from one generator per row, so that
    greedy decoding of the result samples each row from its own seeded stream."""

    def __init__(self, generators: list[torch.Generator]):
        self.generators = generators

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        u = torch.stack([torch.rand(scores.shape[-1], generator=g, dtype=torch.float64)
                         for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp_min(torch.finfo(torch.float64).tiny)))
        return scores + gumbel.to(scores.device, scores.dtype)


def _first_stop(text: str, stop: tuple[str, ...]) -> int | None:
    hits = [i for i in (text.find(s) for s in stop) if i >= 0]
    return min(hits) if hits else None


class HFEngine:
    """Batched, left-padded Hugging Face ``generate`` (see the module docstring for seeds)."""

    def __init__(
        self, model_path: str, cfg: SamplingConfig, max_prompt_length: int | None = None,
        device: str = "cpu", dtype: str = "auto",
    ):
        self.cfg, self.max_prompt_length, self.device = cfg, max_prompt_length, device
        self.tokenizer = load_tokenizer(model_path)
        self.model = load_model(ModelConfig(path=str(model_path), dtype=dtype), device)

    def generate(
        self, prompts: list[str], seeds: list[int] | None = None,
        params: SamplingConfig | None = None,
    ) -> list[list[Completion]]:
        params = params or self.cfg
        seeds = _seeds(params, len(prompts), seeds)
        rows = [(i, derive_seed(s, j)) for i, s in enumerate(seeds) for j in range(params.n)]
        ids = [prompt_token_ids(self.tokenizer, p, self.max_prompt_length) for p in prompts]
        out: list[list[Completion]] = [[] for _ in prompts]
        for start in range(0, len(rows), params.batch_size):
            chunk = rows[start:start + params.batch_size]
            done = self._generate([ids[i] for i, _ in chunk], [s for _, s in chunk], params)
            for (i, _), completion in zip(chunk, done):
                out[i].append(completion)
        return out

    @torch.no_grad()
    def _generate(
        self, ids: list[list[int]], seeds: list[int], params: SamplingConfig
    ) -> list[Completion]:
        from transformers import (GenerationConfig, LogitsProcessorList,
                                  TemperatureLogitsWarper, TopPLogitsWarper)

        width = max(len(x) for x in ids)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
        attention = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
        processors = LogitsProcessorList()
        if params.temperature > 0:
            processors.append(TemperatureLogitsWarper(params.temperature))
            if params.top_p < 1.0:
                processors.append(TopPLogitsWarper(params.top_p))
            processors.append(_GumbelNoise([torch.Generator().manual_seed(s) for s in seeds]))
        generation = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=False, num_beams=1,
            pad_token_id=pad, eos_token_id=self.tokenizer.eos_token_id,
            stop_strings=list(params.stop) or None,
        )
        output = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention.to(self.device),
            generation_config=generation, logits_processor=processors,
            tokenizer=self.tokenizer if params.stop else None,
        )
        return [self._completion(row.tolist(), params) for row in output[:, width:].cpu()]

    def _decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=True)

    def _completion(self, tokens: list[int], params: SamplingConfig) -> Completion:
        eos = self.tokenizer.eos_token_id
        if eos in tokens:
            tokens = tokens[:tokens.index(eos) + 1]
            finish: FinishReason = "stop"
        else:
            finish = "length"
            if params.stop:
                tokens = self._cut_at_stop(tokens, params.stop)
        text = self._decode(tokens)
        cut = _first_stop(text, params.stop)
        if cut is not None:
            text, finish = text[:cut], "stop"
        return Completion(text, tuple(tokens), finish)

    def _cut_at_stop(self, tokens: list[int], stop: tuple[str, ...]) -> list[int]:
        """The shortest prefix whose text contains a stop string (rows stopped by a stop
        string are padded afterwards); all tokens if none does. Binary search on the prefix
        length: containing a stop string is monotone in it."""
        if _first_stop(self._decode(tokens), stop) is None:
            return tokens
        lo, hi = 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if _first_stop(self._decode(tokens[:mid]), stop) is None:
                lo = mid + 1
            else:
                hi = mid
        return tokens[:lo]


# Ray actors holding vLLM: no V1 engine-core subprocess, so a killed actor cannot leave one
# holding the GPU (ray-project/ray#54364); set in the actors' runtime_env
VLLM_ACTOR_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}


def vllm_max_model_len(cfg: SamplingConfig, max_prompt_length: int | None) -> int | None:
    """The longest sequence the sampler can see: the prompt limit plus the new tokens (None
    without a prompt limit: the model's own context), so vLLM sizes its KV cache for that
    instead of the model's full context."""
    return None if max_prompt_length is None else max_prompt_length + cfg.max_new_tokens


class VLLMEngine:
    """``vllm.LLM`` with one ``SamplingParams`` per prompt (its seed), prompts passed as token
    ids so they are tokenized exactly as by the HF engine. Needs a GPU; not run in CI."""

    def __init__(self, model_path: str, cfg: SamplingConfig, max_prompt_length: int | None = None,
                 dtype: str = "auto"):
        from vllm import LLM

        self.cfg, self.max_prompt_length = cfg, max_prompt_length
        self.tokenizer = load_tokenizer(model_path)
        self.llm = LLM(
            model=model_path, tensor_parallel_size=cfg.tensor_parallel_size,
            gpu_memory_utilization=cfg.gpu_memory_utilization, seed=cfg.seed, dtype=dtype,
            max_model_len=vllm_max_model_len(cfg, max_prompt_length),
        )

    def generate(
        self, prompts: list[str], seeds: list[int] | None = None,
        params: SamplingConfig | None = None,
    ) -> list[list[Completion]]:
        from vllm import SamplingParams

        params = params or self.cfg
        requests = [{"prompt_token_ids": prompt_token_ids(self.tokenizer, p, self.max_prompt_length)}
                    for p in prompts]
        sampling = [
            SamplingParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                           max_tokens=params.max_new_tokens, seed=s,
                           stop=list(params.stop) or None)
            for s in _seeds(params, len(prompts), seeds)
        ]
        outputs = self.llm.generate(requests, sampling, use_tqdm=False)
        return [[self._completion(c) for c in out.outputs] for out in outputs]

    @staticmethod
    def _completion(output) -> Completion:
        if output.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM finished a sequence with {output.finish_reason!r}")
        return Completion(output.text, tuple(output.token_ids), output.finish_reason)
