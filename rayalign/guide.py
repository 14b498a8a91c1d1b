"""LD-Align's guide model: a conditional autoencoder T = (phi, psi) (LD-Align Sec. 4.1).

- phi (encoder): a causal-LM transformer reads [x; y] (prompt and response tokens exactly as
  `rayalign.data.encode` makes them, response + EOS); its final hidden states are pooled and a
  linear map gives h = phi(x, y) in R^d. Pooling `last` takes the hidden state of the last
  non-pad token, the only one that has attended to all of [x; y] in a causal model; `mean`
  averages the hidden states of the response tokens.
- psi (decoder): a causal LM that gets h as k prefix embeddings (linear d -> k * hidden)
  before [x; y] and is scored by the log-likelihood of the response tokens only.
- Loss (Eq. 2): -[log p_psi(y | x, phi(x, y)) + log p_psi(y' | x, phi(x, y'))] over SFT gold
  responses y and samples y' of theta_0, here as the mean NLL per response token.
- Distance (Sec. 4.2.2): s(x, y, y') = ||phi(x, y) - phi(x, y')||_2.

A decoder that can reconstruct y from x and its own previous tokens ignores h, and then
distances mean nothing (DESIGN.md, "Guide model"). The training recipe therefore (1) zeroes
the input embedding of a random `word_dropout` share of the response tokens that psi reads
(the labels stay intact), so psi must take the missing content from h; (2) keeps the latent
small (`latent_dim`), so phi must summarise rather than copy. `informativeness` measures the
result: reconstruction NLL with the true h vs with h given to another row (a derangement);
a positive gap means psi uses h.

On disk (`GuideModel.save`): ``encoder/`` and ``decoder/`` are ordinary Hugging Face
checkpoints (with the tokenizer), ``projections.safetensors`` holds the two linear maps, and
``guide.json`` the `GuideSpec` (including a content hash of the encoder side as `version`).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from .config import DataConfig, GuideConfig, ModelConfig
from .data import DataError, SequenceBatch, collate, encode, load_dataset, read_rows
from .io import atomic_dir, read_json, write_json
from .logprobs import logprobs_at
from .models import load_model, load_tokenizer, save_checkpoint

SPEC_FILE = "guide.json"
PROJECTIONS_FILE = "projections.safetensors"
SAMPLE_COLUMNS = ("prompt", "gold", "sample")


@dataclass(frozen=True)
class GuideSpec:
    """Everything besides weights that embedding needs; written to guide.json."""

    latent_dim: int
    prefix_tokens: int
    pooling: str
    max_prompt_length: int
    max_length: int
    version: str = ""


def _hidden_size(lm: nn.Module) -> int:
    return lm.get_input_embeddings().embedding_dim


def _build_lm(path: str, init: str) -> nn.Module:
    if init == "pretrained":
        return load_model(ModelConfig(path=path, dtype="float32"), trainable=True)
    from transformers import AutoConfig, AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


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
        self.to_prefix = (
            nn.Linear(spec.latent_dim, spec.prefix_tokens * _hidden_size(decoder))
            if decoder is not None else None
        )
        self.to_latent.to(next(encoder.parameters()))
        if decoder is not None:
            self.to_prefix.to(next(decoder.parameters()))

    # ---- construction and persistence -------------------------------------------------

    @classmethod
    def create(cls, cfg: GuideConfig, base_model: str, max_prompt_length: int,
               max_length: int) -> "GuideModel":
        """A fresh guide: phi and psi start from `cfg.model` (or `base_model`), seeded by cfg.seed."""
        path = cfg.model or base_model
        torch.manual_seed(cfg.seed)
        encoder, decoder = _build_lm(path, cfg.init), _build_lm(path, cfg.init)
        # phi never uses its LM head; an untied head would get no gradient (and stall DDP).
        head = encoder.get_output_embeddings()
        if head is not None and head.weight is not encoder.get_input_embeddings().weight:
            head.requires_grad_(False)
        spec = GuideSpec(cfg.latent_dim, cfg.prefix_tokens, cfg.pooling, max_prompt_length,
                         max_length)
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
            raise FileNotFoundError(f"{path}: encoder-only guide has no decoder/")
        # float32 on every device: the guide is trained in float32 (`_build_lm`), and scoring
        # in bf16 on a GPU would give other distances (so other weights) than on the CPU
        guide = cls(
            load_model(ModelConfig(path=str(path / "encoder"), dtype="float32"), device),
            load_model(ModelConfig(path=str(path / "decoder"), dtype="float32"), device)
            if decoder else None,
            load_tokenizer(path / "encoder"), spec,
        )
        state = load_file(str(path / PROJECTIONS_FILE), device=str(torch.device(device)))
        heads = [("to_latent", guide.to_latent)] + ([("to_prefix", guide.to_prefix)] if decoder else [])
        for name, head in heads:
            head.load_state_dict({k.removeprefix(name + "."): v for k, v in state.items()
                                  if k.startswith(name + ".")})
        return guide.eval()

    def save(self, path: str | Path) -> Path:
        """Atomically write the checkpoint directory; `spec.version` becomes a hash of phi."""
        from safetensors.torch import save_file

        with atomic_dir(path) as tmp:
            save_checkpoint(self.encoder, self.tokenizer, tmp / "encoder")
            if self.decoder is not None:
                save_checkpoint(self.decoder, self.tokenizer, tmp / "decoder")
            heads = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()
                     if k.startswith(("to_latent.", "to_prefix."))}
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

    def tokenize(self, prompts: Sequence[str], responses: Sequence[str]) -> SequenceBatch:
        """One right-padded batch of [x; y + EOS] under the guide's truncation limits."""
        tokenizer = _Pretokenized(self.tokenizer, [*prompts, *responses])
        seqs = [encode(tokenizer, p, r, self.spec.max_prompt_length, self.spec.max_length)
                for p, r in zip(prompts, responses, strict=True)]
        return collate(seqs, self.tokenizer.pad_token_id).to(self.device)

    def encode_batch(self, batch: SequenceBatch) -> torch.Tensor:
        """phi: h [B, d] from the pooled final hidden states of [x; y]."""
        hidden = self.encoder.base_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask
        ).last_hidden_state
        if self.spec.pooling == "last":
            last = batch.attention_mask.sum(-1) - 1
            pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        else:
            mask = batch.response_mask.unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return self.to_latent(pooled)

    def response_logprobs(
        self, h: torch.Tensor, batch: SequenceBatch, word_dropout: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """psi: sum of log p(y_t | k prefix embeddings of h, x, y_<t) over response tokens (B,)
        and the response token counts (B,). `word_dropout` zeroes that share of the response
        tokens' input embeddings (never the labels)."""
        if self.decoder is None:
            raise RuntimeError("this guide was loaded without its decoder")
        bsz, k = batch.input_ids.shape[0], self.spec.prefix_tokens
        embeds = self.decoder.get_input_embeddings()(batch.input_ids)
        if word_dropout > 0.0:
            drop = torch.rand(batch.input_ids.shape, generator=generator).to(embeds.device)
            drop = (drop < word_dropout) & batch.response_mask
            embeds = embeds.masked_fill(drop.unsqueeze(-1), 0.0)
        prefix = self.to_prefix(h.to(embeds.dtype)).view(bsz, k, -1)
        ones = batch.attention_mask.new_ones(bsz, k)
        # Same shift as rayalign.logprobs.sequence_logprobs, with k unscored prefix positions.
        ids = torch.cat([batch.input_ids.new_zeros(bsz, k), batch.input_ids], dim=1)
        scored = torch.cat([batch.response_mask.new_zeros(bsz, k), batch.response_mask], dim=1)
        return logprobs_at(
            self.decoder, nn.functional.pad(ids[:, 1:], (0, 1)),
            nn.functional.pad(scored[:, 1:], (0, 1), value=False),
            inputs_embeds=torch.cat([prefix, embeds], dim=1),
            attention_mask=torch.cat([ones, batch.attention_mask], dim=1),
        )

    def forward(self, batch: SequenceBatch, word_dropout: float = 0.0,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstruction (Eq. 2): psi's response log-probs given h = phi(x, y)."""
        return self.response_logprobs(self.encode_batch(batch), batch, word_dropout, generator)

    # ---- inference ---------------------------------------------------------------------

    @torch.no_grad()
    def embed(self, prompts: Sequence[str], responses: Sequence[str],
              batch_size: int = 64) -> torch.Tensor:
        """h = phi(x, y) for each pair, [N, d] float32 on the CPU, in input order.

        Pairs are encoded `batch_size` at a time, sorted by length so a batch pads little;
        padding never changes a row's result (attention masks), so the result does not
        depend on `batch_size` or on which other pairs are in the call.
        """
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        out = torch.empty(len(prompts), self.spec.latent_dim)
        if not len(prompts):
            return out
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(responses[i]))
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                batch = self.tokenize([prompts[i] for i in idx], [responses[i] for i in idx])
                out[idx] = self.encode_batch(batch).float().cpu()
        finally:
            self.train(was_training)
        return out

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


# ---- data ------------------------------------------------------------------------------


def load_samples(path: str | Path) -> list[tuple[str, str, str]]:
    """(prompt, gold, sample) rows of a samples file; a sample may be empty (the policy can
    stop at once), prompt and gold may not. Bad rows raise `DataError` with file/row/field."""
    source, rows = str(path), []
    for number, row in read_rows(source):
        if not isinstance(row, dict):
            raise DataError(source, number, None, f"expected an object, got {type(row).__name__}")
        for field in SAMPLE_COLUMNS:
            value = row.get(field)
            if not isinstance(value, str):
                reason = "missing" if value is None else f"expected a string, got {type(value).__name__}"
                raise DataError(source, number, field, reason)
            if field != "sample" and not value.strip():
                raise DataError(source, number, field, "empty string")
        rows.append(tuple(row[f] for f in SAMPLE_COLUMNS))
    if not rows:
        raise DataError(source, None, None, "no rows")
    return rows


def guide_pairs(sft: DataConfig, samples_path: str | Path, tokenizer=None) -> list[tuple[str, str]]:
    """Eq. 2's training set: (x, y) for every SFT example plus (x, y') for every sample."""
    gold = [(ex.prompt, ex.response) for ex in load_dataset(sft, tokenizer)]
    return gold + [(prompt, sample) for prompt, _, sample in load_samples(samples_path)]


def split_pairs(pairs: Sequence[tuple[str, str]], eval_fraction: float,
                seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """A seeded (train, held-out) split; the held-out part has at least 2 rows (a derangement
    needs two) and the training part at least one."""
    if len(pairs) < 3:
        raise ValueError(f"need at least 3 (prompt, response) pairs to train a guide, got {len(pairs)}")
    perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(max(2, round(eval_fraction * len(pairs))), len(pairs) - 1)
    return [pairs[i] for i in perm[n_eval:]], [pairs[i] for i in perm[:n_eval]]


# ---- training and evaluation -------------------------------------------------------------


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation with no fixed point (n >= 2): a cyclic shift along a random order."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 elements")
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


@torch.no_grad()
def informativeness(guide: GuideModel, pairs: Sequence[tuple[str, str]], batch_size: int = 64,
                    seed: int = 0) -> dict[str, float]:
    """Latent informativeness (DESIGN.md, "Guide model"): psi's reconstruction NLL per response
    token with the true h = phi(x, y) vs with the h of another row (a random derangement), no
    word dropout. gap = nll_shuffled - nll_true; > 0 means psi uses the latent."""
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    h = guide.embed(prompts, responses, batch_size).to(guide.device)
    h_other = h[derangement(len(pairs), torch.Generator().manual_seed(seed)).to(guide.device)]
    was_training = guide.training
    guide.eval()
    nll_true = nll_other = tokens = 0.0
    try:
        for start in range(0, len(pairs), batch_size):
            end = start + batch_size
            batch = guide.tokenize(prompts[start:end], responses[start:end])
            lp_true, count = guide.response_logprobs(h[start:end], batch)
            lp_other, _ = guide.response_logprobs(h_other[start:end], batch)
            nll_true -= lp_true.sum().item()
            nll_other -= lp_other.sum().item()
            tokens += count.sum().item()
    finally:
        guide.train(was_training)
    nll_true, nll_other = nll_true / tokens, nll_other / tokens
    return {"nll_true": nll_true, "nll_shuffled": nll_other, "gap": nll_other - nll_true,
            "rows": len(pairs)}


def train_guide_model(
    guide: GuideModel, pairs: Sequence[tuple[str, str]], cfg: GuideConfig,
    on_epoch: Callable[[dict], None] | None = None,
) -> list[dict]:
    """Train T on (prompt, response) pairs by Eq. 2 with the recipe of `cfg`; pure PyTorch.

    When `torch.distributed` is initialized (a Ray Train / torchrun worker), the model is
    wrapped in DistributedDataParallel and each rank takes its share of every epoch's
    shuffled order (all ranks the same number of steps). Returns one dict per epoch
    (epoch, loss = mean response-token NLL of this rank's batches, steps).
    """
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(pairs) < world:
        raise ValueError(f"{len(pairs)} pairs cannot be shared by {world} workers")
    model: nn.Module = guide
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            guide, device_ids=[guide.device.index] if guide.device.type == "cuda" else None
        )
    params = [p for p in guide.parameters() if p.requires_grad]
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    tokenizer = _Pretokenized(guide.tokenizer, [text for pair in pairs for text in pair])
    encoded = [encode(tokenizer, p, r, guide.spec.max_prompt_length, guide.spec.max_length)
               for p, r in pairs]
    per_rank = len(pairs) // world
    dropout_rng = torch.Generator().manual_seed(cfg.seed * 1000 + rank)
    history = []
    guide.train()
    for epoch in range(cfg.epochs):
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        mine = order[rank::world][:per_rank].tolist()
        total = count = 0.0
        steps = math.ceil(per_rank / cfg.batch_size)
        for step in range(steps):
            idx = mine[step * cfg.batch_size:(step + 1) * cfg.batch_size]
            batch = collate([encoded[i] for i in idx], guide.tokenizer.pad_token_id).to(guide.device)
            logps, tokens = model(batch, cfg.word_dropout, dropout_rng)
            loss = -logps.sum() / tokens.sum()
            optim.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            optim.step()
            total += -logps.sum().item()
            count += tokens.sum().item()
        history.append({"epoch": epoch, "loss": total / count, "steps": steps})
        if on_epoch is not None:
            on_epoch(history[-1])
    guide.eval()
    return history
