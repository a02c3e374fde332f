"""`loralag bench`: the paper's knowledge-intensive evaluation, rebuilt on LAMA T-REx at laptop scale.

    results = run_bench("tiny", data_dir="../shared/data/lama-trex", out_dir="results/lama-tiny")

A base LM gets two libraries, routed separately and applied together (Fleshman & Van Durme 2025):

* knowledge: one LoRA per subject entity's article (gate/up/down, rank 6, alpha 12), trained on the article
  and templated synthetic rewrites of it (lama_data.py);
* task: one LoRA per task family (q/k/v/o, rank 8, alpha 16) — slot filling, QA, fact checking, entity
  linking — trained on prompt -> answer pairs about entities *outside* the knowledge set. Fact checking answers
  the bare label, as KILT's FEVER is scored (`fc_form="recall"`, the harder variant, recalls the object
  first); its bare claims train under the training entity's own knowledge adapter (train.QAPairs.under), as at
  test time, and with the entity's page (title and article) in front.

Every method answers the same questions about the knowledge-set entities:

    base        no adapter (the floor)
    oracle      the gold task adapter and the gold knowledge adapter, through `fixed`
    arrow       Arrow top-1 on both libraries
    lag@k       LAG (Arrow top-k filter, SpectR pick) on both libraries; "lag" is k=20, the sweep k=1..N
    lag-prefix  per token, the adapter LAG picked most over the sequence so far (prefix_evidence.py; ours)
    spectral    SpectR over the whole library (= lag@N, which reuses its answers)
    arrow-mix   PEFT Arrow: softmax-weighted top-k mixture
    rag         BM25 top-1 page (title and article) prepended to the prompt; task adapter by LAG, no knowledge adapter
    prag        BM25 top-1 page's knowledge adapter through `fixed`; task adapter by LAG
    r-lag       RAG's prompt plus LAG on both libraries
    p-lag       LAG on both libraries plus the retrieved article's adapter summed on top (see PLAG_NOTE)

Each routed method also runs at sequence granularity ("<method>/seq"): every library's most-voted adapter
over the prompt's tokens and modules (RoutingState.vote) serves the whole sequence through `fixed`.

Scores: KILT EM for slot filling and QA, accuracy for fact checking and entity linking (kilt.score_dataset),
normalised by the Oracle per family (kilt.normalised_scores with kilt.LAMA_FAMILIES), with the base model's
normalised score as the floor and each method's gain fraction over it. Answers are cut at the first line and
sentence end; with `credit_prefix` (default) an answer whose normalised form starts with a gold answer's (at
a word boundary) is credited as that answer (strict scores are reported beside it).
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import time
from dataclasses import asdict, replace
from pathlib import Path

from loralag.evaluation.answers import ANSWER_STOP, clean_answer, credited, fc_label
from loralag.experiments.lama.answering import (
    AnswerJob,
    answer_names,
    answer_questions,
    default_workers,
    known_claims,
    library_set,
)
from loralag.experiments.lama.config import (
    KNOWLEDGE_MODULES,
    PLAG_NOTE,
    TASK_MODULES,
    BenchConfig,
    bench_data,
    default_cache_dir,
    default_data_dir,
    fc_bare_cap,
    method_list,
    size_config,
)
from loralag.experiments.lama.data import (
    DATASETS,
    FACT_CHECKING,
    FAMILY_OF,
    QA,
    SLOT_FILLING,
    Question,
    describe,
    fact_checking_pairs,
    rag_prompt,
    rewrites,
    write_questions,
)
from loralag.experiments.lama.intervals import score_intervals
from loralag.experiments.lama.report import (
    findings,
    gain_fractions,
    k_sweep,
    normalise,
    plot_k_sweep,
    plot_routing,
    report_markdown,
)
from loralag.experiments.lama.routing_stats import RoutingStats


# -- the run ---------------------------------------------------------------------------------------------------
def _fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        marker = p / "loralag_train.json"
        key = json.loads(marker.read_text()).get("key", "") if marker.is_file() else ""
        h.update(f"{p.name}:{key}\n".encode())
    return h.hexdigest()[:12]


def _library(cache: Path, kind: str, paths: list[Path], model, model_spec: str, progress: bool):
    from loralag.library.store import build_library, module_shapes

    path = cache / "libraries" / f"{kind}-{len(paths)}-{_fingerprint(paths)}"
    lib = build_library(
        path, paths, base_model=model_spec, shapes=module_shapes(model), replace=True, progress=progress
    )
    stale = sorted(set(lib.names) - {p.name for p in paths})
    if stale:
        lib.remove(stale)
    return lib


def knowledge_train_config(cfg: BenchConfig):
    """How the bench trains a knowledge adapter (TrainConfig) under the run's settings."""
    from loralag.training.train import TrainConfig

    return TrainConfig(
        target_modules=list(KNOWLEDGE_MODULES),
        r=cfg.know_r,
        alpha=cfg.know_alpha,
        steps=cfg.know_steps,
        batch_size=cfg.know_batch,
        lr=cfg.know_lr,
        seed=cfg.seed,
        shared_init=cfg.shared_init,
        init=cfg.know_init,
        freeze_a=cfg.know_freeze_a,
    )


def knowledge_document(entity, relations, cfg: BenchConfig):
    """A knowledge adapter's training item: the entity's article plus its restatements (data.rewrites)."""
    from loralag.training.train import Document

    return Document(entity.name, entity.article, rewrites(entity, relations, cfg.know_qa))


def _routed_for(dataset: str, routed, with_page: list[bool], cfg: BenchConfig):
    """What `dataset`'s task adapter trains under: --task-under lag-bare: the routed library under the pairs
    without a page in front only; lag-fact: under slot filling's and QA's pairs only, none for entity linking."""
    if routed is None or (cfg.task_under == "lag-fact" and dataset not in (SLOT_FILLING, QA)):
        return None
    if cfg.task_under != "lag-bare":
        return routed
    return replace(routed, pairs=tuple(not page for page in with_page))


def _task_contrast_texts(data, cfg: BenchConfig) -> list[str]:
    """--task-contrast families: every family's training pairs, prompt and answer as one text (the inputs the
    task adapters train on), the reference of each task adapter's contrast init; [] for generic text."""
    from loralag.training.train import QAPairs, item_texts

    if cfg.task_contrast == "generic":
        return []
    return [text for d in DATASETS for text in item_texts(QAPairs(d, data.task_pairs[d]))]


def _task_under_note(cfg: BenchConfig) -> str:
    """The settings' sentence on what _routed_for gives the task adapters ("" for --task-under none)."""
    if cfg.task_under == "none":
        return ""
    trained = "slot-filling and QA" if cfg.task_under == "lag-fact" else "other"
    pairs = ", their pairs without a page in front only." if cfg.task_under == "lag-bare" else "."
    return (
        f" Here (task_under={cfg.task_under}) the {trained} task adapters train under every training entity's "
        f"knowledge adapter, as a library routed per token by LAG at k={cfg.k}{pairs}"
    )


def adapter_folders(cache: Path, cfg: BenchConfig) -> dict[str, Path]:
    """Where the run's adapters are cached, a folder per init setting (the defaults keep the plain names), so
    switching `--know-init`, `--task-init`, `--task-contrast`, `--task-freeze-a`, `--shared-init`, `--know-qa` (or
    BenchConfig.know_freeze_a) trains into its own folder and switching back finds the earlier adapters instead of
    retraining them in place. The task adapters depend on the knowledge adapters too: fact checking trains under
    them. A --task-seed, --fc-steps, --fc-form, --fc-all-under, --fc-false, --fc-under-train, --fc-train-a,
    --fc-a-within or --task-under of its own gets its own task folder."""
    shared = "-shared-init" if cfg.shared_init else ""
    know = shared + ("" if cfg.know_init == "peft" else f"-{cfg.know_init}") + ("-qa" if cfg.know_qa else "")
    know += "-frozen-a" if cfg.know_freeze_a else ""
    task = shared + ("" if cfg.task_init == "peft" else f"-{cfg.task_init}")
    task += f"-vs-{cfg.task_contrast}" if cfg.task_contrast != "generic" else ""
    task += "-b-only" if cfg.task_freeze_a else ""
    task += "" if cfg.know_init == "peft" else f"-under-{cfg.know_init}"
    task += "-qa" if cfg.know_qa else ""
    task += "-frozen-a" if cfg.know_freeze_a else ""
    task += f"-seed{cfg.task_seed}" if cfg.task_seed is not None and cfg.task_seed != cfg.seed else ""
    task += f"-fc{cfg.fc_steps}" if cfg.fc_steps is not None and cfg.fc_steps != 2 * cfg.task_steps else ""
    task += f"-fc-{cfg.fc_form}" if cfg.fc_form != "label" else ""
    task += "-fc-all-under" if cfg.fc_all_under else ""
    task += f"-fc-false{cfg.fc_false}" if cfg.fc_false != 1 else ""
    task += "-fc-under-train" if cfg.fc_under_train else ""
    task += "-fc-train-a" if cfg.fc_train_a and cfg.task_freeze_a and not cfg.fc_a_within else ""
    task += f"-fc-a-within{cfg.fc_a_within}" if cfg.fc_a_within else ""
    task += f"-routed-{cfg.task_under}" if cfg.task_under != "none" else ""
    return {
        "knowledge": cache / f"knowledge{know}",
        "train-knowledge": cache / f"train-knowledge{know}",
        "task": cache / f"task{task}",
    }


def run_bench(
    size: str | dict | BenchConfig = "tiny",
    data_dir: str | Path | None = None,
    out_dir: str | Path | None = None,
    model_spec: str = "default",
    cache_dir: str | Path | None = None,
    progress: bool = True,
    console=None,
    model_and_tokenizer=None,
    threads: int | None = None,
    workers: int | None = None,
    ray: str | bool | None = None,
    **overrides,
) -> dict:
    """Train (cached) the knowledge and task adapters, build the libraries, answer every question with every
    method, and write the results folder. Returns the results dict (also written as results.json).

    size: "tiny" | "small" | "full", a dict of BenchConfig fields, or a BenchConfig; overrides: BenchConfig
    fields (e.g. n_entities=50, granularity="sequence", methods=("base", "oracle", "lag")).
    data_dir: a folder of LAMA T-REx jsonl files (+ relations.json); default default_data_dir().
    out_dir: the results folder (default results/lama-<size>). cache_dir: trained adapters and libraries,
    shared across runs (default <loralag cache>/lama_bench). model_and_tokenizer: an already loaded pair.
    threads: torch CPU threads for the run (default: torch's; 1 is faster on a machine other jobs keep busy).
    workers: processes that train the knowledge adapters (default one: on 2 cores two train no faster) and
    that answer the questions, each on its share of the batches with threads // workers threads
    (default_workers: two for 8+ batches per method); the results do not depend on it beyond float rounding.
    With workers > 1 a calling script needs the usual `if __name__ == "__main__":` guard (spawn).
    ray: train the adapters and answer the questions' shares on a Ray cluster instead (True or its address;
    workers default to as many as its CPUs hold), see loralag.cluster."""
    import torch

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(
            size,
            data_dir,
            out_dir,
            model_spec,
            cache_dir,
            progress,
            console,
            model_and_tokenizer,
            workers,
            overrides,
            ray,
        )
    finally:
        torch.set_num_threads(old_threads)


def _run(
    size, data_dir, out_dir, model_spec, cache_dir, progress, console, model_and_tokenizer, workers, overrides, ray=None
) -> dict:
    from functools import partial

    import torch

    from loralag.evaluation.kilt import score_dataset, write_kilt_predictions
    from loralag.evaluation.retrieval import BM25Index
    from loralag.models import load_model, per_model_dir
    from loralag.training.train import QAPairs, TrainConfig, UnderLibrary, train_adapters

    if ray is not None and ray is not False:  # the same adapters, trained on the cluster
        from loralag.cluster.train import train_adapters as train_on_cluster

        train_adapters = train_many = partial(train_on_cluster, address=ray)
    else:  # the knowledge adapters, many alike, in `workers` processes when asked (training.processes)
        train_many = partial(train_adapters, workers=workers or 1)
    cfg = size_config(size, **overrides)
    size_name = size if isinstance(size, str) else "custom"
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    out = Path(out_dir) if out_dir is not None else Path("results") / f"lama-{size_name}"
    # another base model's adapters are cached apart (in the default cache): the same names would retrain in place
    cache = Path(cache_dir) if cache_dir is not None else per_model_dir(default_cache_dir(), model_spec)
    out.mkdir(parents=True, exist_ok=True)
    say = console.print if console is not None else (lambda *a, **k: None)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # -- data ------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    data = bench_data(cfg, data_dir)
    timings["data"] = time.perf_counter() - t
    n = len(data.entities)
    say(
        f"[bold]LAMA bench[/] ({size_name}): {n} knowledge entities, "
        + ", ".join(f"{len(q)} {d}" for d, q in data.questions.items())
        + f" questions; data from {data_dir}"
    )

    t = time.perf_counter()
    if model_and_tokenizer is not None:
        model, tokenizer = model_and_tokenizer
    else:
        model, tokenizer = load_model(model_spec, dtype=torch.float32)
    timings["load_model"] = time.perf_counter() - t

    # fact checking: bare claims under a knowledge adapter, then bare claims the base model knows (see
    # fact_checking_pairs); twice the other families' pairs, since each fact gives two
    t = time.perf_counter()
    known = known_claims(model, tokenizer, data.claims)
    fc = fact_checking_pairs(
        data.claims,
        None if cfg.fc_under_train else 2 * cfg.n_train_pairs,
        cfg.context_every,
        fc_bare_cap(cfg),
        known,
        form=cfg.fc_form,
        under={e.name for e in data.train_entities} if cfg.fc_under_train else None,
    )
    data.task_pairs[FACT_CHECKING] = [(prompt, answer) for prompt, answer, _ in fc]
    data.fc_under = [under for _, _, under in fc]
    claims_known = sum(known) / len(known) if known else None
    timings["score_claims"] = time.perf_counter() - t

    # -- adapters (cached) --------------------------------------------------------------------------------------
    t = time.perf_counter()
    kcfg = knowledge_train_config(cfg)
    folders = adapter_folders(cache, cfg)
    docs = [knowledge_document(e, data.relations, cfg) for e in data.entities]
    say(f"[bold]Knowledge adapters[/]: {len(docs)} × {cfg.know_steps} steps (cached in {folders['knowledge']})")
    know_paths = train_many(model, tokenizer, docs, folders["knowledge"], kcfg, progress=progress)
    timings["train_knowledge"] = time.perf_counter() - t

    # bare fact-checking claims train under their (training) entity's own knowledge adapter, trained alike
    t = time.perf_counter()
    fc_entities = sorted({e for e in data.fc_under if e is not None})
    say(
        f"[bold]Knowledge adapters of fact-checking training entities[/]: {len(fc_entities)} "
        f"(cached in {folders['train-knowledge']})"
    )
    pool = {e.name: e for e in data.train_entities}
    fc_docs = [knowledge_document(pool[name], data.relations, cfg) for name in fc_entities]
    under = dict(
        zip(
            fc_entities,
            train_many(model, tokenizer, fc_docs, folders["train-knowledge"], kcfg, progress=progress),
        )
    )
    timings["train_fc_knowledge"] = time.perf_counter() - t

    routed = None  # --task-under: every training entity's knowledge adapter, as a library routed under the task pairs
    if cfg.task_under != "none":
        t = time.perf_counter()
        say(f"[bold]Knowledge adapters of all {len(data.train_entities)} training entities[/] (--task-under)")
        train_docs = [knowledge_document(e, data.relations, cfg) for e in data.train_entities]
        train_know = train_many(model, tokenizer, train_docs, folders["train-knowledge"], kcfg, progress=progress)
        under_lib = _library(cache, "train-knowledge", train_know, model, model_spec, progress)
        routed = UnderLibrary(under_lib.path, "lag", cfg.k)
        timings["train_under_knowledge"] = time.perf_counter() - t

    t = time.perf_counter()
    tcfg = TrainConfig(
        target_modules=list(TASK_MODULES),
        r=cfg.task_r,
        alpha=cfg.task_alpha,
        steps=cfg.task_steps,
        batch_size=cfg.task_batch,
        lr=cfg.task_lr,
        seed=cfg.seed if cfg.task_seed is None else cfg.task_seed,
        shared_init=cfg.shared_init,
        init=cfg.task_init,
        contrast_against=_task_contrast_texts(data, cfg),
        freeze_a=cfg.task_freeze_a,
    )
    task_items = [
        QAPairs(FAMILY_OF[d], data.task_pairs[d], [under.get(e) for e in data.fc_under])
        if d == FACT_CHECKING
        else QAPairs(FAMILY_OF[d], data.task_pairs[d], library=_routed_for(d, routed, data.task_context[d], cfg))
        for d in DATASETS
    ]
    fc_cfg = replace(
        tcfg,
        steps=cfg.fc_steps or 2 * cfg.task_steps,
        freeze_a=tcfg.freeze_a and not (cfg.fc_train_a or cfg.fc_a_within),
        a_within=cfg.fc_a_within,
    )
    say(
        f"[bold]Task adapters[/]: {len(task_items)} ({cfg.task_steps} steps; fact checking {fc_cfg.steps}) on "
        f"{sum(len(p) for p in data.task_pairs.values())} pairs about {len(data.train_entities)} other entities"
    )
    task_paths = [
        train_adapters(
            model,
            tokenizer,
            [item],
            folders["task"],
            fc_cfg if item.name == FAMILY_OF[FACT_CHECKING] else tcfg,
            progress=progress,
        )[0]
        for item in task_items
    ]
    timings["train_task"] = time.perf_counter() - t

    t = time.perf_counter()
    know_lib = _library(cache, "knowledge", know_paths, model, model_spec, progress)
    task_lib = _library(cache, "task", task_paths, model, model_spec, progress)
    timings["build_libraries"] = time.perf_counter() - t

    # -- questions, retrieval --------------------------------------------------------------------------------------
    questions: list[Question] = [q for d in DATASETS for q in data.questions[d]]
    pages = {e.name: e.page for e in data.entities}
    mentions = {e.name: e.mentions for e in data.entities}
    index = BM25Index(list(pages.values()), list(pages))
    retrieved = [hits[0][0] for hits in index.search([q.example.input for q in questions], k=1)]
    retrieval_top1 = sum(r == q.entity for r, q in zip(retrieved, questions)) / len(questions)
    rag_prompts = [rag_prompt(pages[r], q.prompt) for r, q in zip(retrieved, questions)]
    lengths = [len(tokenizer(q.prompt).input_ids) for q in questions]
    rag_lengths = [len(tokenizer(p).input_ids) for p in rag_prompts]
    order_plain = sorted(range(len(questions)), key=lambda i: (lengths[i], i))
    order_rag = sorted(range(len(questions)), key=lambda i: (rag_lengths[i], i))
    write_questions(out / "questions.jsonl", data)

    # -- evaluation ------------------------------------------------------------------------------------------
    methods = method_list(cfg, n)
    layers = model.config.num_hidden_layers
    job = AnswerJob(
        methods,
        ("token", "sequence") if cfg.granularity == "both" else (cfg.granularity,),
        questions,
        retrieved,
        rag_prompts,
        order_plain,
        order_rag,
        mentions,
        cfg,
        layers,
        {"task": str(task_lib.path), "knowledge": str(know_lib.path)},
        progress=progress,
    )
    dtype = getattr(torch, cfg.eval_dtype)
    eval_model = model if model.dtype == dtype else copy.deepcopy(model).to(dtype)  # the caller's model stays
    runner = None
    if ray is not None and ray is not False:
        from loralag.cluster.connect import connect, worker_count
        from loralag.experiments.lama.answering import bench_shares

        connect(ray)
        workers, runner = worker_count(workers, 1), bench_shares(ray)
    workers = default_workers(math.ceil(len(questions) / cfg.batch_size)) if workers is None else workers
    t = time.perf_counter()
    share = answer_questions(job, eval_model, tokenizer, workers, libs=library_set(task_lib, know_lib), runner=runner)
    timings["evaluate"] = time.perf_counter() - t
    answers, served, stats, method_time = share.answers, share.served, RoutingStats(share.stats), share.seconds
    for m in methods:
        if m.reuse is None:
            say(f"  {m.name}: {method_time[m.name]:.1f} s ({', '.join(answer_names(m, job.grans))})")
            continue
        for name in answer_names(m, job.grans):
            src = name.replace(m.name, m.reuse, 1)
            answers[name] = answers[src]
            if src in served:
                served[name] = served[src]
            if src in stats.data:
                stats.data[name] = stats.data[src]
        say(f"  {m.name}: identical to {m.reuse} (k >= N), answers reused")

    # -- scores ------------------------------------------------------------------------------------------------
    scores: dict[str, dict] = {}
    table: dict[str, dict] = {}
    # per method and dataset, "1"/"0" per question (question_ids' order): right or wrong as the score counts it,
    # so two runs compare question by question from results.json alone (benchmarks/compare_runs.py)
    right: dict[str, dict[str, str]] = {}
    question_ids = {d: [q.example.id for q in questions if q.dataset == d] for d in DATASETS}
    pred_dir = out / "predictions"
    for name, raw in answers.items():
        scores[name] = {}
        table[name] = {}
        for d in DATASETS:
            idx = [i for i, q in enumerate(questions) if q.dataset == d]
            if not idx:
                continue
            examples = [questions[i].example for i in idx]
            cleaned = {}
            for i in idx:
                text = raw[i] or ""
                # a verdict may follow a recalled object that holds a period ("St. Louis, so SUPPORTS"): whole line
                cleaned[questions[i].example.id] = (
                    fc_label(text.strip().split("\n")[0]) if d == FACT_CHECKING else clean_answer(text)
                )
            final = {
                k: credited(v, ex.answers) if cfg.credit_prefix and d != FACT_CHECKING else v
                for (k, v), ex in zip(cleaned.items(), examples)
            }
            metric = "em" if d in (SLOT_FILLING, QA) else "accuracy"  # KILT's: FEVER, AIDA and WNED by accuracy
            res = score_dataset(examples, final, task=d, metric=metric, per_example=True)
            right.setdefault(name, {})[d] = "".join(str(int(v)) for v in res.pop("per_example"))
            strict = score_dataset(examples, cleaned, task=d, metric=metric)
            res["strict"] = strict["score"]
            scores[name][d] = res
            table[name][d] = (res["score"], res["n"])
            slug_name = name.replace("/", "-").replace("@", "-k")
            write_kilt_predictions(pred_dir / slug_name / f"{d}.jsonl", final)
            with open(pred_dir / slug_name / f"{d}.generations.jsonl", "w", encoding="utf-8") as fh:
                for i in idx:
                    q = questions[i]
                    fh.write(
                        json.dumps(
                            {
                                "id": q.example.id,
                                "prompt": rag_prompts[i] if name.startswith(("rag", "r-lag")) else q.prompt,
                                "generation": raw[i],
                                "answer": final[q.example.id],
                                "gold": q.example.answers,
                                "entity": q.entity,
                                "retrieved": retrieved[i],
                                **({"served": served[name][i]} if i in served.get(name, {}) else {}),
                            },
                            ensure_ascii=False,
                        )
                        + "\n"
                    )
    normalised, zero = normalise(table)
    gain = gain_fractions(normalised)
    routing = stats.summary()
    timings["total"] = time.perf_counter() - t_all

    settings = {
        "size": size_name,
        "config": _jsonable(asdict(cfg)),
        "data_dir": str(data_dir),
        "out_dir": str(out),
        "cache_dir": str(cache),
        "model": model_spec,
        "knowledge_library": str(know_lib.path),
        "task_library": str(task_lib.path),
        "n_knowledge_adapters": len(know_lib),
        "task_adapters": task_lib.names,
        "methods": list(answers),
        "p_lag_definition": PLAG_NOTE,
        "task_training": _TRAINING_NOTE
        + (" Here (fc_all_under) every bare fact trains under its entity's adapter." if cfg.fc_all_under else "")
        + (
            " Here (fc_under_train) every claim about a training entity trains bare under that entity's adapter, "
            "every other claim with its page in front, all of them."
            if cfg.fc_under_train
            else ""
        )
        + (f" Each fact is stated falsely with {cfg.fc_false} wrong objects (fc_false)." if cfg.fc_false != 1 else "")
        + (
            " The fact-checking adapter trains A too (fc_train_a)."
            if cfg.fc_train_a and cfg.task_freeze_a and not cfg.fc_a_within
            else ""
        )
        + (
            f" The fact-checking adapter trains A within its init's top {cfg.fc_a_within} directions (fc_a_within)."
            if cfg.fc_a_within
            else ""
        )
        + _task_under_note(cfg)
        + (" The task adapters train B alone, A kept at its init (task_freeze_a)." if cfg.task_freeze_a else ""),
        "answer_checking": _CHECKING_NOTE + (" Prefix credit on." if cfg.credit_prefix else " Prefix credit off."),
        "generation": {"greedy": True, "max_new_tokens": cfg.max_new_tokens, "stop": list(ANSWER_STOP)},
        "torch_threads": torch.get_num_threads(),
        "eval_workers": workers,
        "eval_dtype": cfg.eval_dtype,
    }
    results = {
        "settings": settings,
        "data": describe(data),
        "scores": scores,
        "table": {m: {d: v[0] for d, v in r.items()} for m, r in table.items()},
        "question_ids": {d: ids for d, ids in question_ids.items() if ids},
        "right": right,
        "normalised": normalised,
        "routing": routing,
        "retrieval_top1": retrieval_top1,
        "claims_known_by_base": claims_known,
        "floor": normalised.get("base"),
        "not_normalised": zero,
        "gain": gain,
        "k_sweep": k_sweep(methods, normalised, routing, cfg, n),
        "timings": {**timings, "methods": method_time},
        "sequence_answers_reused": share.reused,
    }
    results["findings"] = findings(results, cfg)
    if "oracle" in right and "error" not in normalised:
        results["intervals"] = score_intervals(results)
    (out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(report_markdown(results))
    plot_k_sweep(results, out / "k_sweep.png")
    plot_routing(results, out / "routing_by_layer.png", layers)
    say(f"[bold]Results[/] in {out} ({timings['total']:.0f} s)")
    return results


_TRAINING_NOTE = (
    "Task adapters learn from entities outside the knowledge set; one training fact in `context_every` "
    "comes with its page (title, then article) in front (RAG form). Fact checking trains on true/false "
    "claim pairs about the same fact (twice the other families' pairs, fc_steps steps), answered in fc_form (the bare "
    "label, or the recalled object then the verdict). Of those without context, the first fc_bare_facts "
    "are trained under the training entity's own knowledge adapter (frozen), so the adapter learns to "
    "check a claim against what a knowledge adapter injects, as at test time; the rest only for facts "
    "the base model already ranks right (log p(true) > log p(false)), without an adapter. Entity "
    "linking trains on other entities' evidence sentences with a mention marked."
)
_CHECKING_NOTE = (
    "Slot filling and QA: KILT exact match of the answer cut at its first line and sentence end; "
    "entity linking: KILT accuracy (the cut answer equals the subject's title); fact checking: the "
    "verdict (SUPPORTS/REFUTES, any case, at the start of the answer's first line, else the last one it "
    "names) must equal the gold label; an answer without one is wrong. Gold answers: obj_label plus the "
    "article's surface forms that name it in full."
)


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))
