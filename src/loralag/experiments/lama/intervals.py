"""How far the LAMA bench's normalised scores would move with other questions of the same kind: a percentile
bootstrap over each family's questions.

A run asks 200 questions per family (12 at the small size), so a method's % of the Oracle is itself an estimate;
whether 91.97 misses a target of 92 is a question of its spread. Each resample draws every dataset's questions
with replacement (stratified: each family keeps its size) and uses the *same* draw for every method (paired: the
Oracle in the denominator, the floor and the method all see the same questions), then recomputes the normalised
scores and gain fractions with the bench's own `normalise` and `gain_fractions`. Percentile intervals, not BCa:
scipy.stats.bootstrap would give BCa, but it cannot stratify the draw by family while pairing methods, and the
statistic here is a mean of ratios over families, which that API does not express.
"""

from __future__ import annotations

import numpy as np

from loralag.errors import LoralagError
from loralag.experiments.lama.report import (
    TARGETS,
    _fmt,
    comparisons,
    gain_fractions,
    headline_lag,
    headline_prefix,
    holds,
    md_table,
    normalise,
)

RESAMPLES, LEVEL, SEED = 2000, 95.0, 0


def verdict_arrays(results: dict) -> dict[str, dict[str, np.ndarray]]:
    """{method: {dataset: bool array}} from results.json's `right` ("1"/"0" per question, question_ids' order)."""
    right = results.get("right")
    if not right:
        raise LoralagError("results.json has no per-question verdicts (`right`): the run predates them")
    out = {
        m: {d: np.frombuffer(bits.encode(), dtype=np.uint8) == ord("1") for d, bits in per.items()}
        for m, per in right.items()
    }
    sizes = {d: len(v) for d, v in out.get("oracle", {}).items()}
    for m, per in out.items():
        for d, v in per.items():
            if d in sizes and len(v) != sizes[d]:
                raise LoralagError(f"results.json: {m} has {len(v)} verdicts on {d}, the oracle {sizes[d]}")
    return out


def score_intervals(results: dict, resamples: int = RESAMPLES, level: float = LEVEL, seed: int = SEED) -> dict:
    """Per method: its normalised AVG and AVG gain fraction (the run's own, from the verdicts) and their `level`%
    percentile intervals over `resamples` stratified, paired resamples of the questions; and, per target the
    issue sets (report.TARGETS), the share of resamples in which the headline method meets it. Resamples in which
    the Oracle scores 0 on a dataset it is normalised by are dropped and counted (a few questions per family)."""
    verdicts = verdict_arrays(results)
    if "oracle" not in verdicts:
        raise LoralagError("results.json has no oracle verdicts: nothing to normalise by")
    left_out = set(results.get("not_normalised") or ())
    datasets = [d for d in verdicts["oracle"] if d not in left_out]
    rng = np.random.default_rng(seed)
    sizes = {d: len(verdicts["oracle"][d]) for d in datasets}
    draws = {d: rng.integers(0, n, size=(resamples, n)) for d, n in sizes.items()}
    # (resamples,) % right per method and dataset under each draw
    means = {m: {d: 100.0 * v[d][draws[d]].mean(axis=1) for d in datasets if d in v} for m, v in verdicts.items()}
    # per kept draw (aligned); a gain fraction is None in a draw where the floor reaches the Oracle (few questions)
    avg: dict[str, list[float]] = {m: [] for m in means}
    gain: dict[str, list[float | None]] = {m: [] for m in means}
    dropped = 0
    for b in range(resamples):
        if any(means["oracle"][d][b] == 0 for d in datasets):
            dropped += 1
            continue
        table = {m: {d: (float(x[b]), sizes[d]) for d, x in per.items()} for m, per in means.items()}
        norm, _ = normalise(table)
        g = gain_fractions(norm)
        for m in means:
            if (a := norm.get(m, {}).get("AVG")) is not None:
                avg[m].append(a)
                gain[m].append(g.get(m, {}).get("AVG"))
    tail = (100.0 - level) / 2

    def interval(values):
        values = [v for v in values if v is not None]
        return [float(q) for q in np.percentile(values, [tail, 100.0 - tail])] if values else None

    # the run's own figures: the same verdicts, normalised by the run (results.json's `normalised` and `gain`)
    point, point_gain = results.get("normalised") or {}, results.get("gain") or {}
    methods = {
        m: {
            "AVG": point.get(m, {}).get("AVG"),
            "AVG_interval": interval(avg[m]),
            "gain": point_gain.get(m, {}).get("AVG"),
            "gain_interval": interval(gain[m]),
        }
        for m in means
    }
    targets = {}
    for key, name in (("lag", headline_lag(results)), ("lag-prefix", headline_prefix(results))):
        if name and avg.get(name):
            want_avg, want_gain = TARGETS[key]  # a draw without a gain fraction does not meet it
            met = [
                a >= want_avg and g is not None and g >= want_gain for a, g in zip(avg[name], gain[name], strict=True)
            ]
            targets[key] = {"method": name, "share_met": float(np.mean(met))}
    # the two comparisons, as the share of resamples in which they hold (paired: the same questions)
    for key, (a, b, strict) in comparisons(results).items():
        if avg.get(a) and avg.get(b):
            held = [holds(x, y, strict) for x, y in zip(avg[a], avg[b], strict=True)]
            targets[key] = {"method": a, "share_met": float(np.mean(held))}
    return {
        "resamples": resamples,
        "dropped": dropped,
        "level": level,
        "seed": seed,
        "methods": methods,
        "targets": targets,
    }


def intervals_markdown(iv: dict) -> list[str]:
    """The intervals as a markdown section (results.md and benchmarks/score_intervals.py)."""

    def span(x):
        return "—" if x is None else f"{x[0]:.1f} – {x[1]:.1f}"

    lines = [
        f"{iv['level']:.0f}% percentile intervals over {iv['resamples'] - iv['dropped']} resamples of the questions "
        f"(each family's drawn with replacement, the same draw for every method; seed {iv['seed']}"
        + (f"; {iv['dropped']} dropped, the Oracle at 0 on a dataset" if iv["dropped"] else "")
        + ").",
        "",
    ]
    lines += md_table(
        ["method", "% of Oracle (AVG)", "interval", "gain fraction", "interval"],
        [
            [m, _fmt(r["AVG"]), span(r["AVG_interval"]), _fmt(r["gain"]), span(r["gain_interval"])]
            for m, r in iv["methods"].items()
        ],
    )
    if iv["targets"]:
        lines.append("")
    for key, t in iv["targets"].items():
        if key in TARGETS:
            want_avg, want_gain = TARGETS[key]
            what = f"meets the {key} target (≥ {want_avg:.0f}% of the Oracle, gain ≥ {want_gain:.0f}%)"
        else:
            what = f"holds {key!r}"
        lines.append(f"- {t['method']} {what} in {100 * t['share_met']:.1f}% of the resamples.")
    return lines


# -- across trainings ------------------------------------------------------------------------------------------
# What may differ between runs that are trainings of one setting: the task adapters' seed and the methods run.
SEED_VARIANT = ("task_seed", "methods")


def across_seeds(runs: dict[str, dict], level: float = LEVEL) -> dict:
    """The spread of each method's % of the Oracle (AVG) and gain fraction over `runs` ({name: results.json}), runs
    of one setting that differ only in the task adapters' seed: per method, the figures per run, their mean and
    sample standard deviation, and the `level`% t-interval of the mean (the seed's spread, which the question
    bootstrap above does not see). Methods missing from a run are left out and named. Needs scipy."""
    from scipy import stats

    if len(runs) < 2:
        raise LoralagError(f"across trainings needs at least two runs, got {len(runs)}")
    (first, ref), *rest = runs.items()
    for name, results in rest:
        for key in ("size", "model", "data_dir", "n_knowledge_adapters"):
            if results["settings"].get(key) != ref["settings"].get(key):
                raise LoralagError(f"{name}: settings.{key} differs from {first}'s: not trainings of one setting")
        a, b = ref["settings"]["config"], results["settings"]["config"]
        for key in sorted((set(a) | set(b)) - set(SEED_VARIANT)):
            if a.get(key) != b.get(key):
                raise LoralagError(
                    f"{name}: config.{key} is {b.get(key)!r}, {first}'s {a.get(key)!r}: not trainings of one setting"
                )
    for name, results in runs.items():
        if "error" in (results.get("normalised") or {"error": True}):
            raise LoralagError(f"{name}: results.json has no normalised scores")
    seeds = [r["settings"]["config"].get("task_seed") for r in runs.values()]
    everywhere = set.intersection(*(set(r["normalised"]) for r in runs.values()))
    methods = {}
    for m in (m for m in ref["normalised"] if m in everywhere):
        out = {}
        for key, source in (("AVG", "normalised"), ("gain", "gain")):
            values = [(r.get(source) or {}).get(m, {}).get("AVG") for r in runs.values()]
            if any(v is None for v in values):
                out[key] = None
                continue
            mean, sd = float(np.mean(values)), float(np.std(values, ddof=1))
            half = float(stats.t.ppf(0.5 + level / 200, len(values) - 1)) * sd / np.sqrt(len(values))
            out[key] = {"runs": values, "mean": mean, "sd": sd, "interval": [mean - half, mean + half]}
        # per family too: a family at chance (fact checking here) can carry most of the AVG's spread
        per = [r["normalised"][m] for r in runs.values()]
        out["families"] = {
            f: {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1))}
            for f in per[0]
            if f != "AVG" and None not in (v := [p.get(f) for p in per])
        }
        if out["AVG"] is not None:
            methods[m] = out
    left_out = sorted(set().union(*(set(r["normalised"]) for r in runs.values())) - everywhere)
    return {"runs": list(runs), "task_seeds": seeds, "level": level, "methods": methods, "left_out": left_out}


def across_seeds_markdown(sp: dict) -> list[str]:
    """across_seeds as a markdown section (benchmarks/score_intervals.py --seeds)."""
    seeds = ", ".join("default" if s is None else str(s) for s in sp["task_seeds"])
    lines = [
        f"{len(sp['runs'])} trainings of the task adapters (task seeds {seeds}), the rest of the setting the same: "
        f"per method the mean over them, the standard deviation of one training, and the {sp['level']:.0f}% "
        "t-interval of the mean.",
        "",
    ]

    def interval(x):
        return f"{_fmt(x['interval'][0])} – {_fmt(x['interval'][1])}"

    rows = []
    for m, r in sp["methods"].items():
        a, g = r["AVG"], r["gain"]
        rows.append(
            [m, " / ".join(_fmt(v) for v in a["runs"]), _fmt(a["mean"]), _fmt(a["sd"]), interval(a)]
            + ([_fmt(g["mean"]), interval(g)] if g else ["—", "—"])
        )
    header = ["method", "% of Oracle (AVG) per training", "mean", "sd", "interval of the mean", "gain, mean"]
    lines += md_table([*header, "interval"], rows)
    families = list(next(iter(sp["methods"].values()), {}).get("families", {}))

    def cell(c):
        return "—" if c is None else f"{_fmt(c['mean'])} ({_fmt(c['sd'])})"

    lines += ["", "Per family (% of the Oracle): mean over the trainings (one training's standard deviation).", ""]
    lines += md_table(
        ["method", *families], [[m, *(cell(r["families"].get(f)) for f in families)] for m, r in sp["methods"].items()]
    )
    if sp["left_out"]:
        lines += ["", "Not in every run, left out: " + ", ".join(sp["left_out"]) + "."]
    return lines
