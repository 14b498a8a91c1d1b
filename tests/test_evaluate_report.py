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
