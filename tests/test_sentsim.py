"""Sentence-embedding cosine on a tiny locally built BERT (never a download)."""

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from rayalign.sentsim import SentenceEncoder, sentence_cosine

PREDS = ["the cat sat on the mat", "hello", "what time is it", "ok ok ok"]
GOLDS = ["the cat is on the mat", "hello world", "the dog ran", "ok ok ok"]


def _by_hand(path, text):
    """Mean over the tokens of one unpadded text of the last hidden state, numpy."""
    tok, model = AutoTokenizer.from_pretrained(path), AutoModel.from_pretrained(path).eval()
    with torch.no_grad():
        hidden = model(**tok(text, return_tensors="pt")).last_hidden_state[0].numpy()
    return hidden.mean(0)


def test_mean_pooling_cosine_by_hand(tiny_bert_encoder):
    """cos(a, b) = a.b / (|a| |b|) of per-text means; the batched, padded call must agree to
    float32 round-off (padding changes the summation order: ~1e-6)."""
    got = sentence_cosine(PREDS, GOLDS, tiny_bert_encoder, batch_size=3)
    want = []
    for p, g in zip(PREDS, GOLDS):
        a, b = _by_hand(tiny_bert_encoder, p), _by_hand(tiny_bert_encoder, g)
        want.append(float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    assert got == pytest.approx(want, abs=1e-5)
    assert got[3] == pytest.approx(1.0, abs=1e-6)  # identical texts
    assert max(got[:3]) < 0.9999  # and the others are not trivially 1


def test_matches_sentence_transformers(tiny_bert_encoder):
    """sentence-transformers (an independent implementation) mean-pools a plain encoder too."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(tiny_bert_encoder, device="cpu")
    ours = SentenceEncoder(tiny_bert_encoder).encode(PREDS, batch_size=2).numpy()
    np.testing.assert_allclose(ours, st.encode(PREDS, batch_size=4), atol=1e-5)


def test_refuses_other_pooling_and_missing_model(tiny_bert_encoder, tmp_path):
    cls = tmp_path / "cls"
    shutil.copytree(tiny_bert_encoder, cls)
    (cls / "1_Pooling").mkdir()
    (cls / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    with pytest.raises(ValueError, match="only mean pooling.*pooling_mode_cls_token"):
        SentenceEncoder(cls)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SentenceEncoder(tmp_path / "nothing")
