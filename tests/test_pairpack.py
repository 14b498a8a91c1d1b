"""Packed pairs (one forward per pair, the prompt once) against the two-row forward."""

import dataclasses

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from rayalign.data import collate
from rayalign.logprobs import sequence_logprobs
from rayalign.pairpack import pack_pairs, pair_logprobs, supports_pair_packing

PAD = 0
# (prompt, chosen) and (prompt', rejected) token ids: a shared prompt; a rejected reply that
# starts like the chosen one (the common prefix runs into the responses); prompts cut
# differently (prefix shorter than the prompt); a rejected sequence that is a prefix of the
# chosen one; an empty prompt; and lengths that make the packed rows need padding.
CHOSEN = [([5, 6, 7], [8, 9, 2]), ([5, 6, 7, 11], [12, 13, 14, 15, 2]),
          ([21, 22, 23, 24], [25, 2]), ([30, 31], [32, 33, 34, 2]), ([], [40, 41, 2])]
REJECTED = [([5, 6, 7], [10, 2]), ([5, 6, 7, 11], [12, 13, 16, 2]),
            ([22, 23, 24], [26, 27, 28, 2]), ([30, 31], [32, 33]), ([], [42, 2])]


def test_layout_by_hand():
    """Pair 1: a = 5 6 7 11 12 13 14 15 2, b = 5 6 7 11 12 13 16 2, common prefix k = 6."""
    pack = pack_pairs(CHOSEN, REJECTED, PAD)
    assert pack.input_ids[1].tolist() == [5, 6, 7, 11, 12, 13, 14, 15, 2, 16, 2, PAD, PAD]
    assert pack.position_ids[1].tolist()[:11] == [0, 1, 2, 3, 4, 5, 6, 7, 8, 6, 7]
    allowed = pack.allowed[1, 0]
    # b's token 16 (packed 9) sees the prefix 0..5 and itself, not a's 14 15 2 (6..8)
    assert allowed[9, :11].tolist() == [True] * 6 + [False] * 3 + [True, False]
    assert allowed[10, :11].tolist() == [True] * 6 + [False] * 3 + [True, True]
    assert allowed[8, :11].tolist() == [True] * 9 + [False] * 2  # a: causal, within a
    assert allowed[11].tolist() == [True] + [False] * 12  # padding query: key 0 only
    # pair 2: prompts differ from the first token on, so nothing is shared (k = 0)
    assert pack.position_ids[2].tolist()[:13] == list(range(6)) + list(range(7))
    # pair 3: b = 30 31 32 33 is a prefix of a, so the row is a alone
    assert pack.lengths.tolist() == [8, 11, 13, 6, 5]
    # b of pair 1 scores 12 13 16 2: from positions 3, 4 (shared with a), 5 (shared), 9
    mine = (pack.slots == 5 + 1).nonzero().flatten()
    assert pack.cols[mine].tolist() == [3, 4, 5, 9]
    assert pack.targets[mine].tolist() == [12, 13, 16, 2]
    assert pack.num_tokens.tolist() == [3, 5, 2, 4, 2, 2, 4, 4, 2, 1]
    assert pack.sequence_lengths.tolist() == [6, 9, 6, 6, 3, 5, 8, 7, 4, 2]


def _model(arch: str, attn: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=50, n_embd=16, n_layer=2, n_head=2, n_positions=32,
                            resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    else:  # tied embeddings, grouped-query attention, RoPE
        config = LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=32, tie_word_embeddings=True)
    return AutoModelForCausalLM.from_config(config, attn_implementation=attn).to(dtype).train()


def _grads(model, logps, coefficients) -> dict[str, torch.Tensor]:
    """Gradients of sum_i c_i logp_i: every sequence its own upstream gradient, as in DPO."""
    model.zero_grad()
    (logps * coefficients).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_pairs_equal_two_row_forward(arch, attn, dtype):
    """Log-probs (1e-10 float64, 1e-5 float32) and every parameter's gradient.

    Log-probs: each token attends to the same keys in both layouts, so only the batch shapes
    differ: float64 exact to rounding; float32 a few eps = 1.2e-7 of each token's ~4 nats over
    <= 5 tokens per sequence, 1e-5 with margin. Gradients, relative to each tensor's largest
    entry: a shared prefix position receives the chosen and the rejected sequence's upstream
    gradients summed before it passes backward, the two-row layout sums them after. In float64
    GPT-2 that is float64 rounding (1e-12); LlamaRMSNorm computes in float32 even in a float64
    model, so Llama's and every float32 gradient agree to float32 rounding, a few eps over a
    few layers: 2e-6 (measured <= 4e-7).
    """
    log_tol = 1e-10 if dtype == torch.float64 else 1e-5
    grad_rel = 1e-12 if dtype == torch.float64 and arch == "gpt2" else 2e-6
    model = _model(arch, attn, dtype)
    assert supports_pair_packing(model)
    ref, ref_counts = sequence_logprobs(model, collate(CHOSEN + REJECTED, PAD))
    coefficients = torch.linspace(-1.0, 2.0, 2 * len(CHOSEN), dtype=dtype)
    ref_grads = _grads(model, ref, coefficients)
    mine, counts = pair_logprobs(model, pack_pairs(CHOSEN, REJECTED, PAD))
    assert torch.equal(counts, ref_counts)
    torch.testing.assert_close(mine, ref, rtol=0, atol=log_tol)
    for name, grad in _grads(model, mine, coefficients).items():
        scale = float(ref_grads[name].abs().max())
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=grad_rel * scale,
                                   msg=name)


def test_a_wrong_layout_fails_that_comparison():
    """The float64 check above can fail: continuing a's positions into b's suffix (a model
    that ignored ``position_ids``) or a plain causal mask (b's suffix seeing a's reply) moves
    the log-probs by far more than its 1e-10 (a random tiny model is barely position- or
    context-sensitive, hence only 1e-6 here)."""
    model = _model("llama", "sdpa", torch.float64)
    pack = pack_pairs(CHOSEN, REJECTED, PAD)
    width = pack.input_ids.shape[1]
    causal = torch.ones(width, width, dtype=torch.bool).tril().expand_as(pack.allowed)
    ref, _ = sequence_logprobs(model, collate(CHOSEN + REJECTED, PAD))
    for wrong in (dataclasses.replace(pack, position_ids=torch.arange(width).expand(5, width)),
                  dataclasses.replace(pack, allowed=causal)):
        assert float((pair_logprobs(model, wrong)[0] - ref).abs().max()) > 1e-6


def test_models_that_cannot_pack_are_named():
    model = _model("llama", "sdpa", torch.float32)
    model.config.sliding_window = 4
    assert not supports_pair_packing(model)
    with pytest.raises(ValueError, match="cannot take packed pairs"):
        pair_logprobs(model, pack_pairs(CHOSEN, REJECTED, PAD))
    with pytest.raises(ValueError, match="as many chosen as rejected"):
        pack_pairs(CHOSEN, REJECTED[:2], PAD)
