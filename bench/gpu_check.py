"""A GPU check that fits a lent GPU: the hot paths of rayalign on one card, in minutes.

Ray-free and checkpoint-free: the lent machine has torch, transformers (peft, accelerate)
but no Ray, DeepSpeed or vLLM, and nothing larger than 64 MiB travels to it, so the policy is
a ~0.5B-parameter Llama built from a config with random weights, fed random token ids.
Sections (each timed after a warm-up; CUDA timings synchronize first):

- ``dpo_step``: the training loop's DPO step in bf16 (rayalign.logprobs + rayalign.losses,
  policy forward/backward of chosen + rejected, reference forward, AdamW): tokens/s and MFU
  = (6 N + 2 N) tokens / s / peak, N the non-embedding parameters (policy forward+backward
  plus reference forward), against the card's dense bf16 peak. bf16 autocast over fp32
  weights with torch AdamW (DeepSpeed is not assumed).
- ``logprobs``: `rayalign.logprobs.sequence_logprobs` (head chunked over response positions)
  vs a naive full-vocabulary log-softmax: forward+backward time and peak memory.
- ``sampling``: batched HF ``generate`` (sampling, KV cache) tokens/s.
- ``guide``: the guide encoder's batched scoring rate (pairs/s) of `rayalign.guide`
  (needs pydantic for rayalign.config; skipped with the reason otherwise).
- ``bf16_vs_fp32``: the same DPO loss and log-probs from fp32 and bf16 weights.

Writes ``gpu_check.json`` and ``gpu_check.md`` to ``--out``. ``--cpu --tiny`` runs the same
code on a tiny model on the CPU in seconds (tests/test_gpu_check.py runs it in CI).

    python bench/gpu_check.py --out bench/results/gpu_check    # on a GPU, ~0.5B model
    python bench/gpu_check.py --cpu --tiny --out /tmp/gpu_check
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rayalign.data import SequenceBatch  # noqa: E402
from rayalign.logprobs import sequence_logprobs  # noqa: E402
from rayalign.losses import dpo_loss  # noqa: E402

# dense bf16 peak FLOP/s (no sparsity) by device-name substring
PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
SIZES = {
    # ~0.5B: 24 layers of d=1024 (GQA 16/4 heads, SwiGLU 4096) and a 32k vocabulary
    "full": dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                 num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
                 pairs=8, prompt=128, response=384, steps=10, sample_batch=32, new_tokens=128,
                 guide_pairs=512),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=512,
                 pairs=2, prompt=8, response=16, steps=2, sample_batch=2, new_tokens=8,
                 guide_pairs=8),
}
_ARCH = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
         "num_key_value_heads", "vocab_size")


def build_model(size: dict, device: torch.device, seed: int = 0) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**{k: size[k] for k in _ARCH}, max_position_embeddings=2048,
                      tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(device)


def pair_batch(size: dict, device: torch.device, seed: int = 1) -> SequenceBatch:
    """Chosen rows then rejected rows (the trainer's layout), random ids, full length."""
    g = torch.Generator().manual_seed(seed)
    n, p, r = 2 * size["pairs"], size["prompt"], size["response"]
    ids = torch.randint(0, size["vocab_size"], (n, p + r), generator=g)
    response = torch.zeros(n, p + r, dtype=torch.bool)
    response[:, p:] = True
    return SequenceBatch(ids, torch.ones_like(ids), response).to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    """Seconds per call after one warm-up call, and the last result."""
    out = fn()
    _sync(device)
    start = time.perf_counter()
    for _ in range(repeats):
        out = fn()
    _sync(device)
    return (time.perf_counter() - start) / repeats, out


def peak_memory(fn: Callable[[], object], device: torch.device) -> float | None:
    """Peak accelerator memory (GiB) above what was allocated before ``fn``; None on the CPU."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def non_embedding_params(model: torch.nn.Module) -> int:
    skip = {id(model.get_input_embeddings().weight), id(model.get_output_embeddings().weight)}
    return sum(p.numel() for p in model.parameters() if id(p) not in skip)


def _dpo(policy, reference, batch: SequenceBatch, pairs: int) -> torch.Tensor:
    logps, _ = sequence_logprobs(policy, batch)
    with torch.no_grad():
        ref, _ = sequence_logprobs(reference, batch)
    return dpo_loss(logps[:pairs], logps[pairs:], ref[:pairs], ref[pairs:], beta=0.1)


def check_dpo_step(size: dict, device: torch.device, peak: float | None) -> dict:
    policy, reference = build_model(size, device), build_model(size, device)
    reference.requires_grad_(False)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-6, foreach=True)
    batch = pair_batch(size, device)

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = _dpo(policy, reference, batch, size["pairs"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    seconds, loss = timed(step, device, size["steps"])
    tokens = batch.input_ids.numel()
    flops = 8 * non_embedding_params(policy) * tokens / seconds
    return {"params": sum(p.numel() for p in policy.parameters()),
            "non_embedding_params": non_embedding_params(policy), "tokens_per_step": tokens,
            "step_s": seconds, "tokens_per_s": tokens / seconds, "model_tflops": flops / 1e12,
            "mfu": None if peak is None else flops / peak, "loss": loss}


def _naive_logps(model, batch: SequenceBatch) -> torch.Tensor:
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    logp = logits[:, :-1].float().log_softmax(-1)
    token = logp.gather(-1, batch.input_ids[:, 1:, None]).squeeze(-1)
    return (token * batch.response_mask[:, 1:]).sum(-1)


def check_logprobs(size: dict, device: torch.device) -> dict:
    model = build_model(size, device).to(torch.bfloat16)
    batch = pair_batch(size, device)
    out = {}
    for name, fn in (("chunked", lambda: sequence_logprobs(model, batch)[0]),
                     ("naive", lambda: _naive_logps(model, batch))):
        def fwd_bwd(fn=fn):
            value = fn()
            value.sum().backward()
            model.zero_grad(set_to_none=True)
            return value.detach()

        seconds, value = timed(fwd_bwd, device, 3)
        out[name] = {"fwd_bwd_s": seconds, "peak_gib": peak_memory(fwd_bwd, device)}
        out[f"{name}_logps"] = value.float().cpu()
    diff = float((out.pop("chunked_logps") - out.pop("naive_logps")).abs().max())
    out["max_abs_diff"] = diff
    return out


def check_sampling(size: dict, device: torch.device) -> dict:
    model = build_model(size, device).to(torch.bfloat16).eval()
    g = torch.Generator().manual_seed(2)
    prompts = torch.randint(0, size["vocab_size"], (size["sample_batch"], size["prompt"]),
                            generator=g).to(device)

    def generate():
        with torch.no_grad():
            return model.generate(prompts, attention_mask=torch.ones_like(prompts),
                                  do_sample=True, top_p=1.0, max_new_tokens=size["new_tokens"],
                                  min_new_tokens=size["new_tokens"], pad_token_id=0)

    seconds, out = timed(generate, device, 2)
    new = (out.shape[1] - prompts.shape[1]) * prompts.shape[0]
    return {"batch": prompts.shape[0], "new_tokens": new, "seconds": seconds,
            "tokens_per_s": new / seconds}


def check_guide(size: dict, device: torch.device) -> dict:
    try:
        from rayalign import toytask
        from rayalign.guide import GuideModel, GuideSpec
        from rayalign.tiny import train_tokenizer
    except ImportError as err:
        return {"skipped": f"rayalign.guide does not import here: {err}"}
    tokenizer = train_tokenizer(toytask.corpus(), vocab_size=min(384, size["vocab_size"]))
    encoder = build_model(size, device).eval()  # float32, as the guide is trained and scored
    guide = GuideModel(encoder, None, tokenizer, GuideSpec(16, 4, "last", size["prompt"],
                                                           size["prompt"] + size["response"]))
    rows = toytask.make_rows(size["guide_pairs"], seed=3)
    prompts = [r["prompt"] for r in rows]
    gold = [r["completion"] for r in rows]
    other = gold[1:] + gold[:1]
    seconds, _ = timed(lambda: guide.distances(prompts, gold, other, batch_size=64), device, 2)
    return {"pairs": len(rows), "seconds": seconds, "pairs_per_s": len(rows) / seconds}


def check_bf16_vs_fp32(size: dict, device: torch.device) -> dict:
    """fp32 weights vs their bf16 copy (policy = reference + a small perturbation, so the
    DPO margin is not exactly 0): loss and per-sequence log-prob differences."""
    reference = build_model(size, device)
    policy = build_model(size, device)
    with torch.no_grad():
        for p, q in zip(policy.parameters(), reference.parameters()):
            p.copy_(q + 1e-3 * torch.randn_like(q))
    batch, pairs = pair_batch(size, device), size["pairs"]
    with torch.no_grad():
        fp32 = (_dpo(policy, reference, batch, pairs), sequence_logprobs(policy, batch)[0])
        policy.to(torch.bfloat16)
        reference.to(torch.bfloat16)
        bf16 = (_dpo(policy, reference, batch, pairs), sequence_logprobs(policy, batch)[0])
    per_token = (fp32[1] - bf16[1].float()).abs() / size["response"]
    return {"loss_fp32": float(fp32[0]), "loss_bf16": float(bf16[0]),
            "loss_abs_diff": float((fp32[0] - bf16[0].float()).abs()),
            "logps_max_abs_diff_per_token": float(per_token.max())}


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device']} ({report['size']})", "",
             "| section | figure | value |", "|---|---|---|"]
    for section, values in report["sections"].items():
        for key, value in _flat(values):
            shown = f"{value:.4g}" if isinstance(value, float) else str(value)
            lines.append(f"| {section} | {key} | {shown} |")
    return "\n".join(lines) + "\n"


def _flat(values: dict, prefix: str = ""):
    for key, value in values.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true", help="run on the CPU")
    parser.add_argument("--tiny", action="store_true", help="a tiny model (seconds)")
    parser.add_argument("--out", default="bench/results/gpu_check")
    args = parser.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        parser.error("no CUDA device visible; use --cpu")
    device = torch.device("cpu" if args.cpu else "cuda")
    name = "cpu" if args.cpu else torch.cuda.get_device_name()
    peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
    size = SIZES["tiny" if args.tiny else "full"]
    started = time.perf_counter()
    sections = {}
    for section, check in (("dpo_step", lambda: check_dpo_step(size, device, peak)),
                           ("logprobs", lambda: check_logprobs(size, device)),
                           ("sampling", lambda: check_sampling(size, device)),
                           ("guide", lambda: check_guide(size, device)),
                           ("bf16_vs_fp32", lambda: check_bf16_vs_fp32(size, device))):
        sections[section] = check()
        print(section, json.dumps(sections[section]), flush=True)
    report = {"device": name, "size": "tiny" if args.tiny else "full", "peak_bf16": peak,
              "torch": torch.__version__, "seconds": time.perf_counter() - started,
              "sections": sections}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_check.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "gpu_check.md").write_text(markdown(report))
    print(f"wrote {out / 'gpu_check.json'} and gpu_check.md in {report['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
