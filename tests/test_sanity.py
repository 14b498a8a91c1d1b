"""LD-Align §5.2 check: Spearman's rho by hand, and the distance-vs-dissimilarity figures."""

from __future__ import annotations

import math

import pytest

from rayalign.sanity import distance_sanity, spearman


def test_spearman_without_ties_is_the_rank_difference_formula():
    a = [0.1, 0.4, 0.2, 0.9, 0.5]
    b = [1.0, 3.0, 5.0, 4.0, 2.0]
    # ranks a: 1 3 2 5 4, ranks b: 1 3 5 4 2; d = 0 0 -3 1 2; rho = 1 - 6*14 / (5*24)
    assert spearman(a, b) == pytest.approx(1 - 6 * 14 / 120, abs=1e-12)
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, [-x for x in a]) == pytest.approx(-1.0)


def test_spearman_ties_share_their_mean_rank():
    # ranks a: 1.5 1.5 3 4; ranks b: 1 2 3 4 -> Pearson of the ranks, by hand:
    # centred a: -1 -1 0.5 1.5 (sum sq 4.5), b: -1.5 -0.5 0.5 1.5 (sum sq 5), cross 4.5
    assert spearman([1, 1, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5), abs=1e-12)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))  # a constant side has no ranking
    assert math.isnan(spearman([1, 2], [1, 2]))


def test_distance_sanity_correlates_distance_with_dissimilarity_to_gold():
    golds = ["the cat sat on the mat"] * 4
    samples = ["the cat sat on the mat", "the cat sat on a rug", "the cat ran", "zebra quantum"]
    # 1 - ROUGE-L rises along the samples; a distance that rises too has rho 1
    assert distance_sanity([0.0, 1.0, 2.0, 3.0], golds, samples)["spearman_rouge"] == \
        pytest.approx(1.0)
    got = distance_sanity([3.0, 2.0, 1.0, 0.0], golds, samples, cosines=[1.0, 0.8, 0.3, 0.0])
    assert got["spearman_rouge"] == pytest.approx(-1.0)
    assert got["spearman_cosine"] == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="equally many"):
        distance_sanity([1.0], golds, samples)
