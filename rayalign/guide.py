"""LD-Align's guide model: a conditional autoencoder T = (phi, psi) (LD-Align Sec. 4.1, Eq. 2).

- phi (encoder): a causal-LM trunk (the first `encoder_depth` share of the checkpoint's blocks,
  then its final norm) reads [x; y] (prompt and response tokens exactly as
  `rayalign.data.encode` makes them, response + EOS); its hidden states are pooled, RMS-
  normalized, and a linear map gives h = phi(x, y) in R^d. Pooling `mean` averages the hidden
  states of the response tokens; `last` takes the hidden state of the last non-pad token (in a
  causal model the only one that has seen all of [x; y]).
- psi (decoder): a causal LM built from the checkpoint's first `decoder_layers` blocks (and
  its embeddings, final norm and output head, frozen). h reaches *every* position, as in
  Optimus (Li et al. 2020, "latent as embedding"): W_e h is added to each input embedding of
  [x; y], and `prefix_tokens` > 0 also prepends k embeddings W_p h that every layer attends to.
  psi is scored by the log-likelihood of the response tokens only.
- Loss (Eq. 2): -[log p_psi(y | x, phi(x, y)) + log p_psi(y' | x, phi(x, y'))] over SFT gold
  responses y and samples y' of theta_0, here as the mean NLL per response token.
- Distance (Sec. 4.2.2): s(x, y, y') = ||phi(x, y) - phi(x, y')||_2.

Why this design (posterior collapse). A strong pretrained decoder reconstructs y from x and
its own previous tokens and ignores h (Bowman et al. 2016; Optimus). Measured on SmolLM2-135M
(issue 11) with the earlier design here (psi = a full 30-block copy, h as 4 prefix tokens,
word dropout 0.5):
across-prompt gap -0.0002 nats/token, i.e. none. Following the standard remedies: (1) a *weak
decoder* (Yang et al. 2017: here `decoder_layers` = 2 blocks of the checkpoint, its embeddings,
final norm and head, the embeddings and head frozen), which models local syntax but needs h
for content; (2) word dropout on psi's copy of y (Bowman et al. 2016: `word_dropout` of the
response input embeddings zeroed, labels intact); (3) h injected at every position, not only
as a prefix (Optimus' "embedding" injection; the k prefix embeddings, attended to by every
layer, play the role of its "memory" in so shallow a decoder). phi's trunk is frozen by
default (`train_encoder` false): phi = pretrained features + a trained projection, so its rows
are encoded once per run instead of once per epoch (the dominant cost on a CPU) and the
distance keeps the pretrained model's semantics. It reads the first `encoder_depth` = 55% of
the blocks, and the pooled state is RMS-normalized: on 64 SmolLM2 gold/sample pairs,
Spearman(||f(x,y) - f(x,y')||, 1 - MiniLM cosine) of the raw mean-pooled states is 0.19 after
the last block and 0.31 after block 17 of 30, and with the angle instead of the L2 distance
0.22 and 0.375. The ablation table (each design's informativeness figures and §5.2
correlations) is in bench/results/real_model.md.

`informativeness` (across prompts: h of another row) and `within_prompt_informativeness`
(gold vs sample of the same prompt, the contrast the distance must resolve) measure the result
(rayalign/guide_train.py).

On disk (`GuideModel.save`): ``encoder/`` is an ordinary Hugging Face checkpoint (the trunk,
cut to `encoder_depth` of its blocks, with the tokenizer), ``projections.safetensors`` the linear
maps, ``guide.json`` the `GuideSpec` (including a content hash of the encoder side as
`version`); ``decoder/`` only when saved with the decoder (`guide.save_decoder`), since
scoring needs phi alone.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .config import ModelConfig
from .config_ldalign import GuideConfig
from .data import SequenceBatch, collate, encode
from .io import atomic_dir, read_json, write_json
from .logprobs import logprobs_at
from .lora import apply_lora, merged
from .models import load_model, load_tokenizer, save_checkpoint

SPEC_FILE = "guide.json"
PROJECTIONS_FILE = "projections.safetensors"
HEADS = ("to_latent", "to_prefix", "to_embedding")


@dataclass(frozen=True)
class GuideSpec:
    """Everything besides weights that embedding and decoding need; written to guide.json."""

    latent_dim: int
    prefix_tokens: int
    pooling: str
    max_prompt_length: int
    max_length: int
    inject_embedding: bool = False
    version: str = ""


def rms_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / RMS(x) over the last dimension (a parameter-free RMSNorm): phi's pooled features
    keep their direction only, so distances follow the angle between pooled states, which
    tracks sentence similarity better than their raw L2 (bench/results/real_model.md)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _trunk(lm: nn.Module) -> nn.Module:
    """The transformer under the LM head, also through a peft wrapper (whose `base_model` is
    peft's tuner, not the trunk; the adapters sit inside the trunk's layers either way)."""
    return lm.get_base_model().base_model if hasattr(lm, "get_base_model") else lm.base_model


def _hidden_size(lm: nn.Module) -> int:
    return lm.get_input_embeddings().embedding_dim


def _blocks(lm: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The transformer's list of blocks (GPT-2 ``transformer.h``, Llama ``model.layers``, ...)."""
    n = lm.config.num_hidden_layers
    for name, child in lm.base_model.named_children():
        if isinstance(child, nn.ModuleList) and len(child) == n:
            return lm.base_model, name, child
    raise ValueError(f"{type(lm).__name__}: no list of {n} transformer blocks found")


def truncate_blocks(lm: nn.Module, n: int | float | None) -> nn.Module:
    """Keep the first `n` blocks (None: all; a float in (0, 1]: that share of them, rounded
    up); the config follows, so save/load round-trips."""
    parent, name, blocks = _blocks(lm)
    if isinstance(n, float):
        n = math.ceil(n * len(blocks))
    if n is None or n >= len(blocks):
        return lm
    setattr(parent, name, nn.ModuleList(list(blocks)[:n]))
    lm.config.num_hidden_layers = n
    if isinstance(getattr(lm.config, "layer_types", None), list):
        lm.config.layer_types = lm.config.layer_types[:n]
    return lm


def _build_lm(path: str, init: str, blocks: int | float | None) -> nn.Module:
    if init == "pretrained":
        lm = load_model(ModelConfig(path=path, dtype="float32"), trainable=True)
    else:
        from transformers import AutoConfig, AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return truncate_blocks(lm, blocks)


class _Pretokenized:
    """Answers `rayalign.data.encode`'s one-string tokenizer calls from a single batched call
    over all distinct strings (the fast tokenizer's batch path is several times cheaper than
    one call per string), so the truncation rules stay those of `encode`."""

    def __init__(self, tokenizer, texts: Sequence[str]):
        unique = list(dict.fromkeys(texts))
        ids = tokenizer(unique, add_special_tokens=False)["input_ids"] if unique else []
        self._ids = dict(zip(unique, ids))
        self.eos_token_id = tokenizer.eos_token_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self._ids[text]}


class GuideModel(nn.Module):
    """T = (phi, psi). `decoder` may be None for an encoder-only guide (scoring)."""

    def __init__(self, encoder: nn.Module, decoder: nn.Module | None, tokenizer, spec: GuideSpec):
        super().__init__()
        self.spec, self.tokenizer = spec, tokenizer
        self.encoder = encoder
        self.to_latent = nn.Linear(_hidden_size(encoder), spec.latent_dim)
        self.decoder = decoder
        self.to_prefix = self.to_embedding = None
        if decoder is not None:
            width = _hidden_size(decoder)
            if spec.prefix_tokens > 0:
                self.to_prefix = nn.Linear(spec.latent_dim, spec.prefix_tokens * width)
            if spec.inject_embedding:
                self.to_embedding = nn.Linear(spec.latent_dim, width)
            for head in (self.to_prefix, self.to_embedding):
                if head is not None:
                    head.to(next(decoder.parameters()))
        self.to_latent.to(next(encoder.parameters()))

    # ---- construction and persistence -------------------------------------------------

    @classmethod
    def create(cls, cfg: GuideConfig, base_model: str, max_prompt_length: int,
               max_length: int) -> "GuideModel":
        """A fresh guide: phi and psi start from `cfg.model` (or `base_model`), seeded by cfg.seed.

        Frozen: phi's trunk unless `cfg.train_encoder`; psi's embeddings and output head always
        (they keep the pretrained vocabulary geometry, and are most of a small model's weights:
        no [V, H] gradient or optimizer state). With `cfg.lora`, psi's blocks (and phi's trunk
        when trained) train LoRA adapters instead of their weights; the projections train in
        full either way."""
        path = cfg.model or base_model
        torch.manual_seed(cfg.seed)
        encoder = _build_lm(path, cfg.init, cfg.encoder_depth)
        decoder = _build_lm(path, cfg.init, cfg.decoder_layers)
        encoder.requires_grad_(cfg.train_encoder)
        # phi never uses its LM head; an untied head would get no gradient (and stall DDP).
        encoder.get_output_embeddings().requires_grad_(False)
        decoder.get_input_embeddings().requires_grad_(False)
        decoder.get_output_embeddings().requires_grad_(False)
        if cfg.gradient_checkpointing:
            for lm in (encoder, decoder):
                lm.gradient_checkpointing_enable()
        if cfg.lora is not None:
            decoder = apply_lora(decoder, cfg.lora)
            if cfg.train_encoder:
                encoder = apply_lora(encoder, cfg.lora)
        spec = GuideSpec(cfg.latent_dim, cfg.prefix_tokens, cfg.pooling, max_prompt_length,
                         max_length, cfg.injection in ("embedding", "both"))
        if cfg.injection == "embedding":
            spec = replace(spec, prefix_tokens=0)
        return cls(encoder, decoder, load_tokenizer(path), spec)

    @classmethod
    def load(cls, path: str | Path, device: torch.device | str = "cpu",
             decoder: bool = True) -> "GuideModel":
        """Load a saved guide in eval mode; `decoder=False` loads only what embedding needs."""
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / SPEC_FILE).is_file():
            raise FileNotFoundError(f"{path}: not a guide checkpoint (no {SPEC_FILE})")
        spec = GuideSpec(**read_json(path / SPEC_FILE))
        if decoder and not (path / "decoder").is_dir():
            raise FileNotFoundError(f"{path}: this guide was saved without its decoder "
                                    f"(guide.save_decoder: true keeps it)")
        # float32 on every device: the guide is trained in float32 (`_build_lm`), and scoring
        # in bf16 on a GPU would give other distances (so other weights) than on the CPU
        guide = cls(
            load_model(ModelConfig(path=str(path / "encoder"), dtype="float32"), device),
            load_model(ModelConfig(path=str(path / "decoder"), dtype="float32"), device)
            if decoder else None,
            load_tokenizer(path / "encoder"), spec,
        )
        state = load_file(str(path / PROJECTIONS_FILE), device=str(torch.device(device)))
        for name in HEADS:
            head = getattr(guide, name)
            if head is not None:
                head.load_state_dict({k.removeprefix(name + "."): v for k, v in state.items()
                                      if k.startswith(name + ".")})
        return guide.eval()

    def save(self, path: str | Path, decoder: bool = True) -> Path:
        """Atomically write the checkpoint directory (psi only if `decoder`); `spec.version`
        becomes a hash of phi. LoRA adapters are merged into the weights first (in place: the
        guide computes the same function after, and the saved parts are plain checkpoints)."""
        from safetensors.torch import save_file

        self.encoder = merged(self.encoder)
        if self.decoder is not None:
            self.decoder = merged(self.decoder)
        keep = ("to_latent.",) + (("to_prefix.", "to_embedding.") if decoder else ())
        with atomic_dir(path) as tmp:
            save_checkpoint(self.encoder, self.tokenizer, tmp / "encoder")
            if decoder and self.decoder is not None:
                save_checkpoint(self.decoder, self.tokenizer, tmp / "decoder")
            heads = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                     if k.startswith(keep)}
            save_file(heads, str(tmp / PROJECTIONS_FILE))
            digest = hashlib.sha256()
            for f in sorted((tmp / "encoder").glob("*.safetensors")):
                digest.update(f.read_bytes())
            for k in sorted(heads):
                if k.startswith("to_latent."):
                    digest.update(heads[k].view(torch.uint8).numpy().tobytes())
            self.spec = replace(self.spec, version=digest.hexdigest()[:12])
            write_json(tmp / SPEC_FILE, asdict(self.spec))
        return Path(path)

    @property
    def device(self) -> torch.device:
        return next(self.encoder.parameters()).device

    # ---- phi and psi -------------------------------------------------------------------

    def encode_pairs(self, prompts: Sequence[str], responses: Sequence[str]) -> list:
        """(prompt_ids, response_ids) per pair under the guide's truncation limits."""
        tokenizer = _Pretokenized(self.tokenizer, [*prompts, *responses])
        return [encode(tokenizer, p, r, self.spec.max_prompt_length, self.spec.max_length)
                for p, r in zip(prompts, responses, strict=True)]

    def tokenize(self, prompts: Sequence[str], responses: Sequence[str]) -> SequenceBatch:
        """One right-padded batch of [x; y + EOS] under the guide's truncation limits."""
        return collate(self.encode_pairs(prompts, responses),
                       self.tokenizer.pad_token_id).to(self.device)

    def features(self, batch: SequenceBatch) -> torch.Tensor:
        """phi's trunk, pooled: [B, H] (h = to_latent of this)."""
        hidden = _trunk(self.encoder)(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        if self.spec.pooling == "last":
            last = batch.attention_mask.sum(-1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            mask = batch.response_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return rms_normalize(pooled)

    def encode_batch(self, batch: SequenceBatch) -> torch.Tensor:
        """phi: h [B, d]."""
        return self.to_latent(self.features(batch))

    def response_logprobs(
        self, h: torch.Tensor, batch: SequenceBatch, word_dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """psi: sum of log p(y_t | h, x, y_<t) over response tokens (B,) and the response
        token counts (B,). `word_dropout` zeroes that share of the response tokens' input
        embeddings (never the labels); W_e h is then added at every position."""
        if self.decoder is None:
            raise RuntimeError("this guide was loaded without its decoder")
        bsz, k = batch.input_ids.shape[0], self.spec.prefix_tokens
        embeds = self.decoder.get_input_embeddings()(batch.input_ids)
        if word_dropout > 0.0:
            drop = torch.rand(batch.input_ids.shape, generator=generator).to(embeds.device)
            drop = (drop < word_dropout) & batch.response_mask
            embeds = embeds.masked_fill(drop.unsqueeze(-1), 0.0)
        h = h.to(embeds.dtype)
        if self.to_embedding is not None:
            embeds = embeds + self.to_embedding(h).unsqueeze(1)
        ids, scored, attention = batch.input_ids, batch.response_mask, batch.attention_mask
        if k > 0:
            embeds = torch.cat([self.to_prefix(h).view(bsz, k, -1), embeds], dim=1)
            ids = torch.cat([ids.new_zeros(bsz, k), ids], dim=1)
            scored = torch.cat([scored.new_zeros(bsz, k), scored], dim=1)
            attention = torch.cat([attention.new_ones(bsz, k), attention], dim=1)
        # Position t predicts token t + 1 (as rayalign.logprobs.sequence_logprobs); the head
        # runs on the scored positions' hidden states only, never on [B, T, V] logits.
        return logprobs_at(
            self.decoder, nn.functional.pad(ids[:, 1:], (0, 1)),
            nn.functional.pad(scored[:, 1:], (0, 1), value=False),
            inputs_embeds=embeds, attention_mask=attention,
        )

    def forward(self, batch: SequenceBatch, word_dropout: float = 0.0,
                generator: torch.Generator | None = None,
                features: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction (Eq. 2): psi's response log-probs given h = phi(x, y); `features`
        (phi's pooled trunk output, precomputed when the trunk is frozen) skips the trunk."""
        h = self.encode_batch(batch) if features is None else self.to_latent(features)
        return self.response_logprobs(h, batch, word_dropout, generator)

    # ---- inference ---------------------------------------------------------------------

    @torch.no_grad()
    def pooled(self, prompts: Sequence[str], responses: Sequence[str], batch_size: int = 64,
               project: bool = True) -> torch.Tensor:
        """h = phi(x, y) (or, with `project` false, phi's pooled trunk features) for each
        pair, float32 on the CPU, in input order.

        Pairs are encoded `batch_size` at a time, sorted by length so a batch pads little;
        padding never changes a row's result (attention masks), so the result does not
        depend on `batch_size` or on which other pairs are in the call.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        width = self.spec.latent_dim if project else _hidden_size(self.encoder)
        out = torch.empty(len(prompts), width)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = self.tokenize([prompts[i] for i in idx], [responses[i] for i in idx])
                feats = self.features(batch)
                out[idx] = (self.to_latent(feats) if project else feats).float().cpu()
        finally:
            self.train(was_training)
        return out

    def embed(self, prompts: Sequence[str], responses: Sequence[str],
              batch_size: int = 64) -> torch.Tensor:
        """h = phi(x, y) for each pair, [N, d] float32 on the CPU, in input order."""
        return self.pooled(prompts, responses, batch_size)

    def distances(self, prompts: Sequence[str], references: Sequence[str],
                  candidates: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """s_i = ||phi(x_i, y_i) - phi(x_i, y'_i)||_2 for all i, float64 [N] (see `unique_pairs`)."""
        unique, ref, cand = unique_pairs(prompts, references, candidates)
        h = self.embed([p for p, _ in unique], [r for _, r in unique], batch_size)
        return pair_distances(h, ref, cand)


def unique_pairs(
    prompts: Sequence[str], references: Sequence[str], candidates: Sequence[str]
) -> tuple[list[tuple[str, str]], torch.Tensor, torch.Tensor]:
    """The distinct (prompt, response) pairs of a distance query and, per query row, the index
    of its reference and its candidate among them: a reference shared by many candidates is
    embedded once, and a candidate equal to its reference gets exactly distance 0."""
    if not len(prompts) == len(references) == len(candidates):
        raise ValueError(f"lengths differ: {len(prompts)} prompts, {len(references)} "
                         f"references, {len(candidates)} candidates")
    keys = list(zip(prompts, references)) + list(zip(prompts, candidates))
    slot = {key: i for i, key in enumerate(dict.fromkeys(keys))}
    index = torch.tensor([slot[k] for k in keys], dtype=torch.long)
    return list(slot), index[:len(prompts)], index[len(prompts):]


def pair_distances(h: torch.Tensor, ref: torch.Tensor, cand: torch.Tensor) -> torch.Tensor:
    """||h[ref_i] - h[cand_i]||_2 in float64 (LD-Align Sec. 4.2.2)."""
    h = h.double()
    return torch.linalg.vector_norm(h[ref] - h[cand], dim=-1)


def resolve_device(name: str) -> torch.device:
    """`auto` = the first CUDA device when one is visible, else the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
