"""Hidden-state log-probs against the model's own full logits, values and gradients."""

import copy

import pytest
import torch
from transformers import (AutoModelForCausalLM, AutoTokenizer, CohereConfig, Gemma2Config,
                          GraniteConfig, LlamaConfig, PhiConfig)

from rayalign.data import SequenceBatch, collate_pairs
from rayalign.logprobs import (Head, HeadMismatchError, _HeadLogProb, logprobs_at,
                               sequence_logprobs)

VOCAB = 97
_SMALL = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
              num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64)
# One small config per head form the module claims to reproduce exactly.
HEADS = {
    "llama_untied": LlamaConfig(**_SMALL, tie_word_embeddings=False),
    "phi_bias": PhiConfig(**_SMALL),  # lm_head has a bias
    "cohere_scale": CohereConfig(**_SMALL, logit_scale=0.37),
    "granite_scaling": GraniteConfig(**_SMALL, logits_scaling=2.5),
    "gemma2_softcap": Gemma2Config(**_SMALL, head_dim=8, final_logit_softcapping=1.5,
                                   attn_implementation="eager"),
}


def naive_sequence_logprobs(model, batch):
    """Full float64 log-softmax over the model's own logits, token by token (brute force)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    logp = torch.log_softmax(logits, -1)
    out = torch.zeros(batch.input_ids.shape[0], dtype=torch.float64)
    for b in range(batch.input_ids.shape[0]):
        for t in range(1, batch.input_ids.shape[1]):
            if batch.response_mask[b, t]:
                out[b] = out[b] + logp[b, t - 1, batch.input_ids[b, t]]
    return out


def random_batch(seed: int = 0) -> SequenceBatch:
    """Four right-padded rows with prompts of 3-6 tokens and responses of 1-7 tokens."""
    g = torch.Generator().manual_seed(seed)
    lengths = [(3, 7), (6, 1), (4, 4), (5, 2)]
    width = max(p + r for p, r in lengths)
    ids = torch.randint(0, VOCAB, (len(lengths), width), generator=g)
    attention = torch.zeros_like(ids)
    response = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(lengths):
        attention[i, :p + r] = 1
        response[i, p:p + r] = True
    return SequenceBatch(ids, attention, response)


def small_model(name: str, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(copy.deepcopy(HEADS[name])).to(dtype)
    with torch.no_grad():  # random (not zero) biases and large enough logits to soft-cap
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.bias is not None:
                module.bias.normal_()
        model.get_output_embeddings().weight.mul_(8.0)
    return model.eval()


def grads(model, logps, coefficients):
    """Parameter gradients of sum_b coefficient_b * logps_b (distinct per sequence, as DPO)."""
    model.zero_grad()
    (logps * coefficients).sum().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("dtype,tol", [
    # float64: both paths are exact up to float64 rounding over a few dozen terms
    (torch.float64, 1e-10),
    # float32: a float32 logsumexp (ours) against a float64 one of the same float32 logits,
    # from an [N, d] instead of a [B*T, d] matmul: a few roundings of eps = 1.2e-7 per token,
    # relative to sums of up to ~30 here, so 1e-6 relative (plus 1e-6 absolute near 0)
    (torch.float32, 1e-6),
])
@pytest.mark.parametrize("name", sorted(HEADS))
def test_every_head_form_matches_the_models_own_logits(name, dtype, tol):
    model, batch = small_model(name, dtype), random_batch()
    coefficients = torch.tensor([1.0, -2.0, 0.5, 3.0], dtype=dtype)
    logps, counts = sequence_logprobs(model, batch, chunk_rows=5)
    naive = naive_sequence_logprobs(model, batch)
    torch.testing.assert_close(logps.double(), naive, atol=tol, rtol=tol)
    assert counts.tolist() == [7, 1, 4, 2]
    ours, theirs = grads(model, logps, coefficients), grads(model, naive.to(dtype), coefficients)
    for key in theirs:
        # gradients are sums of the same terms in another order: 1e-10 (float64) or
        # float32 rounding over the head's [V, d] accumulation (1e-5)
        torch.testing.assert_close(ours[key], theirs[key], atol=tol * 10, rtol=tol * 10,
                                   msg=lambda m: f"{name} {key}: {m}")


@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_tied_tiny_checkpoints_match_naive(fixture, request):
    path = request.getfixturevalue(fixture)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64)
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight
    batch = collate_pairs(tok, ["sort: 3 1 2 =>", "sort: 9 =>"], [" 1 2 3", " 9"],
                          [" 3 2", " 9 9 9 9"], 16, 32)
    logps, counts = sequence_logprobs(model, batch, chunk_rows=3)
    naive = naive_sequence_logprobs(model, batch)
    torch.testing.assert_close(logps, naive, atol=1e-10, rtol=0)
    assert counts.tolist() == batch.response_mask.sum(-1).tolist()
    coefficients = torch.tensor([1.0, -1.0, 2.0, 0.25], dtype=torch.float64)
    ours, theirs = grads(model, logps, coefficients), grads(model, naive, coefficients)
    for key in theirs:  # the tied weight gets the embedding's and the head's gradient
        torch.testing.assert_close(ours[key], theirs[key], atol=1e-10, rtol=0)


@pytest.mark.parametrize("bias,scale,softcap", [(False, 1.0, None), (True, 0.3, 2.0)])
def test_head_function_gradcheck(bias, scale, softcap):
    torch.manual_seed(0)
    h = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    w = (3 * torch.randn(11, 5, dtype=torch.float64)).requires_grad_()
    b = torch.randn(11, dtype=torch.float64, requires_grad=True) if bias else None
    labels = torch.randint(0, 11, (7,))
    head = Head(w, b, scale, softcap)
    ref = torch.log_softmax(head.logits(h, torch.float64), -1).gather(-1, labels[:, None])[:, 0]
    got = _HeadLogProb.apply(h, w, b, labels, scale, softcap, 3)
    torch.testing.assert_close(got, ref, atol=1e-12, rtol=0)
    inputs = (h, w) + ((b,) if bias else ())
    torch.autograd.gradcheck(
        lambda h, w, *b: _HeadLogProb.apply(h, w, b[0] if b else None, labels, scale, softcap, 3),
        inputs)


def test_bf16_model_keeps_float32_sums():
    model, batch = small_model("llama_untied", torch.bfloat16), random_batch()
    logps, _ = sequence_logprobs(model, batch)
    assert logps.dtype == torch.float32
    # bf16 logits round at ~2^-8 relative; 16 tokens of |logit| ~ 10 stay within 0.5
    reference = naive_sequence_logprobs(model, batch)
    torch.testing.assert_close(logps.double(), reference, atol=0.5, rtol=0)


def test_a_head_of_another_form_is_refused():
    """A config that claims a soft-cap the model does not apply: the last-position check fails."""
    model = small_model("llama_untied", torch.float64)
    model.config.final_logit_softcapping = 0.5
    with pytest.raises(HeadMismatchError, match="differs from the model's own logits"):
        sequence_logprobs(model, random_batch())


def test_no_position_by_vocabulary_tensor_is_kept_for_the_backward():
    """Autograd saves nothing vocabulary-sized larger than the head's weight (or its transpose):
    the [B, T, V] logits here would be 40 x 97, the weight 97 x 16."""
    model, batch = small_model("llama_untied", torch.float32), random_batch()
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t,
                                                  lambda t: t):
        logps, _ = sequence_logprobs(model, batch, chunk_rows=4)
    big = [s for s in saved if VOCAB in s and s.numel() > VOCAB * 16]
    assert not big, big
    logps.sum().backward()


def test_logprobs_at_scores_inputs_embeds():
    """The guide's form: embeddings in, a scored mask over arbitrary positions."""
    model, batch = small_model("cohere_scale", torch.float64), random_batch(1)
    embeds = model.get_input_embeddings()(batch.input_ids)
    scored = torch.nn.functional.pad(batch.response_mask[:, 1:], (0, 1), value=False)
    targets = torch.nn.functional.pad(batch.input_ids[:, 1:], (0, 1))
    got, counts = logprobs_at(model, targets, scored, inputs_embeds=embeds,
                              attention_mask=batch.attention_mask)
    torch.testing.assert_close(got, naive_sequence_logprobs(model, batch), atol=1e-10, rtol=0)
    assert counts.tolist() == batch.response_mask.sum(-1).tolist()
