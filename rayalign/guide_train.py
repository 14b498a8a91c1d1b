"""Training and measuring LD-Align's guide T = (phi, psi) (rayalign/guide.py), pure PyTorch.

- Data (Eq. 2): (x, y) for every SFT example plus (x, y') for every sample of theta_0. Both come
  as strings already rendered by the *policy's* tokenizer (chat template included), so gold and
  samples of one prompt are the same prompt string and the guide's tokenizer only tokenizes.
  The held-out split is by prompt: a held-out prompt's gold and samples are all held out, which
  is what the within-prompt figure needs.
- Training: AdamW on the trainable parameters, linear warmup (`warmup_ratio` of the steps) then
  linear decay to 0, gradient clipping, DDP when `torch.distributed` is initialized. With a
  frozen trunk (`train_encoder` false) phi's pooled features are computed once, before epoch 0.
  After every epoch rank 0 writes a checkpoint (trainable weights, optimizer, schedule, word-
  history) to `checkpoint_dir`; a restarted run continues after the last finished
  epoch and ends with the same weights as an uninterrupted one.
- Informativeness (does psi use h?): reconstruction NLL per response token with the true
  h = phi(x, y) against
  * across prompts: the h of another held-out row (a derangement) - the latent tells prompts apart;
  * within a prompt: the h of the *other* response of the same prompt (gold <-> sample) - the
    latent tells two answers to one question apart, which is what s(x, y, y') must resolve.
  gap = nll_other - nll_true; > 0 means psi uses h. The job's gate is on the within-prompt gap.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from .config import DataConfig
from .config_ldalign import GuideConfig
from .data import DataError, collate, load_dataset, read_rows
from .guide import GuideModel
from .io import atomic_file

SAMPLE_COLUMNS = ("prompt", "gold", "sample")
STATE_FILE = "state.pt"
PROGRESS_FILE = "progress.jsonl"


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


def guide_data(sft: DataConfig, samples_path: str | Path, render_tokenizer=None
               ) -> tuple[list[tuple[str, str]], list[tuple[str, str, str]]]:
    """Eq. 2's training set - (x, y) for every SFT example, then (x, y') for every sample -
    and the samples file's (prompt, gold, sample) rows. `render_tokenizer` (the policy's, whose
    chat template rendered the samples' prompts) renders `messages` rows of the SFT file."""
    gold = [(ex.prompt, ex.response) for ex in load_dataset(sft, render_tokenizer)]
    triples = load_samples(samples_path)
    return gold + [(p, s) for p, _, s in triples], triples


def split_by_prompt(pairs: Sequence[tuple[str, str]], triples: Sequence[tuple[str, str, str]],
                    eval_fraction: float, seed: int):
    """A seeded split of the distinct prompts: (train pairs, held-out pairs, held-out triples).
    At least 2 prompts are held out (a derangement needs two rows) and at least one kept."""
    prompts = list(dict.fromkeys(p for p, _ in pairs))
    if len(prompts) < 3:
        raise ValueError(f"need at least 3 distinct prompts to train a guide, got {len(prompts)}")
    perm = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed)).tolist()
    n_eval = min(max(2, round(eval_fraction * len(prompts))), len(prompts) - 1)
    held = {prompts[i] for i in perm[:n_eval]}
    return ([pr for pr in pairs if pr[0] not in held], [pr for pr in pairs if pr[0] in held],
            [t for t in triples if t[0] in held])


# ---- informativeness -------------------------------------------------------------------


def derangement(n: int, generator: torch.Generator) -> torch.Tensor:
    """A random permutation with no fixed point (n >= 2): a cyclic shift along a random order."""
    if n < 2:
        raise ValueError("a derangement needs at least 2 elements")
    order = torch.randperm(n, generator=generator)
    perm = torch.empty(n, dtype=torch.long)
    perm[order] = order.roll(-1)
    return perm


@torch.no_grad()
def reconstruction_nll(guide: GuideModel, prompts: Sequence[str], responses: Sequence[str],
                       h: torch.Tensor, batch_size: int = 64) -> tuple[float, int]:
    """Total NLL of the responses under psi given latents h [N, d] (no word dropout), and the
    number of response tokens it is summed over."""
    was_training = guide.training
    guide.eval()
    nll, tokens = 0.0, 0
    try:
        for start in range(0, len(prompts), batch_size):
            end = start + batch_size
            batch = guide.tokenize(prompts[start:end], responses[start:end])
            logps, count = guide.response_logprobs(h[start:end].to(guide.device), batch)
            nll -= logps.sum().item()
            tokens += int(count.sum().item())
    finally:
        guide.train(was_training)
    return nll, tokens


def informativeness(guide: GuideModel, pairs: Sequence[tuple[str, str]], batch_size: int = 64,
                    seed: int = 0) -> dict[str, float]:
    """Across prompts: NLL per response token with the true h vs with the h of another row (a
    seeded derangement); gap = nll_shuffled - nll_true."""
    prompts, responses = [p for p, _ in pairs], [r for _, r in pairs]
    h = guide.embed(prompts, responses, batch_size)
    other = h[derangement(len(pairs), torch.Generator().manual_seed(seed))]
    nll_true, tokens = reconstruction_nll(guide, prompts, responses, h, batch_size)
    nll_other, _ = reconstruction_nll(guide, prompts, responses, other, batch_size)
    return {"nll_true": nll_true / tokens, "nll_shuffled": nll_other / tokens,
            "gap": (nll_other - nll_true) / tokens, "rows": len(pairs)}


def within_prompt_informativeness(guide: GuideModel, triples: Sequence[tuple[str, str, str]],
                                  batch_size: int = 64) -> dict[str, float]:
    """Within a prompt: for each (x, gold y, sample y') with y' != y, the NLL of y given
    h(x, y) vs given h(x, y'), and of y' given h(x, y') vs given h(x, y); per response token
    over both directions, gap = nll_swapped - nll_true (`gold_gap`, `sample_gap`: each
    direction alone). NaN figures when no sample differs from its gold."""
    rows = [t for t in triples if t[1] != t[2]]
    if not rows:
        nan = float("nan")
        return {"nll_true": nan, "nll_swapped": nan, "gap": nan, "gold_gap": nan,
                "sample_gap": nan, "rows": 0}
    prompts = [p for p, _, _ in rows] * 2
    responses = [g for _, g, _ in rows] + [s for _, _, s in rows]
    h = guide.embed(prompts, responses, batch_size)
    n = len(rows)
    swapped = torch.cat([h[n:], h[:n]])
    true_g, tok_g = reconstruction_nll(guide, prompts[:n], responses[:n], h[:n], batch_size)
    true_s, tok_s = reconstruction_nll(guide, prompts[n:], responses[n:], h[n:], batch_size)
    sw_g, _ = reconstruction_nll(guide, prompts[:n], responses[:n], swapped[:n], batch_size)
    sw_s, _ = reconstruction_nll(guide, prompts[n:], responses[n:], swapped[n:], batch_size)
    tokens = tok_g + tok_s
    return {"nll_true": (true_g + true_s) / tokens, "nll_swapped": (sw_g + sw_s) / tokens,
            "gap": (sw_g + sw_s - true_g - true_s) / tokens, "gold_gap": (sw_g - true_g) / tok_g,
            "sample_gap": (sw_s - true_s) / tok_s, "rows": n}


def informativeness_verdict(within_gap: float, across_gap: float, threshold: float | None
                            ) -> str | None:
    """None when the guide passes the gate (within-prompt gap >= threshold, or no threshold);
    else the message the job stops with: the figures and what to change."""
    if threshold is None or within_gap >= threshold:
        return None
    return (f"the guide's latent carries too little information to weight pairs: within-prompt "
            f"gap {within_gap:.4f} nats/token (NLL of a response given the latent of another "
            f"response to the same prompt minus given its own) < guide.min_informativeness="
            f"{threshold}; across-prompt gap {across_gap:.4f}. psi reconstructs responses "
            f"without h. Try a weaker decoder (--set guide.decoder_layers=1), more word dropout "
            f"(--set guide.word_dropout=0.7), more epochs or a larger guide.latent_dim; or "
            f"accept these weights with --set guide.min_informativeness=null")


# ---- training --------------------------------------------------------------------------


def lr_factor(step: int, total: int, warmup: int) -> float:
    """Linear warmup over `warmup` steps to 1, then linear decay to 0 at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def _fingerprint(cfg: GuideConfig, pairs: Sequence[tuple[str, str]], world: int) -> str:
    blob = json.dumps([cfg.model_dump(exclude={"min_informativeness", "save_decoder"}),
                       list(pairs), world])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _trainable_state(guide: GuideModel) -> dict[str, torch.Tensor]:
    names = {n for n, p in guide.named_parameters() if p.requires_grad}
    return {k: v for k, v in guide.state_dict().items() if k in names}


def _resume(checkpoint_dir: Path | None, fingerprint: str, guide: GuideModel, optim,
            sched) -> list[dict]:
    """Load the last epoch's state if `checkpoint_dir` has one; returns the history so far."""
    path = None if checkpoint_dir is None else checkpoint_dir / STATE_FILE
    if path is None or not path.is_file():
        return []
    state = torch.load(path, map_location=guide.device, weights_only=False)
    if state["fingerprint"] != fingerprint:
        raise ValueError(f"{path}: checkpoint of another guide config or data; delete "
                         f"{checkpoint_dir} to start over")
    guide.load_state_dict(state["model"], strict=False)
    optim.load_state_dict(state["optim"])
    sched.load_state_dict(state["sched"])
    return state["history"]


def _save_state(checkpoint_dir: Path, fingerprint: str, guide: GuideModel, optim, sched,
                history: list[dict]) -> None:
    checkpoint_dir.mkdir(parents=True, exist_ok=True)
    state = {"fingerprint": fingerprint, "model": _trainable_state(guide),
             "optim": optim.state_dict(), "sched": sched.state_dict(), "history": history}
    with atomic_file(checkpoint_dir / STATE_FILE) as tmp:
        torch.save(state, tmp)
    with open(checkpoint_dir / PROGRESS_FILE, "a") as f:
        f.write(json.dumps(history[-1]) + "\n")


def _train_epoch(model: nn.Module, guide: GuideModel, optim, sched, cfg: GuideConfig,
                 rows: Sequence, features: Tensor | None, rng: torch.Generator
                 ) -> tuple[float, float]:
    """One epoch of Eq. 2 steps over this rank's encoded ``rows`` in order, ``cfg.batch_size``
    a step (``features``: the frozen encoder's pooled states of the same rows, or None);
    returns the summed response-token NLL and the token count."""
    params = [p for p in guide.parameters() if p.requires_grad]
    nll = count = 0.0
    for start in range(0, len(rows), cfg.batch_size):
        batch = collate(rows[start:start + cfg.batch_size],
                        guide.tokenizer.pad_token_id).to(guide.device)
        logps, tokens = model(batch, cfg.word_dropout, rng,
                              None if features is None else features[start:start + cfg.batch_size])
        loss = -logps.sum() / tokens.sum()
        optim.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
        optim.step()
        sched.step()
        nll -= logps.sum().item()
        count += tokens.sum().item()
    return nll, count


def train_guide_model(
    guide: GuideModel, pairs: Sequence[tuple[str, str]], cfg: GuideConfig,
    on_epoch: Callable[[dict], None] | None = None, checkpoint_dir: str | Path | None = None,
) -> list[dict]:
    """Train T on (prompt, response) pairs by Eq. 2 with the recipe of `cfg` (module docstring).

    Each rank takes its share of every epoch's seeded order (all ranks the same number of
    steps). Returns one dict per epoch: epoch, loss (mean response-token NLL of this rank's
    batches, with word dropout), steps, lr at the epoch's end, rows_per_s, eta_s.
    """
    dist = torch.distributed
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    if len(pairs) < world:
        raise ValueError(f"{len(pairs)} pairs cannot be shared by {world} workers")
    model: nn.Module = guide
    if world > 1:
        model = nn.parallel.DistributedDataParallel(
            guide, device_ids=[guide.device.index] if guide.device.type == "cuda" else None)
    params = [p for p in guide.parameters() if p.requires_grad]
    per_rank = len(pairs) // world
    steps = math.ceil(per_rank / cfg.batch_size)
    optim = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    total, warmup = steps * cfg.epochs, math.ceil(cfg.warmup_ratio * steps * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, lambda s: lr_factor(s, total, warmup))
    fingerprint = _fingerprint(cfg, pairs, world)
    checkpoint_dir = None if checkpoint_dir is None else Path(checkpoint_dir)
    history = _resume(checkpoint_dir, fingerprint, guide, optim, sched)
    encoded = guide.encode_pairs([p for p, _ in pairs], [r for _, r in pairs])
    features = None
    if not cfg.train_encoder and len(history) < cfg.epochs:
        features = guide.pooled([p for p, _ in pairs], [r for _, r in pairs], cfg.batch_size,
                                project=False).to(guide.device)
    guide.train()
    start_time, done_rows, first = time.time(), 0, len(history)
    for epoch in range(first, cfg.epochs):
        # word dropout draws from (seed, rank, epoch): a resumed epoch draws what it would have
        rng = torch.Generator().manual_seed((cfg.seed * 1000 + rank) * 100003 + epoch)
        order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(cfg.seed + epoch))
        mine = order[rank::world][:per_rank].tolist()
        nll, count = _train_epoch(model, guide, optim, sched, cfg, [encoded[i] for i in mine],
                                  None if features is None else features[mine], rng)
        done_rows += per_rank * world
        elapsed = time.time() - start_time
        history.append({"epoch": epoch, "loss": nll / count, "steps": steps,
                        "lr": sched.get_last_lr()[0], "rows_per_s": done_rows / elapsed,
                        "eta_s": elapsed / (epoch + 1 - first) * (cfg.epochs - epoch - 1)})
        if rank == 0 and checkpoint_dir is not None:
            _save_state(checkpoint_dir, fingerprint, guide, optim, sched, history)
        if on_epoch is not None:
            on_epoch(history[-1])
    guide.eval()
    return history
