"""Tiny checkpoints built locally, never downloaded.

`build_tiny_checkpoint` trains a byte-level BPE tokenizer on a small corpus with `tokenizers`,
gives it a chat template and pad/EOS tokens, random-initialises a 2-layer GPT-2 or Llama from
a config, and writes both to a directory. Everything else in rayalign loads that directory by
path exactly like a real Hugging Face checkpoint, so tests and the embedded default exercise
the same code paths as a cluster run on a real model.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Literal

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import GPT2Config, LlamaConfig, PreTrainedTokenizerFast

from .models import save_checkpoint

EOS = "<|endoftext|>"
PAD = "<|pad|>"
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}" + EOS + "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
DEFAULT_CORPUS = (
    "sort the numbers: 3 1 2 -> 1 2 3",
    "The quick brown fox jumps over the lazy dog.",
    "Preference alignment teaches a policy which of two responses is better.",
    "user assistant system: 0 1 2 3 4 5 6 7 8 9 , . ? ! ( ) [ ] + - * / = < >",
)


def train_tokenizer(corpus: Iterable[str], vocab_size: int = 384) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer (any input text is encodable) with pad, EOS and chat template."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [PAD, EOS, "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus) + list(DEFAULT_CORPUS), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model_config(
    arch: Literal["gpt2", "llama"], vocab_size: int, eos_id: int, pad_id: int,
    hidden_size: int = 64, num_layers: int = 2, num_heads: int = 2, max_positions: int = 512,
):
    """A 2-layer causal-LM config of the given architecture."""
    if arch == "gpt2":
        return GPT2Config(
            vocab_size=vocab_size, n_embd=hidden_size, n_layer=num_layers, n_head=num_heads,
            n_positions=max_positions, bos_token_id=eos_id, eos_token_id=eos_id,
            pad_token_id=pad_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
        )
    if arch == "llama":
        return LlamaConfig(
            vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
            num_hidden_layers=num_layers, num_attention_heads=num_heads, num_key_value_heads=1,
            max_position_embeddings=max_positions, bos_token_id=eos_id, eos_token_id=eos_id,
            pad_token_id=pad_id, tie_word_embeddings=True,
        )
    raise ValueError(f"unknown tiny architecture {arch!r}; expected 'gpt2' or 'llama'")


def build_tiny_checkpoint(
    out_dir: str | Path,
    corpus: Iterable[str] = (),
    arch: Literal["gpt2", "llama"] = "gpt2",
    hidden_size: int = 64,
    num_layers: int = 2,
    vocab_size: int = 384,
    seed: int = 0,
) -> Path:
    """Write a random-init causal LM + locally trained tokenizer to `out_dir` and return it."""
    from transformers import AutoModelForCausalLM

    tokenizer = train_tokenizer(corpus, vocab_size)
    config = tiny_model_config(
        arch, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id,
        hidden_size=hidden_size, num_layers=num_layers,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return save_checkpoint(model, tokenizer, out_dir)
