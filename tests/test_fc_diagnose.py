"""benchmarks/fc_diagnose.py's AUC against scipy's Mann-Whitney U (the same statistic over n_pos x n_neg)."""

import random
import sys
from pathlib import Path

import pytest
from scipy.stats import mannwhitneyu

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from fc_diagnose import auc  # noqa: E402


@pytest.mark.parametrize("seed", range(5))
def test_auc_is_mann_whitney_u_over_the_pairs(seed):
    rng = random.Random(seed)
    scores = [rng.choice([-1.0, 0.0, 0.5, 2.0]) + rng.random() * (seed % 2) for _ in range(40)]  # ties when seed even
    labels = [rng.random() < 0.4 for _ in scores]
    pos = [s for s, y in zip(scores, labels) if y]
    neg = [s for s, y in zip(scores, labels) if not y]
    u = mannwhitneyu(pos, neg).statistic
    assert auc(scores, labels) == pytest.approx(u / (len(pos) * len(neg)))


def test_auc_bounds():
    assert auc([3.0, 2.0, 1.0, 0.0], [True, True, False, False]) == 1.0
    assert auc([0.0, 1.0], [True, False]) == 0.0
    assert auc([1.0, 1.0], [True, False]) == 0.5
