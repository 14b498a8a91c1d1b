"""The one module that reads DeepSpeed's parameter internals (pinned: deepspeed 0.19.x).

Hbat's EWC term, C and Hbat-Freeze work on each rank's *pieces* of the fp32 master
parameters, gradients and optimizer state, without communication. DeepSpeed's public
``deepspeed.utils.safe_get_*`` helpers cover ZeRO-0 and ZeRO-3; the rank-local fragments of
ZeRO 1/2 and of the bf16 optimizer (``BF16_Optimizer``) are reachable only through the
private ``param._hp_mapping`` (a ``deepspeed.utils.tensor_fragment.tensor_fragment``:
``get_hp_fragment``, ``get_lp_grad_fragment``, ``lp_fragment_address``, ``optim_fragment``)
and the optimizer's ``_lazy_init_hp_params_optimizer_state``. Keeping every such access
here means a DeepSpeed upgrade is checked in one place (tests/test_hbat_zero.py,
tests/test_train_zero.py and tests/test_train_precision.py exercise each branch).

Pieces by engine: ZeRO-0 fp32: the whole tensor; ZeRO 1/2 and bf16: this rank's flat 1-D
fragment inside its optimizer partition (None when the tensor is wholly on other ranks);
ZeRO-3 (``param.ds_id``): this rank's flat 1-D partition.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def _zero3(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "ds_id")


def _fragmented(p: torch.nn.Parameter) -> bool:
    return hasattr(p, "_hp_mapping")


def partitioned(p: torch.nn.Parameter) -> bool:
    """True when ``p``'s pieces are partitions (ZeRO 1/2/3, bf16), False when whole (ZeRO-0)."""
    return _zero3(p) or _fragmented(p)


def full_numel(p: torch.nn.Parameter) -> int:
    """Elements of the whole tensor (a ZeRO-3 parameter's own ``numel`` is 0 outside a gather)."""
    return int(getattr(p, "ds_numel", p.numel()))


def local_param(p: torch.nn.Parameter) -> Tensor | None:
    """This rank's piece of ``p``'s fp32 master weights (None: none on this rank)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_local_fp32_param

    if _zero3(p):
        return safe_get_local_fp32_param(p)
    if _fragmented(p):
        return None if p._hp_mapping is None else p._hp_mapping.get_hp_fragment()
    full = safe_get_full_fp32_param(p)
    return p.detach() if full is None else full


def _grad_fragment(p: torch.nn.Parameter) -> Tensor:
    """The averaged gradient of ``p``'s fragment in this rank's ZeRO 1/2 partition (a view).

    As DeepSpeed's own ``get_full_hp_grad``: the optimizer keeps a buffer of the whole
    parameter, of which this rank owns ``lp_fragment_address``.
    """
    mapping = p._hp_mapping
    grad = mapping.get_lp_grad_fragment(p._index_in_param_group).view(-1)
    address = mapping.lp_fragment_address
    if grad.numel() != address.numel:
        grad = grad.narrow(0, address.start, address.numel)
    return grad


def update_local_grad(p: torch.nn.Parameter, fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    """``grad_piece <- fn(param_piece, grad_piece)`` on this rank's piece of ``p``.

    The gradient is the reduced, averaged, unclipped one in the accumulation dtype; ``fn`` may
    modify it in place and return it. No communication (under ZeRO 1/2 this writes what
    ``safe_set_full_grad`` would, without its all-reduce).
    """
    from deepspeed.utils import (safe_get_full_grad, safe_get_local_grad, safe_set_full_grad,
                                 safe_set_local_grad)

    if _zero3(p):
        safe_set_local_grad(p, fn(local_param(p), safe_get_local_grad(p)))
    elif _fragmented(p):
        if p._hp_mapping is not None:
            grad = _grad_fragment(p)
            grad.copy_(fn(local_param(p), grad))
    else:
        safe_set_full_grad(p, fn(local_param(p), safe_get_full_grad(p)))


def link_optimizer_state(optimizer) -> None:
    """ZeRO 1/2 and bf16 link each fragment to its optimizer state only after the engine's
    first step; an engine that has just loaded a checkpoint has the state but not the links."""
    link = getattr(optimizer, "_lazy_init_hp_params_optimizer_state", None)
    if link is not None:
        link()


def local_optimizer_state(optimizer, p: torch.nn.Parameter, key: str) -> Tensor | None:
    """This rank's piece of ``p``'s optimizer state ``key`` (e.g. AdamW's ``exp_avg``), a view
    that may be written; None when the optimizer has none yet (no step taken) or none here.
    Call `link_optimizer_state` first."""
    from deepspeed.utils import safe_get_local_optimizer_state

    if _zero3(p):
        return safe_get_local_optimizer_state(p, key)
    if _fragmented(p):
        mapping = p._hp_mapping
        if mapping is None or key not in (mapping.optim_fragment or {}):
            return None
        return mapping.get_optim_state_fragment(key)
    return optimizer.state.get(p, {}).get(key)  # ZeRO-0 fp32: a plain torch optimizer


def rank0_state_dict(engine) -> dict[str, Tensor]:
    """The full ZeRO-3 state dict on rank 0 (CPU tensors; empty on other ranks). Collective.

    DeepSpeed gathers one module at a time and only rank 0 keeps a copy, so no rank ever
    holds all parameters on its accelerator (what ``save_16bit_model`` writes; the tensors
    keep the training dtype).
    """
    return engine._zero3_consolidated_16bit_state_dict()
