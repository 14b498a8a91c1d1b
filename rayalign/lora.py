"""LoRA adapters through peft (`rayalign.config_train.LoraConfig`): wrap, disable for the
reference model, export merged or as an adapter.

The policy is ``W + (alpha / r) B A`` on the target modules with B initialised to 0 (peft's
default), so the wrapped model starts as the base model and the base model is the wrapped one
with its adapters disabled: that is the reference model of DPO-style objectives, without a
second copy of the weights.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path

import torch

from .config_train import LoraConfig
from .models import load_model, save_checkpoint
from .io import atomic_dir


def _peft_config(cfg: LoraConfig):
    from peft import LoraConfig as PeftLoraConfig

    targets = cfg.target_modules if cfg.target_modules == "all-linear" else list(cfg.target_modules)
    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                          target_modules=targets, task_type="CAUSAL_LM")


def apply_lora(model: torch.nn.Module, cfg: LoraConfig) -> torch.nn.Module:
    """``model`` wrapped by peft: base weights frozen, adapters trainable."""
    from peft import get_peft_model

    return get_peft_model(model, _peft_config(cfg))


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` with its LoRA adapters merged into the base weights and the peft wrapping
    removed (in place, peft's ``merge_and_unload``); a model without adapters as it is."""
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def adapters_disabled(model: torch.nn.Module) -> AbstractContextManager:
    """Inside the context ``model`` (an `apply_lora` model) computes the base model."""
    return model.disable_adapter()


def export_lora(model: torch.nn.Module, tokenizer, base_path: str, cfg: LoraConfig,
                out_dir: str | Path) -> Path:
    """Write the trained adapters of ``model`` to ``out_dir`` atomically.

    ``merged``: a fresh float32 copy of the base checkpoint on the CPU receives the adapter
    weights and merges them (``merge_and_unload``), so the output is a plain Hugging Face
    checkpoint and the training model keeps its adapters. ``adapter``: peft's adapter
    directory (loads with ``peft.AutoPeftModelForCausalLM`` or ``PeftModel.from_pretrained``).
    """
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    if cfg.export == "adapter":
        with atomic_dir(out_dir) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        return Path(out_dir)
    copy = apply_lora(load_model(base_path), cfg)
    state = {k: v.detach().to("cpu", torch.float32)
             for k, v in get_peft_model_state_dict(model).items()}
    set_peft_model_state_dict(copy, state)
    return save_checkpoint(merged(copy), tokenizer, out_dir)
