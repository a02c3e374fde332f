"""Answering every question with every method, in one process or several (each worker opens the libraries
itself and answers a share of the batches).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tqdm.auto import tqdm

from loralag.evaluation.answers import ANSWER_STOP
from loralag.experiments.lama.config import BenchConfig, Method
from loralag.experiments.lama.data import FAMILY_OF
from loralag.experiments.lama.routing_stats import (
    RoutingStats,
    answer_mask,
    subject_mask,
    votes_from_trace,
)
from loralag.workers import spawn_pool


def torch_no_grad(fn):
    def wrapper(*args, **kwargs):
        import torch

        with torch.no_grad():
            return fn(*args, **kwargs)

    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


def _batches(items: list, size: int):
    for s in range(0, len(items), size):
        yield items[s : s + size]


@torch_no_grad
def sequence_logprobs(model, tokenizer, texts: list[str], batch_size: int = 32) -> list[float]:
    """log p(text) under the model (sum over its tokens after the first), batched with left padding."""

    out = []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    try:
        for batch in _batches(texts, batch_size):
            enc = tokenizer(batch, return_tensors="pt", padding=True)
            ids, mask = enc["input_ids"], enc["attention_mask"]
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            lp = logits.log_softmax(-1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
            out += (lp * (mask[:, 1:] * mask[:, :-1])).sum(1).tolist()
    finally:
        tokenizer.padding_side = side
    return out


def known_claims(model, tokenizer, claims) -> list[bool]:
    """Per claim pair: does the base model find the true claim more likely than the false one?"""
    if not claims:
        return []
    lp = sequence_logprobs(model, tokenizer, [t for c in claims for t in (c.true, c.false)])
    return [lp[2 * i] > lp[2 * i + 1] for i in range(len(claims))]


# -- answering, in one process or several ------------------------------------------------------------------------
@dataclass
class AnswerJob:
    """Everything answering the questions needs besides the model (picklable: it travels to worker processes)."""

    methods: list  # Method, in table order
    grans: tuple  # "token" and/or "sequence"
    questions: list
    retrieved: list  # BM25 top-1 entity per question
    rag_prompts: list
    order_plain: list  # question indices sorted by prompt length: batches of similar length pad little
    order_rag: list
    mentions: dict
    cfg: BenchConfig
    layers: int
    library_paths: dict  # "task", "knowledge" -> library folder
    progress: bool = False  # a bar of the batches answered (share 0's when several share the work)


@dataclass
class AnswerShare:
    """Answers of some batches of every method (None elsewhere), their routing counts, and seconds per method."""

    answers: dict
    stats: dict
    served: dict
    reused: int
    seconds: dict


def default_workers(batches: int) -> int:
    """Two processes of half the threads each when torch has two threads or more and each gets a few of the
    `batches` per method: on 2 cores two single-threaded workers answer 1.33x faster than one process with two
    threads (generation is many small ops; training, whose batches keep two threads busy, gains nothing:
    benchmarks/results/train-workers).
    Starting one costs seconds (imports), so small runs keep one."""
    import torch

    return 2 if torch.get_num_threads() >= 2 and batches >= 8 else 1


def answer_names(m: Method, grans) -> list[str]:
    """The answer columns of method m: per token (m.name), per sequence ("/seq"), task by vote ("/seq-task")."""
    names = [m.name] if m.name in ("base", "oracle") or "token" in grans else []
    if m.routed and m.sequence and "sequence" in grans:
        names.append(f"{m.name}/seq")
        if m.mixed and len(m.routed) == 2:
            names.append(f"{m.name}/seq-task")
    return names


def answer_questions(
    job: AnswerJob, model, tokenizer, workers: int | None = 1, libs: dict | None = None, runner=None
) -> AnswerShare:
    """Every method's answers (methods that reuse another's are left to the caller). With workers > 1, each of
    that many spawned processes takes every workers-th batch of every method, so a question's sequence-mode
    generations stay in one process's memo; the model's weights are shared with them, not copied.
    libs: the job's libraries already open here (one process uses them; workers open their own).
    runner(job, model, tokenizer, workers): answers the shares elsewhere and returns them instead of processes
    here (bench_shares: as Ray tasks; workers None: as many as the cluster holds)."""
    import torch

    if runner is not None:
        return _merge_shares(runner(job, model, tokenizer, workers), len(job.questions))

    if workers <= 1:
        return _answer_share(job, model, tokenizer, libs or _open_libraries(job), 0, 1)
    threads = max(1, torch.get_num_threads() // workers)
    model.share_memory()
    with spawn_pool(workers) as pool:
        shares = list(
            pool.map(_share_worker, *zip(*[(job, model, tokenizer, w, workers, threads) for w in range(workers)]))
        )
    return _merge_shares(shares, len(job.questions))


def _open_libraries(job: AnswerJob) -> dict:
    from loralag.library.store import open_library

    return library_set(open_library(job.library_paths["task"]), open_library(job.library_paths["knowledge"]))


def library_set(task, knowledge) -> dict:
    """The libraries as the routing state names them: P-LAG's retrieved adapter comes from the knowledge one."""
    return {"task": task, "knowledge": knowledge, "prag": knowledge}


def _share_worker(job: AnswerJob, model, tokenizer, share: int, shares: int, threads: int) -> AnswerShare:
    import torch

    torch.set_num_threads(threads)
    return _answer_share(job, model, tokenizer, _open_libraries(job), share, shares)


@torch_no_grad
def _answer_share(job: AnswerJob, model, tokenizer, libs: dict, share: int, shares: int) -> AnswerShare:
    from loralag.routing.state import attach, detach

    stats, memo = RoutingStats(), FixedGenerations()
    answers: dict[str, list] = {}
    served: dict[str, dict[int, dict]] = {}  # sequence-mode method -> question -> the adapters it served
    seconds: dict[str, float] = {}
    state = attach(model, libs, router="none", k=job.cfg.k)
    run = [m for m in job.methods if m.reuse is None]
    batches = {
        m.name: list(_batches(job.order_rag if m.rag else job.order_plain, job.cfg.batch_size))[share::shares]
        for m in run
    }
    where = "" if shares == 1 else f" (share 1 of {shares})"
    bar = tqdm(
        total=sum(map(len, batches.values())), unit="batch", disable=not (job.progress and share == 0), leave=False
    )
    try:
        for m in run:
            t = time.perf_counter()
            bar.set_description(f"answering: {m.name}{where}")
            names = answer_names(m, job.grans)
            for name in names:
                answers[name] = [None] * len(job.questions)
            with state.configure():  # each method routes as it says, then hands the state back as it was
                _run_method(
                    _Share(job, model, tokenizer, state, stats, memo, answers, served), m, names, batches[m.name], bar
                )
            seconds[m.name] = time.perf_counter() - t
    finally:
        bar.close()
        detach(model)
    return AnswerShare(answers, stats.data, served, memo.reused, seconds)


def _merge_shares(shares: list[AnswerShare], n: int) -> AnswerShare:
    """One share from several: answers and served adapters by question, counts summed, a method's seconds the
    slowest worker's (they run side by side)."""
    answers: dict[str, list] = {}
    served: dict[str, dict] = {}
    stats = RoutingStats()
    for sh in shares:
        for name, texts in sh.answers.items():
            out = answers.setdefault(name, [None] * n)
            for i, text in enumerate(texts):
                if text is not None:
                    out[i] = text
        for name, by_question in sh.served.items():
            served.setdefault(name, {}).update(by_question)
        stats.merge(sh.stats)
    seconds = {m: max(sh.seconds[m] for sh in shares) for m in shares[0].seconds}
    return AnswerShare(answers, stats.data, served, sum(sh.reused for sh in shares), seconds)


@dataclass
class _Share:
    """One worker's answering: the job, the model with its routing state, and what it has gathered so far."""

    job: AnswerJob
    model: object
    tokenizer: object
    state: object  # RoutingState
    stats: RoutingStats
    memo: FixedGenerations
    answers: dict  # answer column -> per question text
    served: dict  # sequence-mode method -> question -> the adapters it served


def _ticking(items, bar):
    """The items, moving `bar` on by one as each is done (also when the loop body `continue`s)."""
    for item in items:
        yield item
        if bar is not None:
            bar.update(1)


def _run_method(share: _Share, m: Method, names: list[str], batches: list[list[int]], bar=None) -> None:
    """Answer the questions of `batches` (lists of question indices) with method m, per token and/or per sequence,
    recording routing statistics.

    memo: generations with fixed adapters, shared across methods. Sequence modes whose votes
    agree (with each other or with the Oracle's gold pair) serve the same adapters to the same prompt, so
    each such generation runs once; in another batch the padding differs, which greedy decoding is
    insensitive to up to float rounding. served: per sequence-mode method and question, the adapters it served."""
    from loralag.generate import encode_prompts, generate

    job, state, model, tokenizer = share.job, share.state, share.model, share.tokenizer
    questions, retrieved, rag_prompts, mentions = job.questions, job.retrieved, job.rag_prompts, job.mentions
    cfg, layers = job.cfg, job.layers
    stats, answers, memo, served = share.stats, share.answers, share.memo, share.served

    kw = dict(max_new_tokens=cfg.max_new_tokens, chat=False, stop=list(ANSWER_STOP))
    token_name = names[0] if not names[0].endswith("/seq") else None
    seq_name = f"{m.name}/seq" if f"{m.name}/seq" in names else None
    for batch in _ticking(batches, bar):
        prompts = [rag_prompts[i] if m.rag else questions[i].prompt for i in batch]
        gold_know = [questions[i].entity for i in batch]
        gold_task = [FAMILY_OF[questions[i].dataset] for i in batch]
        _configure(state, m, cfg, gold_know, gold_task, [retrieved[i] for i in batch])
        votes = None
        if token_name is not None:
            texts, trace = generate(model, tokenizer, prompts, trace=True, **kw)
            for i, text in zip(batch, texts):
                answers[token_name][i] = text
                key = _fixed_key(m, i, questions, retrieved)
                if key is not None:  # base, Oracle: the sequence modes reuse these
                    memo.texts[key] = text
            if m.routed and trace is not None:
                width = trace.prompt_length
                pmask = trace.attention_mask[:, :width]
                smask = subject_mask(
                    tokenizer, prompts, [mentions[questions[i].entity] for i in batch], width, lengths=pmask.sum(1)
                )
                amask = answer_mask(trace)
                for lib, gold in (("knowledge", gold_know), ("task", gold_task)):
                    if lib in m.routed:
                        stats.add_trace(token_name, lib, trace, gold, pmask, smask, layers, amask)
                if seq_name is not None:
                    votes = {lib: votes_from_trace(trace, lib, pmask) for lib in m.routed}
        if seq_name is None:
            continue
        if votes is None:  # sequence granularity alone: RoutingState.vote runs the prompts once
            enc = encode_prompts(tokenizer, prompts, chat=False)
            all_votes = state.vote(enc["input_ids"], enc["attention_mask"])
            votes = {lib: all_votes[lib] for lib in m.routed}
        mixed_name = f"{m.name}/seq-task"
        if mixed_name in names:  # the task adapter by vote, the knowledge library still per token
            state.set_router("task", "fixed", fixed=list(votes["task"]))
            texts = generate(model, tokenizer, prompts, **kw)
            for i, text in zip(batch, texts):
                answers[mixed_name][i] = text
        for lib in m.routed:
            gold = gold_know if lib == "knowledge" else gold_task
            stats.add_votes(seq_name, lib, votes[lib], gold, layers)
        # served whole by fixed adapters: generate only what no method has generated with the same adapters
        keys = [
            _fixed_key(m, i, questions, retrieved, {lib: votes[lib][b] for lib in m.routed})
            for b, i in enumerate(batch)
        ]
        todo = [b for b, key in enumerate(keys) if key not in memo.texts]
        if todo:
            _configure(
                state,
                m,
                cfg,
                [gold_know[b] for b in todo],
                [gold_task[b] for b in todo],
                [retrieved[batch[b]] for b in todo],
            )
            for lib in m.routed:
                state.set_router(lib, "fixed", fixed=[votes[lib][b] for b in todo])
            for b, text in zip(todo, generate(model, tokenizer, [prompts[b] for b in todo], **kw)):
                memo.texts[keys[b]] = text
        memo.reused += len(batch) - len(todo)
        for b, i in enumerate(batch):
            answers[seq_name][i] = memo.texts[keys[b]]
            served.setdefault(seq_name, {})[i] = {"knowledge": keys[b][2], "task": keys[b][3]}


@dataclass
class FixedGenerations:
    """Generations with fixed adapters by _fixed_key, shared across methods; `reused`: answers served from it."""

    texts: dict = field(default_factory=dict)
    reused: int = 0


def _fixed_key(m: Method, i: int, questions, retrieved, votes: dict | None = None) -> tuple | None:
    """Everything a generation of question i depends on when every library is fixed for the whole sequence
    (prompt form, knowledge, task and P-LAG adapters), or None when a library routes per token. votes: the
    sequence mode's adapter per routed library."""
    chosen = {}
    for lib, router in (("knowledge", m.knowledge), ("task", m.task)):
        if router == "none":
            chosen[lib] = None
        elif router == "gold":
            chosen[lib] = questions[i].entity if lib == "knowledge" else FAMILY_OF[questions[i].dataset]
        elif router == "retrieved":
            chosen[lib] = retrieved[i]
        elif votes is not None:
            chosen[lib] = votes[lib]
        else:
            return None
    return i, m.rag, chosen["knowledge"], chosen["task"], retrieved[i] if m.plag else None


def _configure(state, m: Method, cfg: BenchConfig, gold_know, gold_task, retrieved) -> None:
    for lib, router, gold in (("knowledge", m.knowledge, gold_know), ("task", m.task, gold_task)):
        if router == "gold":
            state.fix(lib, gold)
        elif router == "retrieved":
            state.fix(lib, retrieved)
        else:
            k = m.k if lib == "knowledge" else cfg.k
            state.set_router(lib, router, k=k)  # a router other than fixed drops the fixed adapters
    if m.plag:
        state.fix("prag", retrieved)
    else:
        state.set_router("prag", "none")


# -- on a Ray cluster ---------------------------------------------------------------------------------------------
def _bench_share(job, model_and_tokenizer, share: int, shares: int, threads: int):
    from loralag.cluster.connect import setup_worker

    setup_worker(threads)
    model, tokenizer = model_and_tokenizer
    return _answer_share(job, model, tokenizer, _open_libraries(job), share, shares)


def bench_shares(address: str | bool | None = True, workers: int | None = None, threads: int = 1):
    """A `shares` runner for `answer_questions`: runner(job, model, tokenizer, n) answers shares 0..n-1 as Ray
    tasks (n: `workers`, default as many as the cluster's CPUs hold) and returns their AnswerShares."""

    def run(job, model, tokenizer, n: int | None = None):
        from loralag.cluster.connect import connect, get, worker_count

        ray = connect(address)
        n = worker_count(workers if n is None else n, threads)
        remote = ray.remote(num_cpus=threads, max_retries=3)(_bench_share)
        model_ref = ray.put((model, tokenizer))
        return get([remote.remote(job, model_ref, share, n, threads) for share in range(n)])

    return run
