"""The LAMA bench's score intervals (experiments/lama/intervals.py) against independent references: the binomial
standard error, scipy's own bootstrap, and the probability that a resample leaves the Oracle nothing right."""

import numpy as np
import pytest
from scipy import stats as scipy_stats  # the reference bootstrap (the test extra installs scipy)

from loralag.errors import LoralagError
from loralag.experiments.lama.data import DATASETS, SLOT_FILLING
from loralag.experiments.lama.intervals import across_seeds, across_seeds_markdown, intervals_markdown, score_intervals
from loralag.experiments.lama.report import gain_fractions, normalise


def bits(right: np.ndarray) -> str:
    return "".join("1" if r else "0" for r in right)


def run(verdicts: dict[str, dict[str, np.ndarray]], k: int = 20, n_adapters: int = 200) -> dict:
    """The part of a results.json that score_intervals reads, normalised as the bench does."""
    table = {m: {d: (100.0 * v.mean(), len(v)) for d, v in per.items()} for m, per in verdicts.items()}
    normalised = normalise(table)[0] if "oracle" in verdicts else {}
    return {
        "settings": {"config": {"k": k}, "n_knowledge_adapters": n_adapters},
        "table": {m: {} for m in verdicts},
        "right": {m: {d: bits(v) for d, v in per.items()} for m, per in verdicts.items()},
        "normalised": normalised,
        "gain": gain_fractions(normalised) if normalised else {},
    }


def exactly(n: int, hits: int, rng) -> np.ndarray:
    v = np.zeros(n, dtype=bool)
    v[rng.choice(n, hits, replace=False)] = True
    return v


def test_the_interval_of_one_family_is_scipys_bootstrap_and_the_binomial_spread():
    rng = np.random.default_rng(1)
    n = 200
    method = exactly(n, 150, rng)  # 75% right; the Oracle all right, so % of the Oracle = % right
    iv = score_intervals(run({"oracle": {SLOT_FILLING: np.ones(n, bool)}, "m": {SLOT_FILLING: method}}), 4000)
    r = iv["methods"]["m"]
    assert r["AVG"] == pytest.approx(75.0)
    ref = scipy_stats.bootstrap(
        (100.0 * method,), np.mean, n_resamples=4000, method="percentile", random_state=np.random.default_rng(2)
    ).confidence_interval
    assert r["AVG_interval"][0] == pytest.approx(ref.low, abs=0.8)
    assert r["AVG_interval"][1] == pytest.approx(ref.high, abs=0.8)
    half = 1.96 * 100 * np.sqrt(0.75 * 0.25 / n)  # the normal approximation: 75 ± 6.0
    assert r["AVG_interval"] == pytest.approx([75 - half, 75 + half], abs=0.8)


def test_methods_share_each_draw_so_the_oracle_itself_never_moves_and_a_copy_of_it_neither():
    rng = np.random.default_rng(3)
    oracle = {d: exactly(200, 120, rng) for d in DATASETS}
    base = {d: np.zeros(200, bool) for d in DATASETS}
    iv = score_intervals(run({"base": base, "oracle": oracle, "copy": dict(oracle)}), 500)
    for m in ("oracle", "copy"):
        assert iv["methods"][m]["AVG_interval"] == pytest.approx([100.0, 100.0])
        assert iv["methods"][m]["gain_interval"] == pytest.approx([100.0, 100.0])
    # Four families of 200, each at 60% of an Oracle that is itself drawn: the AVG's spread is the four ratios'
    half_way = {d: oracle[d] & exactly(200, 100, rng) for d in DATASETS}  # right where the Oracle is, half as often
    iv = score_intervals(run({"base": base, "oracle": oracle, "half": half_way}), 2000)
    lo, hi = iv["methods"]["half"]["AVG_interval"]
    assert lo < iv["methods"]["half"]["AVG"] < hi
    # the ratio's own spread, by the delta method: p(1-p)/n_oracle per family with p = hits/oracle hits, / 4 families
    p = np.array([half_way[d].sum() / oracle[d].sum() for d in DATASETS])
    sd = 100 * np.sqrt(np.sum(p * (1 - p) / np.array([oracle[d].sum() for d in DATASETS]))) / len(DATASETS)
    assert (hi - lo) / 2 == pytest.approx(1.96 * sd, rel=0.15)


def test_targets_are_shares_of_the_resamples():
    rng = np.random.default_rng(4)
    oracle = {d: np.ones(200, bool) for d in DATASETS}
    base = {d: np.zeros(200, bool) for d in DATASETS}
    iv = score_intervals(
        run(
            {
                "base": base,
                "oracle": oracle,
                "lag@20": {d: exactly(200, 196, rng) for d in DATASETS},  # 98%: above 92 in every draw
                "lag-prefix@20": {d: exactly(200, 160, rng) for d in DATASETS},  # 80%: never 97
                "arrow": {d: exactly(200, 100, rng) for d in DATASETS},
                "r-lag": {d: exactly(200, 197, rng) for d in DATASETS},
            }
        ),
        1000,
    )
    t = iv["targets"]
    assert t["lag"] == {"method": "lag@20", "share_met": 1.0}
    assert t["lag-prefix"]["share_met"] == 0.0
    assert t["lag above arrow"]["share_met"] == 1.0
    assert 0.0 < t["r-lag >= lag"]["share_met"] < 1.0  # 98.5 against 98.0: either, by draw
    text = "\n".join(intervals_markdown(iv))
    assert "| lag@20 | 98.0 |" in text and "in 100.0% of the resamples" in text


def test_draws_that_leave_the_oracle_nothing_right_are_dropped_and_counted():
    oracle = np.array([True, False, False])  # a resample misses the one right answer with p = (2/3)^3
    iv = score_intervals(run({"oracle": {SLOT_FILLING: oracle}, "m": {SLOT_FILLING: oracle}}), 4000)
    assert iv["dropped"] / 4000 == pytest.approx((2 / 3) ** 3, abs=0.03)
    assert iv["methods"]["m"]["AVG_interval"] == pytest.approx([100.0, 100.0])
    assert "dropped, the Oracle at 0" in "\n".join(intervals_markdown(iv))


def test_draws_where_the_floor_reaches_the_oracle_have_no_gain_fraction_and_do_not_meet_a_target():
    # a draw without question 1 leaves the base model level with the Oracle: p = (2/3)^3 of the draws with any
    # right answer, (1/3)^3 of them also without a right answer for the Oracle (dropped)
    oracle, base = np.array([True, True, False]), np.array([True, False, False])
    lag = np.array([True, True, False])  # the Oracle's answers: 100% in every draw
    iv = score_intervals(
        run({"base": {SLOT_FILLING: base}, "oracle": {SLOT_FILLING: oracle}, "lag@20": {SLOT_FILLING: lag}}), 4000
    )
    kept = 4000 - iv["dropped"]
    assert iv["methods"]["lag@20"]["AVG_interval"] == pytest.approx([100.0, 100.0])
    assert iv["methods"]["lag@20"]["gain_interval"] == pytest.approx([100.0, 100.0])  # where it is defined
    level = ((2 / 3) ** 3 - (1 / 3) ** 3) / (1 - (1 / 3) ** 3)  # of the kept draws, those without question 1
    assert 1 - iv["targets"]["lag"]["share_met"] == pytest.approx(level, abs=0.03)
    assert kept > 0


def test_runs_without_verdicts_or_with_mismatched_ones_are_refused_by_name():
    with pytest.raises(LoralagError, match="no per-question verdicts"):
        score_intervals({"settings": {}, "table": {}})
    bad = run({"oracle": {SLOT_FILLING: np.ones(5, bool)}, "lag@20": {SLOT_FILLING: np.ones(4, bool)}})
    with pytest.raises(LoralagError, match="lag@20 has 4 verdicts on lama_slot_filling, the oracle 5"):
        score_intervals(bad)
    with pytest.raises(LoralagError, match="no oracle"):
        score_intervals(run({"m": {SLOT_FILLING: np.ones(5, bool)}}))


def trained(seed, avg: dict[str, float], **config) -> dict:
    """The part of a results.json that across_seeds reads: one training's normalised AVG per method."""
    # two families: one that follows the AVG, one that swings by the run (a family at chance)
    normalised = {m: {"AVG": a, "qa": a - 1.0, "fact_checking": 100.0 + 5.0 * (-1) ** seed} for m, a in avg.items()}
    return {
        "settings": {
            "size": "full",
            "model": "default",
            "data_dir": "d",
            "n_knowledge_adapters": 200,
            "config": {"k": 20, "task_seed": seed, "methods": None, **config},
        },
        "normalised": normalised,
        "gain": gain_fractions(normalised),
    }


def test_across_seeds_is_the_t_interval_of_the_mean_over_trainings():
    lag = [91.97, 88.9, 93.0, 90.2]
    runs = {
        f"seed{s}": trained(s, {"base": 8.6, "oracle": 100.0, "lag@20": v, **({"rag": 85.0} if s else {})})
        for s, v in enumerate(lag)
    }
    sp = across_seeds(runs)
    r = sp["methods"]["lag@20"]["AVG"]
    assert r["runs"] == lag and r["mean"] == pytest.approx(np.mean(lag))
    assert r["sd"] == pytest.approx(np.std(lag, ddof=1))
    ci = scipy_stats.ttest_1samp(lag, 0.0).confidence_interval(0.95)  # scipy's own route to the same interval
    assert r["interval"] == pytest.approx([ci.low, ci.high])
    gains = [(v - 8.6) / (100 - 8.6) * 100 for v in lag]  # the floor is the same in every run here
    assert sp["methods"]["lag@20"]["gain"]["mean"] == pytest.approx(np.mean(gains))
    assert sp["methods"]["oracle"]["AVG"]["sd"] == 0.0
    assert "rag" not in sp["methods"] and sp["left_out"] == ["rag"]  # seed 0 did not run it
    assert sp["task_seeds"] == [0, 1, 2, 3]
    fam = sp["methods"]["lag@20"]["families"]
    assert fam["qa"]["mean"] == pytest.approx(np.mean(lag) - 1.0) and fam["qa"]["sd"] == pytest.approx(r["sd"])
    swing = fam["fact_checking"]
    assert swing["mean"] == 100.0 and swing["sd"] == pytest.approx(np.std([5, -5] * 2, ddof=1))
    text = "\n".join(across_seeds_markdown(sp))
    assert "| method | qa | fact_checking |" in text and f"| lag@20 | 90.0 ({np.std(lag, ddof=1):.1f}) |" in text
    assert "| lag@20 | 92.0 / 88.9 / 93.0 / 90.2 | 91.0 |" in text and "left out: rag" in text


def test_across_seeds_refuses_runs_of_other_settings():
    a = trained(0, {"oracle": 100.0, "lag@20": 92.0})
    with pytest.raises(LoralagError, match="at least two runs"):
        across_seeds({"a": a})
    b = trained(1, {"oracle": 100.0, "lag@20": 90.0}, task_freeze_a=False)
    with pytest.raises(LoralagError, match=r"^b: config\.task_freeze_a is False, a's None"):
        across_seeds({"a": a, "b": b})
    c = trained(1, {"oracle": 100.0, "lag@20": 90.0})
    c["settings"]["model"] = "gemma"
    with pytest.raises(LoralagError, match=r"^c: settings\.model differs from a's"):
        across_seeds({"a": a, "c": c})
