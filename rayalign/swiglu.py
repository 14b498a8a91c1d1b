"""The SwiGLU MLP's product ``silu(g) * u`` with a backward that recomputes ``silu(g)``.

Llama-family MLPs (Llama, Mistral, Qwen2/3, SmolLM, ...) compute
``down(silu(gate(x)) * up(x))``. Under plain autograd the elementwise part saves three
[tokens, intermediate] tensors for the backward: ``g`` (for silu's), ``silu(g)`` and ``u``
(for the product's); ``down`` saves its input besides. `SwiGLUProduct` saves only ``g`` and
``u`` and recomputes ``s = sigmoid(g)`` in the backward:

    h = g * s * u,    dh/du = g * s,    dh/dg = u * (s + g * s * (1 - s))

so each MLP keeps one [tokens, intermediate] float tensor less for the backward, at the
price of one sigmoid per element. On SmolLM2-135M (30 layers, intermediate 1536) that is
~180 KB per token of a training micro-batch (bench/results/training.md). The forward's value
is bit-identical to the module's own ``act_fn(gate_proj(x)) * up_proj(x)``; the gradients
agree to rounding (tests/test_swiglu.py, float64 gradcheck).

`use_swiglu_product(model)` rebinds the ``forward`` of every MLP module of that shape whose
activation is SiLU; the projections stay the model's own modules, so LoRA adapters, ZeRO-3's
parameter gathering and gradient checkpointing see them exactly as before. Other MLPs (GPT-2's
GELU, Gemma's gelu_tanh) are left as they are.
"""

from __future__ import annotations

import types

import torch
from torch import Tensor
from transformers.activations import SiLUActivation

SILU = (torch.nn.SiLU, SiLUActivation)  # ACT2FN's "swish" and "silu"


class SwiGLUProduct(torch.autograd.Function):
    """``silu(g) * u``, saving ``g`` and ``u`` only (module docstring)."""

    @staticmethod
    def forward(ctx, g: Tensor, u: Tensor) -> Tensor:
        ctx.save_for_backward(g, u)
        return torch.nn.functional.silu(g) * u

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:
        g, u = ctx.saved_tensors
        s = torch.sigmoid(g)
        a = g * s  # silu(g), once for both gradients: s * (1 + g (1 - s)) = s + a (1 - s)
        return grad * u * (s + a * (1 - s)), grad * a


def _mlp_forward(self, x: Tensor) -> Tensor:
    return self.down_proj(SwiGLUProduct.apply(self.gate_proj(x), self.up_proj(x)))


def is_swiglu_mlp(module: torch.nn.Module) -> bool:
    """A module computing ``down_proj(act_fn(gate_proj(x)) * up_proj(x))`` with SiLU."""
    return (all(hasattr(module, name) for name in ("gate_proj", "up_proj", "down_proj"))
            and isinstance(getattr(module, "act_fn", None), SILU))


def use_swiglu_product(model: torch.nn.Module) -> int:
    """Rebind every SwiGLU MLP's forward to `_mlp_forward`; returns how many were."""
    mlps = [m for m in model.modules() if is_swiglu_mlp(m)]
    for mlp in mlps:
        mlp.forward = types.MethodType(_mlp_forward, mlp)
    return len(mlps)
