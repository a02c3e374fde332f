"""Benchmark data and scoring: KILT, NQ-open, FEVER and LAMA T-REx readers; the KILT downstream metrics.

Readers return `Example` records. The metrics follow the official KILT scorer
(github.com/facebookresearch/KILT, `kilt/eval_downstream.py`) function by function:

* `normalize_answer`    == `normalize_answer` (lower case, drop ASCII punctuation, drop a/an/the, squeeze spaces)
* `exact_match_score`   == `_exact_match_score`
* `f1_score`            == `_f1_score` (token F1 on normalised tokens, 0 when nothing overlaps)
* `rougel_score`        == `_rougel_score`, i.e. the `rouge` package's (pltrdy, 1.0.x) ROUGE-L "f" with no
                           normalisation: sentences split on ".", words split on spaces, *distinct* words counted
                           (its `exclusive=True` sets), union-LCS over sentence pairs, F = 2PR/(P+R+1e-8);
                           0.0 when the package would raise ValueError (a side with no sentence)
* `strict_accuracy`     == the scorer's "accuracy": the stripped prediction is one of the stripped gold strings
                           (no normalisation at all)
* `metric_max_over_ground_truths` == `_metric_max_over_ground_truths`
* `score_dataset`       == `_calculate_metrics` (downstream part): every gold record counts, an empty prediction
                           scores 0 on every metric, gold answers are the stripped non-empty `output[].answer`s.
"""

from __future__ import annotations

import json
import math
import os
import re
import string
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from loralag.errors import LoralagError

__all__ = [
    "Example",
    "KILT_TASKS",
    "TASK_ALIASES",
    "PRIMARY_METRIC",
    "KILT_FAMILIES",
    "LAMA_FAMILIES",
    "FEVER_LABELS",
    "infer_task",
    "canonical_task",
    "read_kilt",
    "read_nq_open",
    "read_fever",
    "read_lama",
    "read_lama_relations",
    "normalize_answer",
    "exact_match_score",
    "f1_score",
    "rougel_score",
    "strict_accuracy",
    "metric_max_over_ground_truths",
    "primary_metric",
    "score_dataset",
    "normalised_scores",
    "write_kilt_predictions",
    "read_kilt_predictions",
]


# --------------------------------------------------------------------------------------------------------------
# Records and task names


@dataclass
class Example:
    """One benchmark record.

    id: unique within its file (str). input: the query, claim, dialogue or subject. answers: the gold strings
    (stripped, non-empty, deduplicated, file order). provenance: Wikipedia titles of the gold evidence.
    task: canonical task name (see KILT_TASKS; "lama" for LAMA) or None when unknown. raw: the parsed line.
    """

    id: str
    input: str
    answers: list[str]
    provenance: list[str] = field(default_factory=list)
    task: str | None = None
    raw: dict = field(default_factory=dict, repr=False, compare=False)


# the names KILT gives its files: {task}-{split}-kilt.jsonl
KILT_TASKS = (
    "fever",
    "aidayago2",
    "wned",
    "cweb",
    "trex",
    "structured_zeroshot",
    "nq",
    "hotpotqa",
    "triviaqa",
    "eli5",
    "wow",
)

TASK_ALIASES = {
    "zsre": "structured_zeroshot",
    "zero_shot_re": "structured_zeroshot",
    "zeroshot_re": "structured_zeroshot",
    "aida": "aidayago2",
    "ay2": "aidayago2",
    "wned-wiki": "wned",
    "wnedwiki": "wned",
    "wnwi": "wned",
    "wned-cweb": "cweb",
    "wnedcweb": "cweb",
    "wncw": "cweb",
    "t-rex": "trex",
    "hotpot": "hotpotqa",
    "hopo": "hotpotqa",
    "tqa": "triviaqa",
    "trivia": "triviaqa",
    "wizard_of_wikipedia": "wow",
    "nq-open": "nq",
    "nq_open": "nq",
    "natural_questions": "nq",
}

# tried in this order against the file name, so that e.g. "wned-cweb" is cweb and not wned
_FILENAME_PATTERNS = [
    ("structured_zeroshot", r"structured_zeroshot|zero_?shot_?re|zsre"),
    ("aidayago2", r"aidayago2|aida"),
    ("cweb", r"cweb"),
    ("wned", r"wned"),
    ("trex", r"t-?rex"),
    ("fever", r"fever"),
    ("hotpotqa", r"hotpot(qa)?"),
    ("triviaqa", r"trivia(qa)?"),
    ("eli5", r"eli5"),
    ("wow", r"wow|wizard"),
    ("nq", r"nq|natural_questions"),
]

# Primary metric of each KILT dataset, as specified for this project (see score_dataset's `metric`)
PRIMARY_METRIC = {
    "fever": "accuracy",
    "aidayago2": "accuracy",
    "wned": "accuracy",
    "cweb": "accuracy",
    "trex": "em",
    "structured_zeroshot": "em",
    "nq": "em",
    "hotpotqa": "em",
    "triviaqa": "em",
    "eli5": "rougel",
    "wow": "rougel",
}

# Task families of the paper's normalised score (its Tables 4 and 6)
KILT_FAMILIES: dict[str, tuple[str, ...]] = {
    "fact_checking": ("fever",),
    "entity_linking": ("aidayago2", "wned", "cweb"),
    "slot_filling": ("trex", "structured_zeroshot"),
    "open_domain_qa": ("nq", "hotpotqa", "triviaqa", "eli5"),
    "dialogue": ("wow",),
}

# The LAMA benchmark's four families; the dataset names are the keys a results table must use for them
LAMA_FAMILIES: dict[str, tuple[str, ...]] = {
    "slot_filling": ("lama_slot_filling",),
    "qa": ("lama_qa",),
    "fact_checking": ("lama_fact_checking",),
    "entity_linking": ("lama_entity_linking",),
}

FEVER_LABELS = ("SUPPORTS", "REFUTES", "NOT ENOUGH INFO")


def canonical_task(name: str) -> str:
    """The canonical KILT task name for a name or alias ("zsRE" -> "structured_zeroshot"); LoralagError if unknown."""
    key = str(name).strip().lower()
    if key in KILT_TASKS:
        return key
    if key in TASK_ALIASES:
        return TASK_ALIASES[key]
    raise LoralagError(
        f"unknown KILT task {name!r}; known: {', '.join(KILT_TASKS)} (aliases: {', '.join(TASK_ALIASES)})"
    )


def infer_task(path: str | os.PathLike) -> str | None:
    """The KILT task a file holds, from its name (e.g. "structured_zeroshot-dev-kilt.jsonl" -> zsRE), else None."""
    name = Path(path).name.lower()
    for task, pattern in _FILENAME_PATTERNS:
        if re.search(rf"(?<![a-z0-9])(?:{pattern})(?![a-z])", name):
            return task
    return None


# --------------------------------------------------------------------------------------------------------------
# Readers


def _json_lines(path: str | os.PathLike) -> Iterator[tuple[int, dict]]:
    """(line number, object) for every non-blank line; LoralagError naming file and line on any bad line."""
    p = Path(path)
    if not p.is_file():
        raise LoralagError(f"{p}: no such file")
    with open(p, encoding="utf-8") as fh:
        lineno = 0
        while True:
            try:
                line = fh.readline()
            except UnicodeDecodeError as e:
                raise LoralagError(f"{p}:{lineno + 1}: not UTF-8 text ({e})") from None
            if not line:
                return
            lineno += 1
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise LoralagError(f"{p}:{lineno}: not valid JSON ({e.msg} at column {e.colno})") from None
            if not isinstance(obj, dict):
                raise LoralagError(f"{p}:{lineno}: expected a JSON object, got {type(obj).__name__}")
            yield lineno, obj


def _bad(path, lineno, msg) -> LoralagError:
    return LoralagError(f"{path}:{lineno}: {msg}")


def _req_str(obj: dict, key: str, path, lineno) -> str:
    if key not in obj:
        raise _bad(path, lineno, f"missing field {key!r}")
    val = obj[key]
    if not isinstance(val, str):
        raise _bad(path, lineno, f"field {key!r} must be a string, got {type(val).__name__}")
    return val


def _dedup(items: Iterable[str]) -> list[str]:
    seen, out = set(), []
    for s in items:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


def _check_unique(examples: list[Example], path):
    seen = set()
    for ex in examples:
        if ex.id in seen:
            raise LoralagError(f"{path}: id {ex.id!r} appears more than once")
        seen.add(ex.id)


def read_kilt(path: str | os.PathLike, task: str | None = None) -> list[Example]:
    """Read a KILT jsonl file (`id`, `input`, `output[].answer`, `output[].provenance[].title`).

    Outputs without an answer (provenance-only entries) add no answer, as in the official scorer's
    `get_gold_answers`; a record without `output` (a test-input file) has no answers. `input` may be absent
    (KILT ships TriviaQA without its questions), then it is "". task: canonical name or alias; default from
    the file name (None if it says nothing).
    """
    task = canonical_task(task) if task is not None else infer_task(path)
    out: list[Example] = []
    for lineno, obj in _json_lines(path):
        if "id" not in obj or not isinstance(obj["id"], (str, int)) or isinstance(obj["id"], bool):
            raise _bad(path, lineno, "missing or non-string field 'id'")
        text = obj.get("input", "")
        if not isinstance(text, str):
            raise _bad(path, lineno, f"field 'input' must be a string, got {type(text).__name__}")
        outputs = obj.get("output", [])
        if not isinstance(outputs, list):
            raise _bad(path, lineno, f"field 'output' must be a list, got {type(outputs).__name__}")
        answers, titles = [], []
        for k, item in enumerate(outputs):
            if not isinstance(item, dict):
                raise _bad(path, lineno, f"output[{k}] must be an object")
            ans = item.get("answer")
            if ans is not None:
                if not isinstance(ans, str):
                    raise _bad(path, lineno, f"output[{k}].answer must be a string, got {type(ans).__name__}")
                if ans.strip():
                    answers.append(ans.strip())
            prov = item.get("provenance", [])
            if not isinstance(prov, list):
                raise _bad(path, lineno, f"output[{k}].provenance must be a list")
            for j, pv in enumerate(prov):
                if not isinstance(pv, dict):
                    raise _bad(path, lineno, f"output[{k}].provenance[{j}] must be an object")
                title = pv.get("title")
                if title is not None and not isinstance(title, str):
                    raise _bad(path, lineno, f"output[{k}].provenance[{j}].title must be a string")
                if title and title.strip():
                    titles.append(title.strip())
        out.append(Example(str(obj["id"]).strip(), text, _dedup(answers), _dedup(titles), task, obj))
    _check_unique(out, path)
    return out


def read_nq_open(path: str | os.PathLike) -> list[Example]:
    """Read NQ-open jsonl (`question`, `answer[]`). Ids: the record's `id` if it has one, else "<stem>-<index>"."""
    stem = Path(path).name.split(".jsonl")[0]
    out: list[Example] = []
    for lineno, obj in _json_lines(path):
        question = _req_str(obj, "question", path, lineno)
        answers = obj.get("answer")
        if not isinstance(answers, list) or not all(isinstance(a, str) for a in answers):
            raise _bad(path, lineno, "field 'answer' must be a list of strings")
        answers = _dedup(a.strip() for a in answers if a.strip())
        if not answers:
            raise _bad(path, lineno, "no non-empty answer")
        ex_id = str(obj["id"]) if "id" in obj else f"{stem}-{len(out)}"
        out.append(Example(ex_id, question, answers, [], "nq", obj))
    _check_unique(out, path)
    return out


_FEVER_ESCAPES = {"-LRB-": "(", "-RRB-": ")", "-LSB-": "[", "-RSB-": "]", "-LCB-": "{", "-RCB-": "}", "-COLON-": ":"}


def _fever_title(page: str) -> str:
    """FEVER wiki page id -> Wikipedia title: "Soul_Food_-LRB-film-RRB-" -> "Soul Food (film)"."""
    for k, v in _FEVER_ESCAPES.items():
        page = page.replace(k, v)
    return page.replace("_", " ").strip()


def read_fever(path: str | os.PathLike) -> list[Example]:
    """Read original-format FEVER jsonl (`id`, `claim`, `label`, optional `evidence`).

    answers = [label] (SUPPORTS / REFUTES / NOT ENOUGH INFO); provenance = the evidence pages as titles.
    """
    out: list[Example] = []
    for lineno, obj in _json_lines(path):
        claim = _req_str(obj, "claim", path, lineno)
        label = _req_str(obj, "label", path, lineno)
        if label not in FEVER_LABELS:
            raise _bad(path, lineno, f"label {label!r} is not one of {', '.join(FEVER_LABELS)}")
        if "id" not in obj or isinstance(obj["id"], bool) or not isinstance(obj["id"], (int, str)):
            raise _bad(path, lineno, "missing or invalid field 'id'")
        evidence = obj.get("evidence", [])
        titles = []
        if not isinstance(evidence, list):
            raise _bad(path, lineno, "field 'evidence' must be a list of evidence sets")
        for eset in evidence:
            if not isinstance(eset, list):
                raise _bad(path, lineno, "each evidence set must be a list")
            for piece in eset:
                if not isinstance(piece, list) or len(piece) != 4:
                    raise _bad(path, lineno, "each evidence item must be [annotation_id, evidence_id, page, line]")
                page = piece[2]
                if page is not None:
                    if not isinstance(page, str):
                        raise _bad(path, lineno, "evidence page must be a string or null")
                    titles.append(_fever_title(page))
        out.append(Example(str(obj["id"]), claim, [label], _dedup(t for t in titles if t), "fever", obj))
    _check_unique(out, path)
    return out


def read_lama(path: str | os.PathLike) -> list[Example]:
    """Read LAMA T-REx jsonl (`sub_label`, `obj_label`, `predicate_id`, `evidences[].masked_sentence`, ...).

    input = sub_label, answers = [obj_label], task = "lama"; every original field stays in `raw`.
    Ids: `uuid` when present, else "<predicate_id>-<index>".
    """
    out: list[Example] = []
    for lineno, obj in _json_lines(path):
        sub = _req_str(obj, "sub_label", path, lineno)
        obj_label = _req_str(obj, "obj_label", path, lineno)
        pred = _req_str(obj, "predicate_id", path, lineno)
        if not obj_label.strip():
            raise _bad(path, lineno, "empty 'obj_label'")
        evid = obj.get("evidences", [])
        if not isinstance(evid, list):
            raise _bad(path, lineno, "field 'evidences' must be a list")
        for j, ev in enumerate(evid):
            if not isinstance(ev, dict) or not isinstance(ev.get("masked_sentence", ""), str):
                raise _bad(path, lineno, f"evidences[{j}] must be an object with a string 'masked_sentence'")
        uid = obj.get("uuid")
        ex_id = str(uid) if isinstance(uid, str) and uid else f"{pred}-{len(out)}"
        out.append(Example(ex_id, sub, [obj_label.strip()], [], "lama", obj))
    _check_unique(out, path)
    return out


def read_json(path: str | os.PathLike):
    """A whole JSON file, with errors that name it."""
    p = Path(path)
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LoralagError(f"{p}: no such file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoralagError(f"{p}: not valid JSON ({e})") from None


def read_lama_relations(path: str | os.PathLike) -> dict[str, dict]:
    """LAMA relations.json (a list of {relation, label, template}) -> {relation: record}."""
    p = Path(path)
    data = read_json(p)
    if not isinstance(data, list):
        raise LoralagError(f"{p}: expected a JSON list of relations")
    out = {}
    for k, rel in enumerate(data):
        if (
            not isinstance(rel, dict)
            or not isinstance(rel.get("relation"), str)
            or not isinstance(rel.get("template"), str)
        ):
            raise LoralagError(f"{p}: entry {k} needs string fields 'relation' and 'template'")
        out[rel["relation"]] = rel
    return out


# --------------------------------------------------------------------------------------------------------------
# Metrics (official KILT scorer definitions)

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    """Lower case, remove ASCII punctuation, remove articles a/an/the, squeeze whitespace (KILT/SQuAD order)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in _PUNCT)
    s = _ARTICLES.sub(" ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(ground_truth)


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token F1 of the normalised strings; 0 when no token is shared (even when both normalise to nothing)."""
    pred = normalize_answer(prediction).split()
    gold = normalize_answer(ground_truth).split()
    common = Counter(pred) & Counter(gold)
    num_same = sum(common.values())
    if num_same == 0:
        return 0
    precision = 1.0 * num_same / len(pred)
    recall = 1.0 * num_same / len(gold)
    return (2 * precision * recall) / (precision + recall)


def strict_accuracy(prediction: str, ground_truths: Iterable[str]) -> bool:
    """The scorer's "accuracy": the stripped prediction equals one stripped gold string exactly."""
    return prediction.strip() in {g.strip() for g in ground_truths}


def _rouge_sentences(text: str) -> list[str]:
    # rouge.Rouge: [" ".join(_.split()) for _ in hyp.split(".") if len(_) > 0]
    return [" ".join(piece.split()) for piece in text.split(".") if len(piece) > 0]


def _lcs_words(x: list[str], y: list[str]) -> set[str]:
    """Words of one longest common subsequence of x and y, traced back exactly as rouge's `_recon_lcs` does."""
    n, m = len(x), len(y)
    table = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], table[i], table[i - 1]
        for j in range(1, m + 1):
            if xi == y[j - 1]:
                row[j] = prev[j - 1] + 1
            else:
                row[j] = prev[j] if prev[j] > row[j - 1] else row[j - 1]
    words = set()
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            words.add(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rougel_score(prediction: str, ground_truth: str) -> float:
    """ROUGE-L F of the `rouge` package (what KILT's `_rougel_score` returns); no normalisation, case-sensitive."""
    hyp = _rouge_sentences(prediction)
    ref = _rouge_sentences(ground_truth)
    if not hyp or not ref:  # the package raises ValueError; KILT scores 0.0
        return 0.0
    ref_split = [s.split(" ") for s in ref]
    hyp_split = [s.split(" ") for s in hyp]
    m = len({w for s in ref_split for w in s})
    n = len({w for s in hyp_split for w in s})
    union: set[str] = set()
    for r in ref_split:
        for h in hyp_split:
            union |= _lcs_words(r, h)
    llcs = len(union)
    r_lcs = llcs / m
    p_lcs = llcs / n
    return 2.0 * ((p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8))


def metric_max_over_ground_truths(
    metric_fn: Callable[[str, str], float], prediction: str, ground_truths: Iterable[str]
):
    """max over the gold answers of metric_fn(prediction, gold); LoralagError when there is no gold answer."""
    scores = [metric_fn(prediction, gt) for gt in ground_truths]
    if not scores:
        raise LoralagError("no gold answer to score against")
    return max(scores)


def primary_metric(task: str | None) -> str:
    """The headline metric of a task ("accuracy", "em", "f1" or "rougel"); "em" for tasks not in PRIMARY_METRIC."""
    if task is None:
        return "em"
    try:
        return PRIMARY_METRIC[canonical_task(task)]
    except LoralagError:
        return "em"


_METRICS = ("accuracy", "em", "f1", "rougel")


def score_dataset(
    examples: list[Example],
    predictions: Mapping[str, str],
    task: str | None = None,
    metric: str | None = None,
    allow_missing: bool = False,
    per_example: bool = False,
) -> dict:
    """Score predictions {id: answer} against examples, as the official scorer's `_calculate_metrics` does.

    Returns percentages "accuracy" (strict string match), "em", "f1", "rougel", plus "metric" (the primary
    metric's name), "score" (its value), "task", and counts "n" (examples scored), "n_empty" (empty predictions,
    scored 0 like the official scorer), "n_missing" (examples with no prediction; LoralagError unless
    allow_missing, then scored as empty) and "n_extra" (predictions for ids not in examples, ignored).
    task defaults to the examples' task; metric to primary_metric(task). per_example: also "per_example", each
    example's value of the primary metric (0 to 1) in the examples' order, whose mean × 100 is "score".
    """
    if task is None:
        tasks = {ex.task for ex in examples}
        task = tasks.pop() if len(tasks) == 1 else None
    metric = metric or primary_metric(task)
    if metric not in _METRICS:
        raise LoralagError(f"unknown metric {metric!r}; choose one of {', '.join(_METRICS)}")
    preds = {str(k).strip(): v for k, v in predictions.items()}
    ids = [ex.id.strip() for ex in examples]
    if len(set(ids)) != len(ids):
        raise LoralagError("example ids must be unique")
    missing = [i for i in ids if i not in preds]
    if missing and not allow_missing:
        raise LoralagError(
            f"no prediction for {len(missing)} of {len(ids)} examples (first: {missing[:3]}); "
            "pass allow_missing=True to score them as empty answers"
        )
    totals = dict.fromkeys(_METRICS, 0.0)
    n_empty = 0
    values = []  # the primary metric per example
    for ex, ex_id in zip(examples, ids):
        gold = {a.strip() for a in ex.answers if a.strip()}
        if not gold:
            raise LoralagError(f"example {ex.id!r} has no gold answer")
        guess = preds.get(ex_id)
        guess = "" if guess is None else str(guess).strip()
        if not guess:
            n_empty += 1
            values.append(0.0)
            continue
        one = {
            "accuracy": float(guess in gold),
            "em": metric_max_over_ground_truths(exact_match_score, guess, gold),
            "f1": metric_max_over_ground_truths(f1_score, guess, gold),
            "rougel": metric_max_over_ground_truths(rougel_score, guess, gold),
        }
        for k, v in one.items():
            totals[k] += v
        values.append(float(one[metric]))
    n = len(examples)
    result = {k: (100.0 * v / n if n else 0.0) for k, v in totals.items()}
    result.update(
        task=task,
        metric=metric,
        score=result[metric],
        n=n,
        n_empty=n_empty,
        n_missing=len(missing),
        n_extra=len(set(preds) - set(ids)),
    )
    if per_example:
        result["per_example"] = values
    return result


# --------------------------------------------------------------------------------------------------------------
# The paper's normalised score


def normalised_scores(
    results: Mapping[str, Mapping[str, tuple[float, int]]],
    oracle: str = "oracle",
    families: Mapping[str, Iterable[str]] = KILT_FAMILIES,
    percent: bool = False,
) -> dict[str, dict[str, float]]:
    """Each method's score relative to the oracle (the paper's Eq. 9, Tables 4 and 6).

    results: {method: {dataset: (metric, n_examples)}}, the oracle among the methods. Per dataset the ratio
    metric / oracle's metric; per family the mean of its datasets' ratios weighted by n; "AVG" the plain mean
    over families. A family with none of its datasets in a method's results is left out of that method's
    scores (and of its AVG). Ratios (1.0 = the oracle), or percentages with percent=True.
    LoralagError for a dataset in no family, a dataset the oracle lacks, an oracle score of 0, or a bad n.
    """
    if oracle not in results:
        raise LoralagError(f"no results for the oracle {oracle!r}; methods: {', '.join(results)}")
    fam_of = {}
    for fam, datasets in families.items():
        for ds in datasets:
            fam_of[ds] = fam
    oracle_res = results[oracle]
    scale = 100.0 if percent else 1.0
    out: dict[str, dict[str, float]] = {}
    for method, per_ds in results.items():
        num: dict[str, float] = {}
        den: dict[str, float] = {}
        for ds, entry in per_ds.items():
            try:
                value, n = entry
            except (TypeError, ValueError):
                raise LoralagError(f"{method}/{ds}: expected (metric, n), got {entry!r}") from None
            if ds not in fam_of:
                raise LoralagError(f"{method}: dataset {ds!r} belongs to no family; families: {dict(families)}")
            if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
                raise LoralagError(f"{method}/{ds}: the number of examples must be a positive int, got {n!r}")
            if ds not in oracle_res:
                raise LoralagError(f"the oracle {oracle!r} has no result for {ds!r}")
            ref = float(oracle_res[ds][0])
            if ref == 0 or not math.isfinite(ref):
                raise LoralagError(f"the oracle's score on {ds!r} is {ref}; cannot normalise by it")
            fam = fam_of[ds]
            num[fam] = num.get(fam, 0.0) + n * float(value) / ref
            den[fam] = den.get(fam, 0.0) + n
        scores = {fam: scale * num[fam] / den[fam] for fam in families if fam in den}
        if scores:
            scores["AVG"] = sum(scores.values()) / len(scores)
        out[method] = scores
    return out


# --------------------------------------------------------------------------------------------------------------
# Prediction files in KILT's format


def write_kilt_predictions(path: str | os.PathLike, predictions: Mapping[str, str]) -> Path:
    """Write {id: answer} as KILT output jsonl, one {"id": ..., "output": [{"answer": ...}]} per line, in order.

    The file is written whole or not at all (temporary file, then rename); the official scorer reads it as is.
    """
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(p.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for ex_id, answer in predictions.items():
            if not isinstance(answer, str):
                tmp.unlink(missing_ok=True)
                raise LoralagError(f"prediction for {ex_id!r} must be a string, got {type(answer).__name__}")
            fh.write(json.dumps({"id": str(ex_id), "output": [{"answer": answer}]}, ensure_ascii=False) + "\n")
    os.replace(tmp, p)
    return p


def read_kilt_predictions(path: str | os.PathLike) -> dict[str, str]:
    """Read a KILT output file back to {id: answer}; each line must hold exactly one output with an answer."""
    out: dict[str, str] = {}
    for lineno, obj in _json_lines(path):
        if "id" not in obj:
            raise _bad(path, lineno, "missing field 'id'")
        outputs = obj.get("output")
        if (
            not isinstance(outputs, list)
            or len(outputs) != 1
            or not isinstance(outputs[0], dict)
            or "answer" not in outputs[0]
        ):
            raise _bad(path, lineno, "'output' must be a list holding exactly one {'answer': ...}")
        ex_id = str(obj["id"]).strip()
        if ex_id in out:
            raise _bad(path, lineno, f"id {ex_id!r} appears more than once")
        answer = outputs[0]["answer"]
        if not isinstance(answer, str):  # null or 1990 would be scored as the strings "None" and "1990"
            got = "null" if answer is None else type(answer).__name__
            raise _bad(path, lineno, f"'answer' must be a string, got {got} (write \"\" for no answer)")
        out[ex_id] = answer
    return out
