import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rayalign.data import collate_pairs
from rayalign.logprobs import sequence_logprobs, token_logprobs


def naive_sequence_logprobs(model, batch):
    """Full float64 log-softmax over the vocabulary, token by token (the brute-force reference)."""
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.double()
    logp = torch.log_softmax(logits, -1)
    out = torch.zeros(batch.input_ids.shape[0], dtype=torch.float64)
    for b in range(batch.input_ids.shape[0]):
        for t in range(1, batch.input_ids.shape[1]):
            if batch.response_mask[b, t]:
                out[b] += logp[b, t - 1, batch.input_ids[b, t]]
    return out


def test_token_logprobs_equals_log_softmax_and_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (3, 5))
    ref = torch.log_softmax(logits, -1).gather(-1, labels[..., None]).squeeze(-1)
    got = token_logprobs(logits, labels, chunk_rows=4)
    torch.testing.assert_close(got.double(), ref, atol=1e-6, rtol=0)
    torch.autograd.gradcheck(lambda x: token_logprobs(x, labels, 4).double(), (logits,))


def test_bf16_logits_keep_float32_precision():
    torch.manual_seed(0)
    logits = torch.randn(64, 300).bfloat16()
    labels = torch.randint(0, 300, (64,))
    ref = torch.log_softmax(logits.double(), -1).gather(-1, labels[:, None]).squeeze(-1)
    got = token_logprobs(logits, labels, chunk_rows=7)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=0)


def test_sequence_logprobs_match_naive(tiny_llama):
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float64)
    batch = collate_pairs(tok, ["sort: 3 1 2 =>", "sort: 9 =>"], [" 1 2 3", " 9"],
                          [" 3 2", " 9 9 9 9"], 16, 32)
    logps, counts = sequence_logprobs(model, batch, chunk_rows=5)
    torch.testing.assert_close(logps.double(), naive_sequence_logprobs(model, batch),
                               atol=1e-6, rtol=0)
    assert counts.tolist() == batch.response_mask.sum(-1).tolist()
    logps.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all()
               for p in model.parameters() if p.requires_grad)
