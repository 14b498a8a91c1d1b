import pytest

from rayalign.evaluate import exact_match, summarize
from rayalign.report import summary_table, write_report


def test_exact_match_ignores_whitespace_only():
    assert exact_match(" 1 2  3", "1 2 3")
    assert not exact_match("1 2 3", "1 2 3 3")


def test_summarize():
    """2 of 4 exact; distances mean (0 + 1 + 2 + 5) / 4 = 2."""
    out = summarize(["1 2", "3", "4 4", "x"], ["1 2", "3 ", "4", "y"], [0.0, 1.0, 2.0, 5.0])
    assert out == {"n": 4, "exact_match": 0.5, "mean_distance": 2.0}
    with pytest.raises(ValueError, match="equally many"):
        summarize(["a"], ["a", "b"])


def test_report_files(tmp_path):
    rows = [{"policy": "theta_0", "eval_exact_match": 0.25, "eval_mean_distance": 1.5},
            {"policy": "theta_1", "eval_exact_match": 0.5, "eval_mean_distance": 1.0,
             "train_loss": 0.6, "train_reward_margin": 0.1, "train_reward_accuracy": 0.75}]
    table = summary_table(rows)
    assert "| theta_0 | 0.2500 | 1.5000 | - | - | - |" in table
    summary = write_report(tmp_path, rows, {"theta_0": [1.0, 2.0], "theta_1": [0.5, 1.5]})
    assert table in summary.read_text()
    for png in ("metrics.png", "distances.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_gold_nll_by_hand(tiny_gpt2):
    """-log p(gold + EOS | prompt) = -sum over response tokens of a full log_softmax of one
    unpadded sequence at a time; batched and padded it must agree to float32 round-off."""
    import torch

    from rayalign.data import encode
    from rayalign.evaluate import gold_nll, nll_per_token
    from rayalign.models import load_model, load_tokenizer

    model, tok = load_model(tiny_gpt2), load_tokenizer(tiny_gpt2)
    prompts, golds = ["sort: 3 1 2 =>", "sort: 9 =>", "hello"], [" 1 2 3", " 9", " world ok"]
    nll, tokens = gold_nll(model, tok, prompts, golds, 64, 128, batch_size=2)
    want_nll, want_tokens = [], []
    for p, g in zip(prompts, golds):
        p_ids, r_ids = encode(tok, p, g, 64, 128)
        ids = torch.tensor([p_ids + r_ids])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0].double(), -1)
        want_nll.append(-sum(logp[len(p_ids) - 1 + i, t].item() for i, t in enumerate(r_ids)))
        want_tokens.append(len(r_ids))
    assert tokens == want_tokens
    assert nll == pytest.approx(want_nll, abs=1e-4)  # float32 logits summed over <= 8 tokens
    assert nll_per_token(nll, tokens) == pytest.approx(sum(want_nll) / sum(want_tokens), abs=1e-4)
    with pytest.raises(ValueError, match="no response tokens"):
        nll_per_token([0.0], [0])
