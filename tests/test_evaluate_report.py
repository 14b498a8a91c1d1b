import pytest

from rayalign.evaluate import (
    edit_distance,
    exact_match,
    guide_correlations,
    position_accuracy,
    spearman,
    summarize,
)
from rayalign.report import gold_row, sample_rows, summary_table, training_table, write_report


def test_exact_match_ignores_whitespace_only():
    assert exact_match(" 1 2  3", "1 2 3")
    assert not exact_match("1 2 3", "1 2 3 3")


@pytest.mark.parametrize("prediction, accuracy, distance", [
    (" 1 2 3 4", 1.0, 0),   # whitespace does not count
    ("1 2 5 4", 0.75, 1),   # one digit replaced: 3/4 right, one substitution
    ("1 2 4", 0.5, 1),      # one dropped: positions 1, 2 right; one deletion
    ("1 2", 0.5, 2),        # the tail missing: two deletions
    ("1 2 3 4 4", 1.0, 1),  # an extra word: free for the position score, one insertion
    ("1 3 2 4", 0.5, 2),    # neighbours swapped: two substitutions
    ("4 3 2 1", 0.0, 4),    # reversed: nothing in place
    ("", 0.0, 4),           # empty: four insertions
])
def test_graded_metrics_by_hand(prediction, accuracy, distance):
    """position_accuracy and word-level edit_distance against gold 1 2 3 4, by hand."""
    assert position_accuracy(prediction, "1 2 3 4") == accuracy
    assert edit_distance(prediction, "1 2 3 4") == distance


def test_graded_metrics_edge_cases():
    """Empty gold: accuracy 1 only for an empty answer, distance = the answer's length;
    kitten/sitting as letters-as-words is the textbook Levenshtein 3."""
    assert position_accuracy("", "") == 1.0 and position_accuracy("1", "") == 0.0
    assert edit_distance("1 2 3 4", "") == 4
    assert edit_distance(" ".join("kitten"), " ".join("sitting")) == 3


SCORED = {  # four held-out rows of one policy, as pipelines/evaluate.py writes them
    "row": [0, 1, 2, 3], "prompt": ["p0", "p1", "p2", "p3"],
    "gold": ["1 2", "3 ", "4", "y"], "sample": ["1 2", "3", "4 4", "ok ok ok ok ok ok"],
    "sample_tokens": [2, 1, 2, 6], "truncated": [False, False, False, True],
    "distance": [0.0, 1.0, 2.0, 5.0], "gold_nll": [1.0, 2.0, 3.0, 6.0], "gold_tokens": [3, 2, 2, 5],
    "rouge_l": [1.0, 1.0, 2 / 3, 0.0], "cosine": [1.0, 0.5, 0.25, 0.25],
    "reward": [1.0, 2.0, 0.0, -1.0],
}


def test_summarize():
    """2 of 4 exact; distance mean (0+1+2+5)/4 = 2; gold NLL (1+2+3+6)/(3+2+2+5) = 1 per
    token; length (2+1+2+6)/4 = 2.75, 1 of 4 cut; words 1 2 | 3 | 4 4 | ok x6: distinct-1
    = {1,2,3,4,ok} 5/11, bigrams (1 2)(4 4)(ok ok)x5 -> 3/7; one loop (ok x6) -> 0.25; no
    duplicate answers; position accuracy 1, 1, 1 (the extra 4 is free), 0 -> 0.75; word edit
    distance 0, 0, 1, 6 -> 1.75; ROUGE-L mean (1+1+2/3+0)/4 = 2/3; cosine mean 0.5; reward mean 0.5.
    Against a baseline with rewards [1, 3, -1, -1] and answers equal on row 3: tie, loss,
    win, tie (same answer) -> (0.5+0+1+0.5)/4 = 0.5."""
    baseline = {**SCORED, "reward": [1.0, 3.0, -1.0, -1.0]}
    out = summarize(SCORED, baseline)
    assert out == pytest.approx({
        "n": 4, "exact_match": 0.5, "position_accuracy": 0.75, "edit_distance": 1.75,
        "mean_distance": 2.0, "gold_nll": 1.0, "mean_length": 2.75,
        "truncated_share": 0.25, "distinct_1": 5 / 11, "distinct_2": 3 / 7, "loop_share": 0.25,
        "duplicate_share": 0.0, "rouge_l": 2 / 3, "cosine": 0.5, "reward": 0.5, "win_rate": 0.5,
    }, abs=1e-12)
    unmeasured = {**SCORED, "distance": [None] * 4, "cosine": [None] * 4, "reward": [None] * 4}
    assert set(summarize(unmeasured)) == set(out) - {"mean_distance", "cosine", "reward",
                                                     "win_rate"}
    with pytest.raises(ValueError, match="other prompts"):
        summarize(SCORED, {**baseline, "row": [0, 1, 2, 4]})
    with pytest.raises(ValueError, match="equally many"):
        summarize({**SCORED, "gold": ["a"]})


def test_spearman_and_guide_correlations():
    """Ranks of s = [0, 1, 2, 5] and 1 - cosine = [0, .5, .75, .75] (ties share rank 3.5):
    [1, 2, 3, 4] vs [1, 2, 3.5, 3.5]: deviations from 2.5 give covariance sum 4.5 and squares
    5 and 4.5, Pearson 4.5 / sqrt(5 * 4.5) = 0.9487.
    1 - ROUGE-L = [0, 0, 1/3, 1]: ranks [1.5, 1.5, 3, 4], Pearson 4.5 / sqrt(5 * 4.5) = 0.9487."""
    corr = guide_correlations({"theta_0": SCORED, "theta_1": {**SCORED, "distance": [None] * 4}})
    assert corr == {("theta_0", "cosine"): (pytest.approx(4.5 / 22.5 ** 0.5), 4),
                    ("theta_0", "rouge_l"): (pytest.approx(4.5 / 22.5 ** 0.5), 4)}
    assert spearman([1, 1, 1], [1, 2, 3]) is None


def test_report_files(tmp_path):
    rows = [{"policy": "theta_0", "eval_exact_match": 0.25, "eval_mean_distance": 1.5},
            {"policy": "theta_1", "eval_exact_match": 0.5, "eval_mean_distance": 1.0,
             "train_loss": 0.6, "train_reward_margin": 0.1, "train_reward_accuracy": 0.75}]
    assert summary_table(rows).splitlines()[:3] == [
        "| policy | exact match | mean distance |", "|---|---|---|", "| theta_0 | 0.2500 | 1.5000 |"]
    assert training_table(rows).splitlines()[2] == "| theta_1 | 0.6000 | 0.1000 | 0.7500 |"
    scored = {"theta_0": SCORED, "theta_1": {**SCORED, "sample": ["a", "b", "c", "d\ne"]}}
    curves = {"sft": [{"step": 1.0, "loss": 2.0}, {"step": 2.0, "loss": 1.5}],
              "iter_000": [{"step": 1.0, "loss": 0.69, "margin": 0.0, "accuracy": 0.5}]}
    summary, corr = write_report(tmp_path, rows, scored, curves, k=2)
    text = summary.read_text()
    assert summary_table([*rows, gold_row(SCORED)]) in text
    # gold reference row: "1 2 | 3 | 4 | y" has distinct-1 5/5, distinct-2 1/1 (one bigram),
    # no loops, no duplicates; the theta rows here carry no text statistics
    assert "| gold | - | 1.0000 | 1.0000 | 0.0000 | 0.0000 | - |" in text
    # k = 2 prompts (rows 0 and 2), each with gold and every theta's answer, multi-line quoted
    assert text.count("### Prompt") == 2 and "(held-out row 2)" in text
    assert "**theta_1**\n\n> c" in text and "> d\n> e" not in text  # row 3 is not shown
    assert corr == {"spearman_theta_0_cosine": pytest.approx(0.9487, abs=1e-4),
                    "spearman_theta_0_rouge_l": pytest.approx(0.9487, abs=1e-4),
                    "spearman_theta_1_cosine": pytest.approx(0.9487, abs=1e-4),
                    "spearman_theta_1_rouge_l": pytest.approx(0.9487, abs=1e-4)}
    for png in ("metrics.png", "distances.png", "correlation.png", "training.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"({png})" in text


def test_sample_rows_spread_evenly():
    assert sample_rows(200, 3) == [0, 66, 133]
    assert sample_rows(2, 5) == [0, 1]
    assert sample_rows(10, 0) == []


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
