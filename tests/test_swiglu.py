"""rayalign.swiglu: the SwiGLU product's values, gradients and saved memory, against autograd."""

import copy

import torch
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

from rayalign.swiglu import SwiGLUProduct, use_swiglu_product

SMALL = dict(vocab_size=61, hidden_size=16, intermediate_size=40, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)


def model_of(config, dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).to(dtype)


def loss_and_grads(model, ids):
    model.zero_grad()
    logits = model(input_ids=ids).logits
    loss = (logits.double() ** 2).mean() + logits.double()[..., 3].sum()
    loss.backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_gradcheck_float64():
    g = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    u = torch.randn(5, 7, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(SwiGLUProduct.apply, (g, u))


def test_matches_autograd_elementwise():
    g, u = torch.randn(2, 3, 50, dtype=torch.float64), torch.randn(2, 3, 50, dtype=torch.float64)
    grad = torch.randn(2, 3, 50, dtype=torch.float64)
    ref = [t.clone().requires_grad_() for t in (g, u)]
    (torch.nn.functional.silu(ref[0]) * ref[1]).backward(grad)
    ours = [t.clone().requires_grad_() for t in (g, u)]
    SwiGLUProduct.apply(*ours).backward(grad)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-13, atol=1e-14)


def test_llama_and_qwen_models_unchanged_in_value_and_gradient():
    ids = torch.randint(0, 61, (3, 9))
    for config in (LlamaConfig(**SMALL), Qwen2Config(**SMALL)):
        for dtype, tol in ((torch.float32, 1e-6), (torch.float64, 1e-12)):
            plain = model_of(config, dtype)
            patched = copy.deepcopy(plain)
            assert use_swiglu_product(patched) == SMALL["num_hidden_layers"]
            logits_a, grads_a = loss_and_grads(plain, ids)
            logits_b, grads_b = loss_and_grads(patched, ids)
            assert torch.equal(logits_a, logits_b)  # the same ops in the forward
            for name, grad in grads_a.items():
                torch.testing.assert_close(grads_b[name], grad, rtol=tol, atol=tol, msg=name)


def saved_bytes(model, ids) -> int:
    """Bytes autograd saves for the backward during one forward (distinct storages)."""
    seen: dict[int, int] = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=ids).logits.sum()
    return sum(seen.values())


def test_saves_one_intermediate_tensor_less_per_layer():
    ids = torch.randint(0, 61, (2, 11))
    plain = model_of(LlamaConfig(**SMALL))
    patched = copy.deepcopy(plain)
    use_swiglu_product(patched)
    per_layer = ids.numel() * SMALL["intermediate_size"] * 4  # one float32 [tokens, inter]
    assert saved_bytes(plain, ids) - saved_bytes(patched, ids) == \
        SMALL["num_hidden_layers"] * per_layer


def test_other_mlps_untouched():
    model = model_of(GPT2Config(vocab_size=61, n_embd=16, n_layer=2, n_head=2, n_positions=32))
    assert use_swiglu_product(model) == 0
