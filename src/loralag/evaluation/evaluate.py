"""The evaluation harness behind `loralag eval`: read benchmark files, score predictions, generate them.

    datasets = load_datasets(["nq-dev-kilt.jsonl", "fever/paper_dev.jsonl"])
    preds = {"lag": read_method_predictions("runs/lag", datasets), "oracle": ...}
    report = evaluate(datasets, preds, oracle="oracle")       # per-dataset KILT metrics + Eq. 9 table
    write_report("results/", report)                          # scores.json, scores.md

    # or generate predictions with a (routed) model first
    preds = generate_predictions(model, tokenizer, datasets[0], batch_size=8)

Everything that scores is kilt.py (the official KILT scorer's definitions); this module decides which file
is which, matches prediction files to datasets, builds prompts and cleans generations.

Data files (the format is told from the first record, the task from the file name; `task=` forces it):

* KILT jsonl (`id`, `input`, `output[].answer`): every KILT task; the task from the name KILT gives the
  file ("nq-dev-kilt.jsonl"), or "fever" when every gold answer is a FEVER label;
* NQ-open (`question`, `answer[]`): task nq;
* FEVER's original format (`id`, `claim`, `label`): task fever (NOT ENOUGH INFO claims included);
* LAMA T-REx (`sub_label`, `obj_label`, `predicate_id`): task "lama", scored like slot filling (EM). Its input
  is written as KILT writes T-REx slot filling: "<subject> [SEP] <relation label>", the label read from a
  `relations.json` beside the file when there is one, else the predicate id.

Each dataset is named by its file's stem ("nq-dev-kilt"); its task family (for the normalised score) is the
KILT family of its task (kilt.KILT_FAMILIES), slot_filling for LAMA.

Predictions are KILT output files (`{"id": ..., "output": [{"answer": ...}]}` per line, the format the
official KILT scorer reads). An example without a prediction is scored as wrong (an empty answer, exactly as
the official scorer scores an empty one) and counted in "n_missing"; `strict=True` makes it an error instead,
as in the official scorer. A prediction for an id the data file does not hold is an error naming its line.

Prompts (plain text; `template` with "{input}" replaces them). PROMPT_TEMPLATES per family:

    fact_checking   "Claim: {input}\\nIs this claim SUPPORTS or REFUTES?\\nAnswer:"
    slot_filling    "{input}\\nAnswer:"                (KILT's "subject [SEP] relation")
    open_domain_qa  "Question: {input}\\nAnswer:"
    entity_linking  "{input}\\nWhich Wikipedia page is the entity between [START_ENT] and [END_ENT]?\\nAnswer:"
    dialogue        "{input}\\nReply:"                 with {input} the dialogue's last turn

Inputs longer than `max_input_chars` are cut: to a window around the mention for entity linking, to the
start otherwise. Generations are greedy; the answer is the first non-empty line, and for short-answer tasks
(every primary metric but ROUGE-L) it is also cut at its first sentence end (evaluation.answers.clean_answer). A
fact-checking answer becomes the FEVER label it starts with (any case; "yes"/"true" -> SUPPORTS,
"no"/"false" -> REFUTES), else stays as generated (and scores 0).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from loralag.errors import LoralagError
from loralag.evaluation import kilt
from loralag.evaluation.kilt import Example

__all__ = [
    "Dataset",
    "PROMPT_TEMPLATES",
    "FORMATS",
    "detect_format",
    "family_of",
    "load_dataset",
    "load_datasets",
    "read_predictions",
    "read_method_predictions",
    "parse_method",
    "score",
    "normalise",
    "evaluate",
    "build_prompt",
    "clean_prediction",
    "fixed_adapters",
    "read_adapter_map",
    "generate_predictions",
    "write_report",
    "report_markdown",
    "rich_tables",
]

FORMATS = ("kilt", "nq_open", "fever", "lama")
LAMA_TASK = "lama"

PROMPT_TEMPLATES = {
    "fact_checking": "Claim: {input}\nIs this claim SUPPORTS or REFUTES?\nAnswer:",
    "slot_filling": "{input}\nAnswer:",
    "open_domain_qa": "Question: {input}\nAnswer:",
    "entity_linking": "{input}\nWhich Wikipedia page is the entity between [START_ENT] and [END_ENT]?\nAnswer:",
    "dialogue": "{input}\nReply:",
}

_METRIC_KEYS = ("accuracy", "em", "f1", "rougel")


@dataclass
class Dataset:
    """One data file: its examples (the first `limit` when limited), and every id the file holds."""

    path: Path
    name: str  # the file's stem: how prediction files and results tables refer to it
    format: str  # one of FORMATS
    task: str  # canonical KILT task, or "lama"
    examples: list[Example]
    all_ids: set[str] = field(default_factory=set, repr=False)

    @property
    def family(self) -> str:
        return family_of(self.task)

    @property
    def metric(self) -> str:
        return kilt.primary_metric(self.task)

    @property
    def n(self) -> int:
        return len(self.examples)


def family_of(task: str) -> str:
    """The task family of a KILT task (kilt.KILT_FAMILIES); LAMA T-REx is slot filling."""
    if task == LAMA_TASK:
        return "slot_filling"
    task = kilt.canonical_task(task)
    for fam, tasks in kilt.KILT_FAMILIES.items():
        if task in tasks:
            return fam
    raise LoralagError(f"task {task!r} belongs to no family")  # pragma: no cover - every KILT task has one


# --------------------------------------------------------------------------------------------------------------
# Data files


def detect_format(path: str | os.PathLike) -> str:
    """ "kilt", "nq_open", "fever" or "lama", from the fields of the file's first record."""
    first = next(kilt._json_lines(path), None)
    if first is None:
        raise LoralagError(f"{path}: empty file (no records)")
    _, obj = first
    if "sub_label" in obj and "obj_label" in obj:
        return "lama"
    if "claim" in obj and "label" in obj:
        return "fever"
    if "question" in obj and "answer" in obj:
        return "nq_open"
    if "id" in obj and ("input" in obj or "output" in obj):
        return "kilt"
    raise LoralagError(
        f"{path}: cannot tell the format from the first record's fields {sorted(obj)}; expected "
        "KILT (id, input, output), NQ-open (question, answer), FEVER (id, claim, label) or "
        "LAMA T-REx (sub_label, obj_label, predicate_id)"
    )


def _lama_inputs(path: Path, examples: list[Example]) -> None:
    """Rewrite LAMA inputs as KILT's T-REx slot filling writes them: "subject [SEP] relation label"."""
    rel_file = path.parent / "relations.json"
    relations = kilt.read_lama_relations(rel_file) if rel_file.is_file() else {}
    for ex in examples:
        pred = ex.raw.get("predicate_id", "")
        label = relations.get(pred, {}).get("label") or pred
        ex.input = f"{ex.input} [SEP] {label}"


def load_dataset(path: str | os.PathLike, task: str | None = None, limit: int | None = None) -> Dataset:
    """Read one data file in any supported format. task: force the task of a KILT-format file."""
    p = Path(path)
    if not p.exists():
        raise LoralagError(f"{p}: no such file")
    if p.is_dir():
        raise LoralagError(f"{p} is a folder; give the data files themselves")
    fmt = detect_format(p)
    if fmt == "kilt":
        examples = kilt.read_kilt(p, task)
        if task is None and examples and examples[0].task is None:
            if all(ex.answers and set(ex.answers) <= set(kilt.FEVER_LABELS) for ex in examples):
                for ex in examples:
                    ex.task = "fever"
            else:
                raise LoralagError(
                    f"{p}: cannot tell the KILT task from the file name; pass --task "
                    f"(one of {', '.join(kilt.KILT_TASKS)})"
                )
        ds_task = examples[0].task if examples else (kilt.canonical_task(task) if task else None)
    elif fmt == "nq_open":
        examples, ds_task = kilt.read_nq_open(p), "nq"
    elif fmt == "fever":
        examples, ds_task = kilt.read_fever(p), "fever"
    else:
        examples, ds_task = kilt.read_lama(p), LAMA_TASK
        _lama_inputs(p, examples)
    if not examples:
        raise LoralagError(f"{p}: empty file (no records)")
    no_gold = [ex.id for ex in examples if not ex.answers]
    if no_gold:
        raise LoralagError(
            f"{p}: {len(no_gold)} record(s) have no gold answer (first id {no_gold[0]!r}); is this a test-input file?"
        )
    all_ids = {ex.id.strip() for ex in examples}
    if limit is not None:
        if limit < 1:
            raise LoralagError(f"limit must be at least 1, got {limit}")
        examples = examples[:limit]
    return Dataset(p, p.stem, fmt, ds_task, examples, all_ids)


def _task_for(path: Path, tasks: Mapping[str, str] | str | None) -> str | None:
    if tasks is None or isinstance(tasks, str):
        return tasks
    return tasks.get(path.stem, tasks.get(path.name, tasks.get("*")))


def load_datasets(
    paths: Iterable[str | os.PathLike], task: Mapping[str, str] | str | None = None, limit: int | None = None
) -> list[Dataset]:
    """Read every data file; task: one task for all, or {file stem or name (or "*"): task}."""
    datasets: list[Dataset] = []
    seen: dict[str, Path] = {}
    for path in paths:
        p = Path(path)
        if p.stem in seen:
            raise LoralagError(
                f"two data files are named {p.stem!r} ({seen[p.stem]} and {p}); datasets are "
                "named by file stem, so evaluate them in separate runs"
            )
        seen[p.stem] = p
        datasets.append(load_dataset(p, _task_for(p, task), limit))
    if not datasets:
        raise LoralagError("no data file given")
    if isinstance(task, Mapping):
        unknown = set(task) - {"*"} - set(seen) - {p.name for p in seen.values()}
        if unknown:
            raise LoralagError(f"--task names unknown data files {sorted(unknown)}; data files: {sorted(seen)}")
    return datasets


# --------------------------------------------------------------------------------------------------------------
# Predictions


def _line_of(path: Path, ex_id: str) -> int | None:
    with open(path, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:  # pragma: no cover - read_kilt_predictions already parsed it
                continue
            if isinstance(obj, dict) and str(obj.get("id", "")).strip() == ex_id:
                return lineno
    return None  # pragma: no cover


def read_predictions(path: str | os.PathLike, dataset: Dataset) -> dict[str, str]:
    """Read a KILT-format predictions file for `dataset`; LoralagError naming the file (and line) when it is
    empty, malformed, or predicts an id the data file does not hold."""
    p = Path(path)
    if p.is_dir():
        raise LoralagError(f"{p} is a folder; expected the predictions file for {dataset.name}")
    preds = kilt.read_kilt_predictions(p)
    if not preds:
        raise LoralagError(f"{p}: empty file (no predictions)")
    unknown = [i for i in preds if i not in dataset.all_ids]
    if unknown:
        line = _line_of(p, unknown[0])
        where = f"{p}:{line}" if line else str(p)
        more = f" ({len(unknown)} unknown ids in all)" if len(unknown) > 1 else ""
        raise LoralagError(
            f"{where}: id {unknown[0]!r} is not in {dataset.path}{more}; "
            "are these the predictions for another data file?"
        )
    return preds


def read_method_predictions(path: str | os.PathLike, datasets: list[Dataset]) -> dict[str, dict[str, str]]:
    """{dataset name: {id: answer}} from a predictions file (one dataset) or a folder of `<stem>.jsonl`."""
    p = Path(path)
    if not p.exists():
        raise LoralagError(f"{p}: no such predictions file or folder")
    if p.is_file():
        if len(datasets) != 1:
            raise LoralagError(
                f"{p} is one predictions file but {len(datasets)} data files are given; give a "
                "folder holding <data-file-stem>.jsonl for each: " + ", ".join(f"{d.name}.jsonl" for d in datasets)
            )
        return {datasets[0].name: read_predictions(p, datasets[0])}
    out = {}
    for ds in datasets:
        f = p / f"{ds.name}.jsonl"
        if not f.is_file():
            raise LoralagError(f"{f}: no such file (the predictions for {ds.path} in folder {p})")
        out[ds.name] = read_predictions(f, ds)
    return out


def parse_method(spec: str) -> tuple[str, Path]:
    """ "NAME=PATH" -> (NAME, PATH); a bare PATH is named after its file stem or folder name."""
    name, sep, rest = spec.partition("=")
    if sep and name and rest and "/" not in name and os.sep not in name:
        return name.strip(), Path(rest)
    p = Path(spec)
    return (p.stem if p.suffix == ".jsonl" else p.name) or spec, p


# --------------------------------------------------------------------------------------------------------------
# Scores


def score(
    datasets: list[Dataset], predictions: Mapping[str, Mapping[str, Mapping[str, str]]], strict: bool = False
) -> dict[str, dict[str, dict]]:
    """{method: {dataset name: kilt.score_dataset result}} for predictions {method: {dataset name: {id: answer}}}.

    Missing predictions score as wrong (counted in "n_missing"); strict=True makes them an error."""
    out: dict[str, dict[str, dict]] = {}
    for method, per_ds in predictions.items():
        out[method] = {}
        for ds in datasets:
            if ds.name not in per_ds:
                raise LoralagError(f"method {method!r} has no predictions for {ds.name}")
            ids = {ex.id.strip() for ex in ds.examples}
            preds = {i: a for i, a in per_ds[ds.name].items() if i in ids}  # beyond a --limit: not scored
            if strict:
                missing = [ex.id for ex in ds.examples if ex.id.strip() not in preds]
                if missing:
                    raise LoralagError(
                        f"{method}: no prediction for {len(missing)} of {ds.n} examples of "
                        f"{ds.path} (first id {missing[0]!r})"
                    )
            res = kilt.score_dataset(ds.examples, preds, task=ds.task, metric=ds.metric, allow_missing=True)
            res["family"] = ds.family
            out[method][ds.name] = res
    return out


def normalise(datasets: list[Dataset], scores: Mapping[str, Mapping[str, dict]], oracle: str) -> dict:
    """The paper's Eq. 9 through kilt.normalised_scores, in percent of the oracle.

    "families": per method, each family's n-weighted mean of dataset/oracle ratios and "AVG" (the mean over
    families); "datasets": per method, each dataset's ratio alone."""
    if oracle not in scores:
        raise LoralagError(f"no predictions named {oracle!r} for the oracle; methods: {', '.join(scores)}")
    results = {m: {d.name: (per[d.name]["score"], d.n) for d in datasets} for m, per in scores.items()}
    families: dict[str, tuple[str, ...]] = {}
    for d in datasets:
        families[d.family] = families.get(d.family, ()) + (d.name,)
    ordered = {f: families[f] for f in list(kilt.KILT_FAMILIES) if f in families}
    per_family = kilt.normalised_scores(results, oracle=oracle, families=ordered, percent=True)
    per_dataset = kilt.normalised_scores(
        results, oracle=oracle, families={d.name: (d.name,) for d in datasets}, percent=True
    )
    for per in per_dataset.values():
        per.pop("AVG", None)
    return {"oracle": oracle, "unit": "percent of the oracle", "families": per_family, "datasets": per_dataset}


def evaluate(
    datasets: list[Dataset],
    predictions: Mapping[str, Mapping[str, Mapping[str, str]]],
    oracle: str | None = None,
    strict: bool = False,
) -> dict:
    """Scores of every method on every dataset, and the normalised table when an oracle is named.

    oracle=None: "oracle" when a method has that name, else no normalised table; when that implicit oracle
    cannot normalise (a score of 0), the report holds "normalised_error" instead of raising."""
    scores = score(datasets, predictions, strict)
    implicit = oracle is None and "oracle" in scores
    if implicit:
        oracle = "oracle"
    report = {
        "datasets": {
            d.name: {
                "file": str(d.path),
                "format": d.format,
                "task": d.task,
                "family": d.family,
                "metric": d.metric,
                "n": d.n,
            }
            for d in datasets
        },
        "scores": scores,
    }
    if oracle is not None:
        try:
            report["normalised"] = normalise(datasets, scores, oracle)
        except LoralagError as e:
            if not implicit:
                raise
            report["normalised_error"] = str(e)
    return report


# --------------------------------------------------------------------------------------------------------------
# Reports


def _pct(x) -> str:
    return "—" if x is None else f"{x:.2f}"


def report_markdown(report: dict) -> str:
    """The scores (and normalised table) as GitHub markdown."""
    lines = [
        "# Evaluation",
        "",
        "KILT downstream metrics (official scorer definitions), in percent. `score` is the dataset's primary "
        "metric; missing predictions count as wrong.",
        "",
    ]
    lines += [
        "| method | dataset | task | n | metric | score | accuracy | EM | F1 | ROUGE-L | missing |",
        "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for method, per in report["scores"].items():
        for ds, r in per.items():
            lines.append(
                f"| {method} | {ds} | {r['task']} | {r['n']} | {r['metric']} | {_pct(r['score'])} | "
                f"{_pct(r['accuracy'])} | {_pct(r['em'])} | {_pct(r['f1'])} | {_pct(r['rougel'])} | "
                f"{r['n_missing']} |"
            )
    norm = report.get("normalised")
    if norm:
        fams = [f for f in kilt.KILT_FAMILIES if any(f in v for v in norm["families"].values())]
        lines += [
            "",
            f"## Normalised score (Eq. 9): percent of the oracle `{norm['oracle']}`",
            "",
            "Per dataset: primary metric / the oracle's. Per family: mean of its datasets' ratios weighted "
            "by their number of examples. AVG: mean over families.",
            "",
            "| method | " + " | ".join(fams) + " | AVG |",
            "|---|" + "---:|" * (len(fams) + 1),
        ]
        for method, per in norm["families"].items():
            lines.append(f"| {method} | " + " | ".join(_pct(per.get(f)) for f in fams) + f" | {_pct(per.get('AVG'))} |")
        names = list(report["datasets"])
        lines += ["", "| method | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
        for method, per in norm["datasets"].items():
            lines.append(f"| {method} | " + " | ".join(_pct(per.get(n)) for n in names) + " |")
    return "\n".join(lines) + "\n"


def write_report(out_dir: str | os.PathLike, report: dict) -> tuple[Path, Path, Path]:
    """Write scores.json, scores.md and scores.png (plot_scores) into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    js, md, png = out / "scores.json", out / "scores.md", out / "scores.png"
    tmp = js.with_name(js.name + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, js)
    md.write_text(report_markdown(report), encoding="utf-8")
    plot_scores(report, png)
    return js, md, png


def plot_scores(report: dict, path: str | os.PathLike) -> dict:
    """A grouped bar chart of the report, written as a PNG: each method's normalised score per family and AVG
    (percent of the oracle, a line at 100) when the report has the normalised table, else each method's
    primary score per dataset. Returns what was drawn, read back from the bars: {"groups": [...], "unit": ...,
    "values": {method: {group: height, or None where the table has no value}}}."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    norm = report.get("normalised")
    if norm:
        table = norm["families"]
        groups = [f for f in kilt.KILT_FAMILIES if any(f in v for v in table.values())] + ["AVG"]
        unit = f"normalised score, % of the oracle '{norm['oracle']}'"
        title = "Normalised score per family (Eq. 9)"
    else:
        table = {m: {ds: r["score"] for ds, r in per.items()} for m, per in report["scores"].items()}
        groups = list(report["datasets"])
        unit = "primary metric, %"
        title = "Score per dataset"
    methods = list(table)
    width = 0.8 / max(1, len(methods))
    fig = Figure(figsize=(max(5.0, 1.2 + len(groups) * (0.5 + 0.3 * len(methods))), 4.2))
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    drawn = {}
    for i, method in enumerate(methods):
        heights = [table[method].get(g) for g in groups]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(groups))]
        bars = ax.bar(xs, [float("nan") if h is None else h for h in heights], width, label=method)
        drawn[method] = {
            g: (None if h is None else float(b.get_height())) for g, h, b in zip(groups, heights, bars.patches)
        }
    if norm:
        ax.axhline(100, color="black", lw=0.8)
    top = max([h for per in drawn.values() for h in per.values() if h is not None] + [100.0 if norm else 1.0])
    ax.set_ylim(0, top * 1.2)  # room for the legend above the tallest bar
    ax.set_xticks(range(len(groups)))
    ax.set_xticklabels(groups, rotation=20 if len(groups) > 4 else 0, ha="right" if len(groups) > 4 else "center")
    ax.set_ylabel(unit)
    ax.set_title(title)
    ax.legend(fontsize=8, ncols=min(len(methods), 4))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return {"groups": groups, "unit": unit, "values": drawn}


def rich_tables(report: dict) -> list:
    """rich Tables: one per dataset (a row per method), then the normalised table if any."""
    from rich.table import Table

    tables = []
    for ds, meta in report["datasets"].items():
        t = Table(
            title=f"{ds}  ({meta['task']}, {meta['family']}, n={meta['n']}, primary: {meta['metric']})",
            title_justify="left",
            header_style="bold",
        )
        for col in ("method", "n", "score", "accuracy", "EM", "F1", "ROUGE-L", "missing", "empty"):
            t.add_column(col, justify="left" if col == "method" else "right")
        for method, per in report["scores"].items():
            r = per[ds]
            t.add_row(
                method,
                str(r["n"]),
                f"[bold]{_pct(r['score'])}[/]",
                _pct(r["accuracy"]),
                _pct(r["em"]),
                _pct(r["f1"]),
                _pct(r["rougel"]),
                str(r["n_missing"]),
                str(r["n_empty"]),
            )
        tables.append(t)
    norm = report.get("normalised")
    if norm:
        fams = [f for f in kilt.KILT_FAMILIES if any(f in v for v in norm["families"].values())]
        t = Table(
            title=f"Normalised score (Eq. 9), % of the oracle '{norm['oracle']}'",
            title_justify="left",
            header_style="bold",
        )
        t.add_column("method")
        for f in fams + ["AVG"]:
            t.add_column(f, justify="right")
        for method, per in norm["families"].items():
            t.add_row(method, *[_pct(per.get(f)) for f in fams], f"[bold]{_pct(per.get('AVG'))}[/]")
        tables.append(t)
    return tables


# --------------------------------------------------------------------------------------------------------------
# Prompts and answers


def _fit(text: str, family: str, max_chars: int | None) -> str:
    if family == "dialogue":
        turns = [t for t in text.split("\n") if t.strip()]
        text = turns[-1] if turns else text
    if max_chars is None or len(text) <= max_chars:
        return text
    if family == "entity_linking" and "[START_ENT]" in text:
        start = text.index("[START_ENT]")
        end = text.find("[END_ENT]", start)
        end = end + len("[END_ENT]") if end >= 0 else start + len("[START_ENT]")
        room = max(0, max_chars - (end - start))
        lo = max(0, start - room // 2)
        hi = min(len(text), end + room - (start - lo))
        lo = max(0, min(lo, hi - max_chars))
        return text[lo:hi]
    return text[:max_chars]


def build_prompt(
    example: Example, dataset: Dataset, template: str | None = None, max_input_chars: int | None = 2000
) -> str:
    """The prompt for one example: its family's PROMPT_TEMPLATES entry (or `template`) with {input} filled."""
    tpl = template if template is not None else PROMPT_TEMPLATES[dataset.family]
    return tpl.replace("{input}", _fit(example.input, dataset.family, max_input_chars))


def _fever_label(answer: str) -> str:
    from loralag.evaluation.answers import fc_label

    label = fc_label(answer)
    if label in kilt.FEVER_LABELS:
        return label
    head = answer.strip().upper()
    if head.startswith("NOT ENOUGH INFO"):
        return "NOT ENOUGH INFO"
    word = head.split()[0].strip(".,!:;") if head.split() else ""
    if word in ("YES", "TRUE", "SUPPORTED", "SUPPORT"):
        return "SUPPORTS"
    if word in ("NO", "FALSE", "REFUTED", "REFUTE"):
        return "REFUTES"
    return answer.strip()


def clean_prediction(text: str, dataset: Dataset) -> str:
    """The answer in a generation: first non-empty line; short answers cut at the first sentence end; fact
    checking mapped to its FEVER label."""
    from loralag.evaluation.answers import clean_answer

    if dataset.metric == "rougel":
        lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
        return lines[0] if lines else ""
    answer = clean_answer(text)
    if dataset.family == "fact_checking":
        return _fever_label(answer)
    return answer


def _resolve_adapter(spec: str, libraries: Mapping) -> tuple[str, str]:
    """ "LIB/NAME" or "NAME" -> (library routing name, adapter name), checked against the libraries."""
    lib, sep, name = spec.rpartition("/")
    if sep:
        if lib not in libraries:
            raise LoralagError(f"adapter {spec!r}: no library named {lib!r} is attached; attached: {sorted(libraries)}")
        if name not in libraries[lib].names:
            raise LoralagError(f"adapter {spec!r}: library {lib!r} ({libraries[lib].path}) holds no adapter {name!r}")
        return lib, name
    holders = [n for n, L in libraries.items() if spec in L.names]
    if not holders:
        raise LoralagError(f"no attached library holds an adapter named {spec!r}; libraries: {sorted(libraries)}")
    if len(holders) > 1:
        raise LoralagError(f"adapter {spec!r} is in several libraries {holders}; write it as LIBRARY/{spec}")
    return holders[0], spec


def fixed_adapters(
    libraries: Mapping, adapters: Iterable[str] = (), adapter_map: Mapping | None = None
) -> tuple[dict[str, str], dict[str, dict[str, str]]]:
    """Resolve fixed adapters: ({library: adapter} for every example, {example id: {library: adapter}})."""
    default: dict[str, str] = {}
    for spec in adapters:
        lib, name = _resolve_adapter(spec, libraries)
        if lib in default and default[lib] != name:
            raise LoralagError(f"two adapters given for library {lib!r}: {default[lib]!r} and {name!r}")
        default[lib] = name
    per_example: dict[str, dict[str, str]] = {}
    for ex_id, specs in (adapter_map or {}).items():
        specs = [specs] if isinstance(specs, str) else specs
        if not isinstance(specs, list) or not all(isinstance(s, str) for s in specs):
            raise LoralagError(f"adapter map: the entry for {ex_id!r} must be an adapter name or a list of them")
        per_example[str(ex_id).strip()] = dict(_resolve_adapter(s, libraries) for s in specs)
    return default, per_example


def read_adapter_map(path: str | os.PathLike) -> dict:
    """An adapter map file: a JSON object {example id: "LIB/NAME" or [names]}."""
    p = Path(path)
    data = kilt.read_json(p)
    if not isinstance(data, dict):
        raise LoralagError(f"{p}: expected a JSON object {{example id: adapter name or list of names}}")
    return data


def generate_predictions(
    model,
    tokenizer,
    dataset: Dataset,
    batch_size: int = 8,
    max_new_tokens: int = 32,
    template: str | None = None,
    chat: bool = True,
    granularity: str = "token",
    max_input_chars: int | None = 2000,
    fixed: Mapping[str, str] | None = None,
    fixed_per_example: Mapping[str, Mapping[str, str]] | None = None,
    progress=None,
) -> dict[str, str]:
    """{id: cleaned answer} for every example of `dataset`, generated greedily with whatever is attached.

    fixed / fixed_per_example: adapters for the libraries attached with router "fixed" (the rest route as
    attached); a fixed library with no adapter for an example runs as the base model there.
    progress: called with the number of examples done after each batch."""
    from loralag.generate import generate
    from loralag.routing.state import state_of

    if batch_size < 1:
        raise LoralagError(f"batch size must be at least 1, got {batch_size}")
    if template is not None and "{input}" not in template:
        raise LoralagError("the prompt template must contain {input}")
    state = state_of(model)
    fixed_libs = [lib for lib, spec in (state.specs.items() if state else ()) if spec.router == "fixed"]
    prompts = [build_prompt(ex, dataset, template, max_input_chars) for ex in dataset.examples]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # similar lengths share a batch
    answers: dict[int, str] = {}
    with state.configure() if state is not None else nullcontext():  # the caller's settings come back
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            for lib in fixed_libs:
                names = []
                for i in idx:
                    ex_id = dataset.examples[i].id.strip()
                    names.append((fixed_per_example or {}).get(ex_id, {}).get(lib, (fixed or {}).get(lib)))
                state.set_router(lib, "fixed", fixed=names)
            texts = generate(
                model,
                tokenizer,
                [prompts[i] for i in idx],
                max_new_tokens=max_new_tokens,
                chat=chat,
                greedy=True,
                granularity=granularity,
            )
            for i, text in zip(idx, texts):
                answers[i] = clean_prediction(text, dataset)
            if progress is not None:
                progress(len(answers))
    return {dataset.examples[i].id: answers[i] for i in range(len(dataset.examples))}


@dataclass(frozen=True)
class GenerationOptions:
    """How `loralag eval --model` answers: the routing of its libraries and the generation settings."""

    router: str = "lag"
    k: int = 20
    nprobe: int | None = None
    granularity: str = "token"
    max_new_tokens: int = 32
    batch_size: int = 8
    template: str | None = None
    max_input_chars: int = 2000
    chat: bool = True


def generate_method(
    model,
    tokenizer,
    datasets: list[Dataset],
    libraries: list,
    options: GenerationOptions,
    adapters: list[str] = (),
    adapter_map: Mapping | None = None,
    out_dir: str | os.PathLike | None = None,
    progress: Callable[[Dataset, int], None] | None = None,
    done: Callable[[Dataset, dict, Path | None, float], None] | None = None,
    remote: Callable | None = None,
) -> dict[str, dict[str, str]]:
    """One method's predictions for every dataset: the libraries attached with `options` (libraries named by
    `adapters` "LIB/NAME" or `adapter_map` {example id: ...} run as `fixed`), answers generated and, with
    `out_dir`, written as OUT/<dataset>.jsonl. progress(dataset, answered) after each batch; done(dataset,
    answers, path, seconds) after each dataset. The model is handed back as it came (detached).
    remote: answer elsewhere instead (e.g. loralag.cluster.evaluate.RayAnswerer): called as remote(model,
    tokenizer, libraries, routers, k, nprobe), it returns a context manager whose generate_predictions(dataset,
    ...) stands for this module's; the model is then not attached here."""
    import time

    from loralag.evaluation.kilt import write_kilt_predictions
    from loralag.routing.routers import RouteSpec
    from loralag.routing.state import attach, detach, library_names

    RouteSpec(router=options.router, k=options.k, nprobe=options.nprobe)  # checks the settings up front
    named = library_names(list(libraries))
    fixed, per_example = fixed_adapters(named, list(adapters), adapter_map)
    fixed_libs = set(fixed) | {lib for m in per_example.values() for lib in m}
    routers = {lib: ("fixed" if lib in fixed_libs or options.router == "fixed" else options.router) for lib in named}
    if remote is not None:
        answerer = remote(model, tokenizer, named, routers, options.k, options.nprobe)
        answer = answerer.generate_predictions
    else:
        answerer = attach(model, named, router=routers, k=options.k, nprobe=options.nprobe) if named else None
        answer = partial(generate_predictions, model, tokenizer)
    out = {}
    try:
        for ds in datasets:
            start = time.perf_counter()
            answers = answer(
                ds,
                batch_size=options.batch_size,
                max_new_tokens=options.max_new_tokens,
                template=options.template,
                chat=options.chat,
                granularity=options.granularity,
                max_input_chars=options.max_input_chars,
                fixed=fixed,
                fixed_per_example=per_example,
                progress=None if progress is None else (lambda n, ds=ds: progress(ds, n)),
            )
            path = write_kilt_predictions(Path(out_dir) / f"{ds.name}.jsonl", answers) if out_dir else None
            out[ds.name] = answers
            if done is not None:
                done(ds, answers, path, time.perf_counter() - start)
    finally:
        if remote is not None:
            answerer.close()
        elif named:
            detach(model)
    return out
