"""Loading and saving Hugging Face causal LMs and their tokenizers by path."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from .config import ModelConfig
from .io import atomic_dir

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`auto` is bfloat16 on an accelerator and float32 on the CPU."""
    if name == "auto":
        return torch.float32 if torch.device(device).type == "cpu" else torch.bfloat16
    return _DTYPES[name]


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The checkpoint's tokenizer; a missing pad token falls back to EOS (common for base LMs)."""
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    cfg: ModelConfig | str | Path, device: torch.device | str = "cpu", trainable: bool = False
) -> torch.nn.Module:
    """A causal LM on `device`, in eval mode with gradients off unless `trainable`."""
    cfg = cfg if isinstance(cfg, ModelConfig) else ModelConfig(path=str(cfg))
    model = AutoModelForCausalLM.from_pretrained(cfg.path, dtype=resolve_dtype(cfg.dtype, device))
    model.to(device)
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


def save_checkpoint(model: torch.nn.Module, tokenizer, out_dir: str | Path,
                    state_dict: dict | None = None) -> Path:
    """Atomically write a Hugging Face checkpoint (safetensors + tokenizer) to `out_dir`;
    `state_dict` replaces the model's own tensors (a ZeRO-3 model gathered on one rank)."""
    with atomic_dir(out_dir) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
    return Path(out_dir)
