"""`loralag bench`: the paper's knowledge-intensive evaluation, rebuilt on LAMA T-REx at laptop scale.

    results = run_bench("tiny", data_dir="../shared/data/lama-trex", out_dir="results/lama-tiny")

A base LM gets two libraries, routed separately and applied together (Fleshman & Van Durme 2025):

* knowledge: one LoRA per subject entity's article (gate/up/down, rank 6, alpha 12), trained on the article
  and templated synthetic rewrites of it (lama_data.py);
* task: one LoRA per task family (q/k/v/o, rank 8, alpha 16) — slot filling, QA, fact checking, entity
  linking — trained on prompt -> answer pairs about entities *outside* the knowledge set. Fact checking answers
  the bare label, as KILT's FEVER is scored (`fc_form="recall"`, the harder variant, recalls the object
  first); its bare claims train under the training entity's own knowledge adapter (train.QAPairs.under), as at
  test time, and with the article in front.

Every method answers the same questions about the knowledge-set entities:

    base        no adapter (the floor)
    oracle      the gold task adapter and the gold knowledge adapter, through `fixed`
    arrow       Arrow top-1 on both libraries
    lag@k       LAG (Arrow top-k filter, SpectR pick) on both libraries; "lag" is k=20, the sweep k=1..N
    lag-prefix  per token, the adapter LAG picked most over the sequence so far (prefix_evidence.py; ours)
    spectral    SpectR over the whole library (= lag@N, which reuses its answers)
    arrow-mix   PEFT Arrow: softmax-weighted top-k mixture
    rag         BM25 top-1 article prepended to the prompt; task adapter by LAG, no knowledge adapter
    prag        BM25 top-1 article's knowledge adapter through `fixed`; task adapter by LAG
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

import concurrent.futures
import copy
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

from .errors import LoralagError
from .lama_data import (DATASETS, FACT_CHECKING, QA, SLOT_FILLING, FAMILY_OF, FC_FORMS, REFUTES, SUPPORTS, Question, build_data,
                        describe, fact_checking_pairs, rag_prompt, rewrites, write_questions)

PLAG_NOTE = ("P-LAG: LAG routes both libraries per token exactly as in `lag`, and the BM25 top-1 article's knowledge "
             "adapter is added on every token and layer on top of LAG's pick (the two deltas are summed; when LAG "
             "picks the retrieved adapter itself it counts twice).")
TASK_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
KNOWLEDGE_MODULES = ("gate_proj", "up_proj", "down_proj")
GRANULARITIES = ("token", "sequence", "both")
EVAL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass
class BenchConfig:
    """Everything a run depends on; a size is a preset of these."""

    n_entities: int = 200  # knowledge adapters, one per subject entity
    questions_per_dataset: int | None = None  # default: one per knowledge entity
    n_train_pairs: int = 200  # task-adapter training pairs per family
    context_every: int = 3  # one task-training prompt in this many has its entity's article in front (RAG form)
    fc_bare_facts: int = 48  # bare fact-checking training facts, each under its entity's own knowledge adapter
    fc_steps: int | None = None  # the fact-checking task adapter's steps (None: 2 × task_steps: 2 pairs per fact)
    fc_form: str = "label"  # fact checking answers the bare label (FEVER's); "recall": object, then verdict
    seed: int = 0
    shared_init: bool = False  # every adapter from one LoRA init (loralag 0.1's way), to measure what distinct ones do
    max_article_chars: int = 400
    # knowledge adapters
    know_r: int = 6
    know_alpha: int = 12
    know_steps: int = 12
    know_lr: float = 2e-3
    know_batch: int = 4
    # task adapters
    task_r: int = 8
    task_alpha: int = 16
    task_steps: int = 80
    task_lr: float = 2e-3
    task_batch: int = 4
    # evaluation
    k: int = 20  # the headline LAG's k
    k_sweep: tuple = (1, 2, 5, 10, 20, 50, "N")
    granularity: str = "both"
    methods: tuple | None = None  # None: every method
    max_new_tokens: int = 16  # fact checking recalls the object before its verdict
    batch_size: int = 32
    credit_prefix: bool = True
    # the model's dtype while answering (training always runs in float32); routing runs in the libraries' dtype
    eval_dtype: str = "float32"


SIZES = {
    # a handful of entities: the test suite's end-to-end run
    # (its task adapters see no RAG-form prompt: cheaper, and RAG is not what the tiny run checks)
    "tiny": dict(n_entities=6, n_train_pairs=24, context_every=0, fc_bare_facts=2, know_steps=8, know_lr=3e-3, task_steps=12,
                 task_batch=4, task_lr=3e-3, k_sweep=(1, "N"), max_new_tokens=12),
    # a sanity check at the scale of the earlier 12-adapter measurement
    "small": dict(n_entities=12, n_train_pairs=60, fc_bare_facts=16, task_steps=40, task_batch=4, task_lr=2e-3),
    # the benchmark: 200 knowledge adapters
    # answering in bfloat16: 1.75x faster here (CPUs with AVX512-BF16 or AMX), as such models usually run
    "full": dict(n_entities=200, questions_per_dataset=200, n_train_pairs=200, task_steps=80, task_batch=4,
                 task_lr=2e-3, eval_dtype="bfloat16"),
}

# Answers are read from their first line only, so a sequence stops there (a batch ends when all have).
# A generation that opens with a newline is thus an empty answer: the base model's are empty for 160 of the
# full run's 600 questions (159 of them QA), where it ends the line or the text at once.
ANSWER_STOP = ("\n",)
BASE_METHODS = ("base", "oracle", "arrow", "lag", "lag-prefix", "spectral", "arrow-mix", "rag", "prag", "r-lag",
                "p-lag", "k-sweep")


def size_config(size: str | dict | BenchConfig = "tiny", **overrides) -> BenchConfig:
    """The config of a named size ("tiny", "small", "full"), a dict of fields, or a config; then overrides."""
    if isinstance(size, BenchConfig):
        cfg = size
    elif isinstance(size, dict):
        cfg = BenchConfig(**size)
    elif size in SIZES:
        cfg = BenchConfig(**SIZES[size])
    else:
        raise LoralagError(f"unknown bench size {size!r}; choose one of {sorted(SIZES)} or pass custom parameters")
    known = {f.name for f in fields(BenchConfig)}
    bad = set(overrides) - known
    if bad:
        raise LoralagError(f"unknown bench settings {sorted(bad)}; known: {sorted(known)}")
    cfg = replace(cfg, **{k: v for k, v in overrides.items() if v is not None})
    if cfg.eval_dtype not in EVAL_DTYPES:
        raise LoralagError(f"eval_dtype must be one of {EVAL_DTYPES}, got {cfg.eval_dtype!r}")
    if cfg.granularity not in GRANULARITIES:
        raise LoralagError(f"granularity must be one of {GRANULARITIES}, got {cfg.granularity!r}")
    if cfg.fc_form not in FC_FORMS:
        raise LoralagError(f"fc_form must be one of {FC_FORMS}, got {cfg.fc_form!r}")
    if cfg.n_entities < 2:
        raise LoralagError("the knowledge library needs at least 2 entities")
    if cfg.methods is not None:
        unknown = set(cfg.methods) - set(BASE_METHODS)
        if unknown:
            raise LoralagError(f"unknown methods {sorted(unknown)}; choose from {BASE_METHODS}")
    return cfg


def default_data_dir() -> Path:
    """$LORALAG_LAMA_DATA, else ../shared/data/lama-trex from the working directory or from the repository."""
    env = os.environ.get("LORALAG_LAMA_DATA")
    if env:
        return Path(env)
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = root.parent / "shared" / "data" / "lama-trex"
        if p.is_dir():
            return p
    return Path("../shared/data/lama-trex")


def default_cache_dir() -> Path:
    from .models import cache_dir

    return cache_dir() / "lama_bench"


# -- methods ---------------------------------------------------------------------------------------------------
@dataclass
class Method:
    """How one method routes. knowledge/task: a router name, or "gold" / "retrieved" (through `fixed`)."""

    name: str
    knowledge: str = "none"
    task: str = "none"
    k: int = 20
    rag: bool = False  # the retrieved article goes in the prompt
    plag: bool = False  # the retrieved article's adapter is added on top of the knowledge routing
    reuse: str | None = None  # identical to another method: reuse its answers
    mixed: bool = False  # also run "<name>/seq-task": task library by vote, knowledge library per token
    sequence: bool = True  # also run "<name>/seq" (the sequence vote) where the run asks for it

    @property
    def routed(self) -> list[str]:
        """Libraries routed per token (what the sequence mode votes on)."""
        return [lib for lib, r in (("knowledge", self.knowledge), ("task", self.task))
                if r not in ("none", "gold", "retrieved")]


def method_list(cfg: BenchConfig, n: int) -> list[Method]:
    """The methods of a run, in table order. k values clamp to N; lag@k with k >= N is SpectR over everything."""
    want = set(cfg.methods) if cfg.methods is not None else set(BASE_METHODS)
    kk = min(cfg.k, n)
    lag_name = f"lag@{kk}"
    out = []

    def add(m):
        if m.name not in {x.name for x in out}:
            out.append(m)

    if "base" in want:
        add(Method("base"))
    if "oracle" in want:
        add(Method("oracle", knowledge="gold", task="gold"))
    if "arrow" in want:
        add(Method("arrow", knowledge="arrow", task="arrow", k=1))
    if "lag" in want:
        add(Method(lag_name, knowledge="lag", task="lag", k=kk, reuse="spectral" if kk >= n else None, mixed=True))
    if "lag-prefix" in want:
        # its vote over the prompt is lag's, so no "/seq" of its own
        add(Method(f"lag-prefix@{kk}", knowledge="lag-prefix", task="lag-prefix", k=kk, sequence=False))
    if "spectral" in want or "lag" in want and kk >= n:
        add(Method("spectral", knowledge="spectral", task="spectral", mixed="lag" in want and kk >= n))
    if "arrow-mix" in want:
        add(Method("arrow-mix", knowledge="arrow-mix", task="arrow-mix", k=kk))
    if "k-sweep" in want:
        for k in sweep_ks(cfg, n):
            if k >= n:
                add(Method("spectral", knowledge="spectral", task="spectral", mixed="lag" in want and kk >= n))
            add(Method(f"lag@{k}", knowledge="lag", task="lag", k=k, reuse="spectral" if k >= n else None))
    if "rag" in want:
        add(Method("rag", task="lag", rag=True))
    if "prag" in want:
        add(Method("prag", knowledge="retrieved", task="lag"))
    if "r-lag" in want:
        add(Method("r-lag", knowledge="lag", task="lag", k=kk, rag=True))
    if "p-lag" in want:
        add(Method("p-lag", knowledge="lag", task="lag", k=kk, plag=True))
    # a reused method must come after what it reuses
    order = {m.name: i for i, m in enumerate(out)}
    out.sort(key=lambda m: order[m.reuse] + 0.5 if m.reuse else order[m.name])
    return out


def sweep_ks(cfg: BenchConfig, n: int) -> list[int]:
    ks = sorted({min(n, n if k == "N" else int(k)) for k in cfg.k_sweep})
    return [k for k in ks if k >= 1]


# -- answers ---------------------------------------------------------------------------------------------------
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]]{3})\.(?:\s|$)")


def clean_answer(text: str) -> str:
    """The short answer in a generation: its first non-empty line, cut at the first sentence end.

    A period ends a sentence only after 3+ lower-case letters/digits ("Paris. It" -> "Paris"), so "St. Louis"
    and "U.S. Army" stay whole."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    if not lines:
        return ""
    first = lines[0]
    m = _SENTENCE_END.search(first)
    if m:
        first = first[: m.start()]
    return first.strip().rstrip(".").strip()


def fc_label(answer: str) -> str:
    """The fact-checking verdict: SUPPORTS / REFUTES when the answer starts with one (any case), else the last one
    it names as a word (a verdict after a rationale: "Paris, so SUPPORTS"), else the answer as is."""
    head = answer.strip().upper()
    for label in (SUPPORTS, REFUTES):
        if head.startswith(label):
            return label
    named = re.findall(rf"\b({SUPPORTS}|{REFUTES})\b", head)
    return named[-1] if named else answer.strip()


def credited(answer: str, golds: list[str]) -> str:
    """The gold answer whose normalised form starts the normalised answer at a word boundary, else the answer."""
    from .kilt import normalize_answer

    a = normalize_answer(answer)
    for g in golds:
        ng = normalize_answer(g)
        if ng and (a == ng or a.startswith(ng + " ")):
            return g
    return answer


# -- routing statistics ----------------------------------------------------------------------------------------
def layer_of(module: str) -> int:
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return -1


def subject_mask(tokenizer, prompts: list[str], mentions: list[list[str]], width: int, lengths=None):
    """(batch, width) bool: prompt tokens that overlap a mention of the subject, for left-padded prompts.

    lengths: the real tokens of each prompt in the batch that was run (checked against this tokenization)."""
    import torch

    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, (prompt, names) in enumerate(zip(prompts, mentions)):
        enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
        n = len(enc["input_ids"])
        if lengths is not None and int(lengths[i]) != n:
            raise RuntimeError(f"prompt {i} has {int(lengths[i])} tokens in the batch but {n} alone")
        pad = width - n
        spans = []
        for name in sorted(set(names), key=len, reverse=True):
            for m in re.finditer(re.escape(name), prompt):
                spans.append((m.start(), m.end()))
        for t, (a, b) in enumerate(enc["offset_mapping"]):
            if b > a and any(a < e and b > s for s, e in spans):
                mask[i, pad + t] = True
    return mask


def answer_mask(trace):
    """(batch, decisions) bool: the routing decisions that produced a real answer token. The decision at column c
    (the last prompt token, then each generated token fed back) yields token c + 1, so it counts where that
    token is real (generate's mask: up to and including the first end token)."""
    import torch

    width = trace.winner_matrix(*trace.keys[0]).shape[1]
    full = trace.attention_mask.bool()
    mask = torch.zeros(full.shape[0], width, dtype=torch.bool)
    start = trace.prompt_length - 1
    stop = min(width, full.shape[1] - 1)
    mask[:, start:stop] = full[:, start + 1 : stop + 1]
    return mask


def votes_from_trace(trace, library: str, prompt_mask) -> list[str | None]:
    """RoutingState.vote's rule on an existing trace: per sequence, the adapter that won most (token, module)
    decisions over the real prompt tokens; ties to the name that sorts first."""
    import torch

    width = trace.winner_matrix(trace.modules(library)[0], library).shape[1]
    out = []
    for seq in range(prompt_mask.shape[0]):
        mask = torch.zeros(width, dtype=torch.bool)
        mask[: prompt_mask.shape[1]] = prompt_mask[seq].bool()
        counts = trace.counts(library, seq, mask)
        out.append(min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else None)
    return out


class RoutingStats:
    """Per method and library: per layer, decisions routed to the gold adapter among subject tokens, prompt tokens
    and answer positions (the decisions that produced an answer token)."""

    def __init__(self, data: dict | None = None):
        self.data: dict = data if data is not None else {}

    def merge(self, other: dict) -> None:
        """Add another share's counts (same questions never counted twice: shares split the batches)."""
        for method, libs in other.items():
            for lib, d in libs.items():
                mine = self.data.setdefault(method, {}).setdefault(lib, None)
                if mine is None:
                    self.data[method][lib] = copy.deepcopy(d)
                    continue
                for key, v in d.items():
                    mine[key] = [a + b for a, b in zip(mine[key], v)] if isinstance(v, list) else mine[key] + v

    def _slot(self, method: str, lib: str, layers: int) -> dict:
        d = self.data.setdefault(method, {}).setdefault(lib, {})
        if not d:
            d.update(subject_hits=[0] * layers, subject_total=[0] * layers, prompt_hits=[0] * layers,
                     prompt_total=[0] * layers, answer_hits=[0] * layers, answer_total=[0] * layers,
                     vote_hits=0, vote_total=0)
        return d

    def add_trace(self, method: str, lib: str, trace, gold: list[str], prompt_mask, subj_mask, layers: int,
                  answer=None) -> None:
        import torch

        d = self._slot(method, lib, layers)
        width = prompt_mask.shape[1]
        for module in trace.modules(lib):
            names = trace.names[(module, lib)]
            index = {n: i for i, n in enumerate(names)}
            g = torch.tensor([index.get(x, -2) for x in gold]).unsqueeze(1)
            full = trace.winner_matrix(module, lib)
            w = full[:, :width]
            hit = w == g
            if answer is not None:
                d["answer_hits"][layer_of(module)] += int(((full == g) & answer).sum())
                d["answer_total"][layer_of(module)] += int(answer.sum())
            L = layer_of(module)
            pm, sm = prompt_mask.bool(), subj_mask.bool() & prompt_mask.bool()
            d["prompt_hits"][L] += int((hit & pm).sum())
            d["prompt_total"][L] += int(pm.sum())
            d["subject_hits"][L] += int((hit & sm).sum())
            d["subject_total"][L] += int(sm.sum())

    def add_votes(self, method: str, lib: str, votes: list, gold: list[str], layers: int) -> None:
        d = self._slot(method, lib, layers)
        d["vote_hits"] += sum(v == g for v, g in zip(votes, gold))
        d["vote_total"] += len(gold)

    def summary(self) -> dict:
        out = {}
        for method, libs in self.data.items():
            for lib, d in libs.items():
                def share(h, t):
                    return [hh / tt if tt else None for hh, tt in zip(h, t)]

                sh, th = sum(d["subject_hits"]), sum(d["subject_total"])
                ph, pt = sum(d["prompt_hits"]), sum(d["prompt_total"])
                ah, at = sum(d.get("answer_hits", [0])), sum(d.get("answer_total", [0]))
                out.setdefault(method, {})[lib] = {
                    "subject_by_layer": share(d["subject_hits"], d["subject_total"]),
                    "prompt_by_layer": share(d["prompt_hits"], d["prompt_total"]),
                    "answer_by_layer": share(d.get("answer_hits", []), d.get("answer_total", [])),
                    "subject": sh / th if th else None,
                    "prompt": ph / pt if pt else None,
                    "answer": ah / at if at else None,
                    "subject_tokens": th,
                    "vote": d["vote_hits"] / d["vote_total"] if d["vote_total"] else None,
                    "vote_hits": d["vote_hits"],
                    "vote_total": d["vote_total"],
                }
        return out


# -- the run ---------------------------------------------------------------------------------------------------
def _fingerprint(paths: list[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths, key=lambda p: p.name):
        marker = p / "loralag_train.json"
        key = json.loads(marker.read_text()).get("key", "") if marker.is_file() else ""
        h.update(f"{p.name}:{key}\n".encode())
    return h.hexdigest()[:12]


def _library(cache: Path, kind: str, paths: list[Path], model, model_spec: str, progress: bool):
    from .library import build_library, module_shapes

    path = cache / "libraries" / f"{kind}-{len(paths)}-{_fingerprint(paths)}"
    lib = build_library(path, paths, base_model=model_spec, shapes=module_shapes(model), replace=True,
                        progress=progress)
    stale = sorted(set(lib.names) - {p.name for p in paths})
    if stale:
        lib.remove(stale)
    return lib


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


def run_bench(size: str | dict | BenchConfig = "tiny", data_dir: str | Path | None = None,
              out_dir: str | Path | None = None, model_spec: str = "default", cache_dir: str | Path | None = None,
              progress: bool = True, console=None, model_and_tokenizer=None, threads: int | None = None,
              workers: int | None = None, **overrides) -> dict:
    """Train (cached) the knowledge and task adapters, build the libraries, answer every question with every
    method, and write the results folder. Returns the results dict (also written as results.json).

    size: "tiny" | "small" | "full", a dict of BenchConfig fields, or a BenchConfig; overrides: BenchConfig
    fields (e.g. n_entities=50, granularity="sequence", methods=("base", "oracle", "lag")).
    data_dir: a folder of LAMA T-REx jsonl files (+ relations.json); default default_data_dir().
    out_dir: the results folder (default results/lama-<size>). cache_dir: trained adapters and libraries,
    shared across runs (default <loralag cache>/lama_bench). model_and_tokenizer: an already loaded pair.
    threads: torch CPU threads for the run (default: torch's; 1 is faster on a machine other jobs keep busy).
    workers: processes that answer the questions, each on its share of the batches with threads // workers
    threads (default_workers: two for 8+ batches per method); the results do not depend on it beyond float
    rounding. With workers > 1 a calling script needs the usual `if __name__ == "__main__":` guard (spawn)."""
    import torch

    old_threads = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _run(size, data_dir, out_dir, model_spec, cache_dir, progress, console, model_and_tokenizer, workers,
                    overrides)
    finally:
        torch.set_num_threads(old_threads)


def _run(size, data_dir, out_dir, model_spec, cache_dir, progress, console, model_and_tokenizer, workers,
         overrides) -> dict:
    import torch

    from .kilt import score_dataset, write_kilt_predictions
    from .models import load_model
    from .retrieval import BM25Index
    from .train import Document, QAPairs, TrainConfig, train_adapters

    cfg = size_config(size, **overrides)
    size_name = size if isinstance(size, str) else "custom"
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    out = Path(out_dir) if out_dir is not None else Path("results") / f"lama-{size_name}"
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out.mkdir(parents=True, exist_ok=True)
    say = console.print if console is not None else (lambda *a, **k: None)
    timings: dict[str, float] = {}
    t_all = time.perf_counter()

    # -- data ------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    data = build_data(data_dir, cfg.n_entities, cfg.questions_per_dataset, cfg.n_train_pairs, cfg.seed,
                      cfg.max_article_chars, context_every=cfg.context_every, fc_bare_facts=cfg.fc_bare_facts,
                      fc_form=cfg.fc_form)
    timings["data"] = time.perf_counter() - t
    n = len(data.entities)
    say(f"[bold]LAMA bench[/] ({size_name}): {n} knowledge entities, "
        + ", ".join(f"{len(q)} {d}" for d, q in data.questions.items()) + f" questions; data from {data_dir}")

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
    fc = fact_checking_pairs(data.claims, 2 * cfg.n_train_pairs, cfg.context_every, cfg.fc_bare_facts, known,
                             form=cfg.fc_form)
    data.task_pairs[FACT_CHECKING] = [(prompt, answer) for prompt, answer, _ in fc]
    data.fc_under = [under for _, _, under in fc]
    claims_known = sum(known) / len(known) if known else None
    timings["score_claims"] = time.perf_counter() - t

    # -- adapters (cached) --------------------------------------------------------------------------------------
    t = time.perf_counter()
    kcfg = TrainConfig(target_modules=list(KNOWLEDGE_MODULES), r=cfg.know_r, alpha=cfg.know_alpha,
                       steps=cfg.know_steps, batch_size=cfg.know_batch, lr=cfg.know_lr, seed=cfg.seed,
                       shared_init=cfg.shared_init)
    docs = [Document(e.name, e.article, rewrites(e, data.relations)) for e in data.entities]
    say(f"[bold]Knowledge adapters[/]: {len(docs)} × {cfg.know_steps} steps (cached in {cache / 'knowledge'})")
    know_paths = train_adapters(model, tokenizer, docs, cache / "knowledge", kcfg, progress=progress)
    timings["train_knowledge"] = time.perf_counter() - t

    # bare fact-checking claims train under their (training) entity's own knowledge adapter, trained alike
    t = time.perf_counter()
    fc_entities = sorted({e for e in data.fc_under if e is not None})
    say(f"[bold]Knowledge adapters of fact-checking training entities[/]: {len(fc_entities)} "
        f"(cached in {cache / 'train-knowledge'})")
    pool = {e.name: e for e in data.train_entities}
    fc_docs = [Document(name, pool[name].article, rewrites(pool[name], data.relations)) for name in fc_entities]
    under = dict(zip(fc_entities, train_adapters(model, tokenizer, fc_docs, cache / "train-knowledge", kcfg,
                                                 progress=progress)))
    timings["train_fc_knowledge"] = time.perf_counter() - t

    t = time.perf_counter()
    tcfg = TrainConfig(target_modules=list(TASK_MODULES), r=cfg.task_r, alpha=cfg.task_alpha, steps=cfg.task_steps,
                       batch_size=cfg.task_batch, lr=cfg.task_lr, seed=cfg.seed, shared_init=cfg.shared_init)
    task_items = [QAPairs(FAMILY_OF[d], data.task_pairs[d],
                          [under.get(e) for e in data.fc_under] if d == FACT_CHECKING else None) for d in DATASETS]
    fc_cfg = replace(tcfg, steps=cfg.fc_steps or 2 * cfg.task_steps)
    say(f"[bold]Task adapters[/]: {len(task_items)} ({cfg.task_steps} steps; fact checking {fc_cfg.steps}) on "
        f"{sum(len(p) for p in data.task_pairs.values())} pairs about {len(data.train_entities)} other entities")
    task_paths = [train_adapters(model, tokenizer, [item], cache / "task", fc_cfg if item.name == FAMILY_OF[FACT_CHECKING]
                                 else tcfg, progress=progress)[0] for item in task_items]
    timings["train_task"] = time.perf_counter() - t

    t = time.perf_counter()
    know_lib = _library(cache, "knowledge", know_paths, model, model_spec, progress)
    task_lib = _library(cache, "task", task_paths, model, model_spec, progress)
    timings["build_libraries"] = time.perf_counter() - t

    # -- questions, retrieval --------------------------------------------------------------------------------------
    questions: list[Question] = [q for d in DATASETS for q in data.questions[d]]
    articles = {e.name: e.article for e in data.entities}
    mentions = {e.name: e.mentions for e in data.entities}
    index = BM25Index([e.article for e in data.entities], [e.name for e in data.entities])
    retrieved = [hits[0][0] for hits in index.search([q.example.input for q in questions], k=1)]
    retrieval_top1 = sum(r == q.entity for r, q in zip(retrieved, questions)) / len(questions)
    rag_prompts = [rag_prompt(articles[r], q.prompt) for r, q in zip(retrieved, questions)]
    lengths = [len(tokenizer(q.prompt).input_ids) for q in questions]
    rag_lengths = [len(tokenizer(p).input_ids) for p in rag_prompts]
    order_plain = sorted(range(len(questions)), key=lambda i: (lengths[i], i))
    order_rag = sorted(range(len(questions)), key=lambda i: (rag_lengths[i], i))
    write_questions(out / "questions.jsonl", data)

    # -- evaluation ------------------------------------------------------------------------------------------
    methods = method_list(cfg, n)
    layers = model.config.num_hidden_layers
    job = AnswerJob(methods, ("token", "sequence") if cfg.granularity == "both" else (cfg.granularity,), questions,
                    retrieved, rag_prompts, order_plain, order_rag, mentions, cfg, layers,
                    {"task": str(task_lib.path), "knowledge": str(know_lib.path)})
    dtype = getattr(torch, cfg.eval_dtype)
    eval_model = model if model.dtype == dtype else copy.deepcopy(model).to(dtype)  # the caller's model stays
    workers = default_workers(math.ceil(len(questions) / cfg.batch_size)) if workers is None else workers
    t = time.perf_counter()
    share = answer_questions(job, eval_model, tokenizer, workers, libs=_library_set(task_lib, know_lib))
    timings["evaluate"] = time.perf_counter() - t
    answers, served, stats, method_time = share.answers, share.served, RoutingStats(share.stats), share.seconds
    for m in methods:
        if m.reuse is None:
            say(f"  {m.name}: {method_time[m.name]:.1f} s ({', '.join(_answer_names(m, job.grans))})")
            continue
        for name in _answer_names(m, job.grans):
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
                cleaned[questions[i].example.id] = (fc_label(text.strip().split("\n")[0]) if d == FACT_CHECKING
                                                    else clean_answer(text))
            final = {k: credited(v, ex.answers) if cfg.credit_prefix and d != FACT_CHECKING else v
                     for (k, v), ex in zip(cleaned.items(), examples)}
            metric = "em" if d in (SLOT_FILLING, QA) else "accuracy"  # KILT's: FEVER, AIDA and WNED by accuracy
            res = score_dataset(examples, final, task=d, metric=metric)
            strict = score_dataset(examples, cleaned, task=d, metric=metric)
            res["strict"] = strict["score"]
            scores[name][d] = res
            table[name][d] = (res["score"], res["n"])
            slug_name = name.replace("/", "-").replace("@", "-k")
            write_kilt_predictions(pred_dir / slug_name / f"{d}.jsonl", final)
            with open(pred_dir / slug_name / f"{d}.generations.jsonl", "w", encoding="utf-8") as fh:
                for i in idx:
                    q = questions[i]
                    fh.write(json.dumps({"id": q.example.id, "prompt": rag_prompts[i] if name.startswith(("rag", "r-lag"))
                                         else q.prompt, "generation": raw[i], "answer": final[q.example.id],
                                         "gold": q.example.answers, "entity": q.entity,
                                         "retrieved": retrieved[i], **({"served": served[name][i]} if i in
                                         served.get(name, {}) else {})}, ensure_ascii=False) + "\n")
    normalised, zero = normalise(table)
    gain = gain_fractions(normalised)
    routing = stats.summary()
    timings["total"] = time.perf_counter() - t_all

    settings = {"size": size_name, "config": _jsonable(asdict(cfg)), "data_dir": str(data_dir), "out_dir": str(out),
                "cache_dir": str(cache), "model": model_spec, "knowledge_library": str(know_lib.path),
                "task_library": str(task_lib.path), "n_knowledge_adapters": len(know_lib),
                "task_adapters": task_lib.names, "methods": list(answers), "p_lag_definition": PLAG_NOTE,
                "task_training": _TRAINING_NOTE,
                "answer_checking": _CHECKING_NOTE + (" Prefix credit on." if cfg.credit_prefix else " Prefix credit off."),
                "generation": {"greedy": True, "max_new_tokens": cfg.max_new_tokens, "stop": list(ANSWER_STOP)},
                "torch_threads": torch.get_num_threads(), "eval_workers": workers,
                "eval_dtype": cfg.eval_dtype}
    results = {
        "settings": settings,
        "data": describe(data),
        "scores": scores,
        "table": {m: {d: v[0] for d, v in r.items()} for m, r in table.items()},
        "normalised": normalised,
        "routing": routing,
        "retrieval_top1": retrieval_top1,
        "claims_known_by_base": claims_known,
        "floor": normalised.get("base"),
        "not_normalised": zero,
        "gain": gain,
        "k_sweep": _k_sweep(methods, normalised, routing, cfg, n),
        "timings": {**timings, "methods": method_time},
        "sequence_answers_reused": share.reused,
    }
    results["findings"] = findings(results, cfg)
    (out / "settings.json").write_text(json.dumps(settings, indent=1) + "\n")
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "results.md").write_text(report_markdown(results))
    plot_k_sweep(results, out / "k_sweep.png")
    plot_routing(results, out / "routing_by_layer.png", layers)
    say(f"[bold]Results[/] in {out} ({timings['total']:.0f} s)")
    return results


_TRAINING_NOTE = ("Task adapters learn from entities outside the knowledge set; one training fact in `context_every` "
                  "comes with its article in front (RAG form). Fact checking trains on true/false claim pairs about "
                  "the same fact (twice the other families' pairs, fc_steps steps), answered in fc_form (the bare "
                  "label, or the recalled object then the verdict). Of those without context, the first fc_bare_facts "
                  "are trained under the training entity's own knowledge adapter (frozen), so the adapter learns to "
                  "check a claim against what a knowledge adapter injects, as at test time; the rest only for facts "
                  "the base model already ranks right (log p(true) > log p(false)), without an adapter. Entity "
                  "linking trains on other entities' evidence sentences with a mention marked.")
_CHECKING_NOTE = ("Slot filling and QA: KILT exact match of the answer cut at its first line and sentence end; "
                  "entity linking: KILT accuracy (the cut answer equals the subject's title); fact checking: the "
                  "verdict (SUPPORTS/REFUTES, any case, at the start of the answer's first line, else the last one it "
                  "names) must equal the gold label; an answer without one is wrong. Gold answers: obj_label plus the "
                  "article's surface forms that name it in full.")


@torch_no_grad
def sequence_logprobs(model, tokenizer, texts: list[str], batch_size: int = 32) -> list[float]:
    """log p(text) under the model (sum over its tokens after the first), batched with left padding."""
    import torch

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


def _jsonable(x):
    return json.loads(json.dumps(x, default=str))


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
    threads (generation is many small ops; training, whose batches keep two threads busy, gains nothing from
    this). Starting one costs seconds (imports), so small runs keep one."""
    import torch

    return 2 if torch.get_num_threads() >= 2 and batches >= 8 else 1


def _answer_names(m: Method, grans) -> list[str]:
    """The answer columns of method m: per token (m.name), per sequence ("/seq"), task by vote ("/seq-task")."""
    names = [m.name] if m.name in ("base", "oracle") or "token" in grans else []
    if m.routed and m.sequence and "sequence" in grans:
        names.append(f"{m.name}/seq")
        if m.mixed and len(m.routed) == 2:
            names.append(f"{m.name}/seq-task")
    return names


def answer_questions(job: AnswerJob, model, tokenizer, workers: int = 1, libs: dict | None = None) -> AnswerShare:
    """Every method's answers (methods that reuse another's are left to the caller). With workers > 1, each of
    that many spawned processes takes every workers-th batch of every method, so a question's sequence-mode
    generations stay in one process's memo; the model's weights are shared with them, not copied.
    libs: the job's libraries already open here (one process uses them; workers open their own)."""
    import torch

    if workers <= 1:
        return _answer_share(job, model, tokenizer, libs or _open_libraries(job), 0, 1)
    threads = max(1, torch.get_num_threads() // workers)
    model.share_memory()
    # an executor, not a Pool: a worker that dies raises here instead of being replaced while the run waits
    ctx = torch.multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        shares = list(pool.map(_share_worker, *zip(*[(job, model, tokenizer, w, workers, threads)
                                                     for w in range(workers)])))
    return _merge_shares(shares, len(job.questions))


def _open_libraries(job: AnswerJob) -> dict:
    from .library import open_library

    return _library_set(open_library(job.library_paths["task"]), open_library(job.library_paths["knowledge"]))


def _library_set(task, knowledge) -> dict:
    """The libraries as the routing state names them: P-LAG's retrieved adapter comes from the knowledge one."""
    return {"task": task, "knowledge": knowledge, "prag": knowledge}


def _share_worker(job: AnswerJob, model, tokenizer, share: int, shares: int, threads: int) -> AnswerShare:
    import torch

    torch.set_num_threads(threads)
    return _answer_share(job, model, tokenizer, _open_libraries(job), share, shares)


@torch_no_grad
def _answer_share(job: AnswerJob, model, tokenizer, libs: dict, share: int, shares: int) -> AnswerShare:
    from .routed_model import attach, detach

    stats, memo = RoutingStats(), FixedGenerations()
    answers: dict[str, list] = {}
    served: dict[str, dict[int, dict]] = {}  # sequence-mode method -> question -> the adapters it served
    seconds: dict[str, float] = {}
    state = attach(model, libs, router="none", k=job.cfg.k)
    try:
        for m in job.methods:
            if m.reuse is not None:
                continue
            t = time.perf_counter()
            names = _answer_names(m, job.grans)
            for name in names:
                answers[name] = [None] * len(job.questions)
            batches = list(_batches(job.order_rag if m.rag else job.order_plain, job.cfg.batch_size))[share::shares]
            _run_method(m, names, job.grans, state, model, tokenizer, job.questions, job.retrieved, job.rag_prompts,
                        batches, job.mentions, job.cfg, stats, answers, job.layers, memo, served)
            seconds[m.name] = time.perf_counter() - t
    finally:
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


def _run_method(m: Method, names, grans, state, model, tokenizer, questions, retrieved, rag_prompts, batches,
                mentions, cfg: BenchConfig, stats: RoutingStats, answers, layers, memo: "FixedGenerations",
                served: dict) -> None:
    """Answer the questions of `batches` (lists of question indices) with method m, per token and/or per sequence,
    recording routing statistics.

    memo: generations with fixed adapters, shared across methods. Sequence modes whose votes
    agree (with each other or with the Oracle's gold pair) serve the same adapters to the same prompt, so
    each such generation runs once; in another batch the padding differs, which greedy decoding is
    insensitive to up to float rounding. served: per sequence-mode method and question, the adapters it served."""
    from .generate import encode_prompts, generate

    kw = dict(max_new_tokens=cfg.max_new_tokens, chat=False, stop=list(ANSWER_STOP))
    token_name = names[0] if not names[0].endswith("/seq") else None
    seq_name = f"{m.name}/seq" if f"{m.name}/seq" in names else None
    for batch in batches:
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
                smask = subject_mask(tokenizer, prompts, [mentions[questions[i].entity] for i in batch], width,
                                     lengths=pmask.sum(1))
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
        keys = [_fixed_key(m, i, questions, retrieved, {lib: votes[lib][b] for lib in m.routed})
                for b, i in enumerate(batch)]
        todo = [b for b, key in enumerate(keys) if key not in memo.texts]
        if todo:
            _configure(state, m, cfg, [gold_know[b] for b in todo], [gold_task[b] for b in todo],
                       [retrieved[batch[b]] for b in todo])
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
            state.set_router(lib, router, k=k, fixed=None)
            state.specs[lib].fixed = None
    if m.plag:
        state.fix("prag", retrieved)
    else:
        state.set_router("prag", "none")
        state.specs["prag"].fixed = None


# -- summaries -------------------------------------------------------------------------------------------------
def _k_sweep(methods, normalised, routing, cfg, n) -> list[dict]:
    rows = []
    for k in sweep_ks(cfg, n):
        name = f"lag@{k}"
        if name not in normalised:
            continue
        row = {"k": k, "token": normalised.get(name, {}).get("AVG"),
               "sequence": normalised.get(f"{name}/seq", {}).get("AVG")}
        r = routing.get(name, {}).get("knowledge", {})
        row["subject_routing"] = r.get("subject")
        row["vote"] = routing.get(f"{name}/seq", {}).get("knowledge", {}).get("vote")
        rows.append(row)
    return rows


# The paper's figures (Fleshman & Van Durme 2025, Table 4: Llama-3.2-3B, 9 KILT tasks): normalised AVG (% of the
# Oracle) and the no-adapter floor; each method's gain fraction is (score - floor) / (100 - floor), computed here.
PAPER = {"floor": 59.5, "lag": 92.1, "arrow": 84.8, "rag": 72.0, "rag+lag": 95.0}
# The targets issue 14 sets on the full run (AVG % of the Oracle, gain fraction %)
TARGETS = {"lag": (92.0, 80.0), "lag-prefix": (97.0, 90.0)}


def normalise(table: dict) -> tuple[dict, list[str]]:
    """The normalised scores (% of the Oracle per family, AVG) of {method: {dataset: (score, n)}}, and the datasets
    left out because the Oracle scores 0 there (a few questions, a one-label fact checker): the other families
    are still normalised. {"error": ...} when nothing can be."""
    from .kilt import LAMA_FAMILIES, normalised_scores

    zero = sorted(d for d, (v, _) in table.get("oracle", {}).items() if v == 0)
    try:
        return normalised_scores({m: {d: v for d, v in per.items() if d not in zero} for m, per in table.items()},
                                 oracle="oracle", families=LAMA_FAMILIES, percent=True), zero
    except LoralagError as e:  # e.g. no oracle among the methods: report raw scores only
        return {"error": str(e)}, zero


def gain_fraction(score: float | None, floor: float | None) -> float | None:
    """(score - floor) / (Oracle - floor) in %, the Oracle being 100: the share of the distance from the
    no-adapter model to the Oracle that a method closes. None where the floor is the Oracle already."""
    if score is None or floor is None or floor >= 100:
        return None
    return 100 * (score - floor) / (100 - floor)


def gain_fractions(normalised: dict) -> dict:
    """Per method and family (and AVG): the gain fraction over the base model's normalised score."""
    floor = normalised.get("base") if "error" not in normalised else None
    if not floor:
        return {}
    return {m: {f: gain_fraction(v, floor.get(f)) for f, v in per.items()} for m, per in normalised.items()}


def paper_gain(name: str) -> float:
    return gain_fraction(PAPER[name], PAPER["floor"])


def headline_lag(results: dict) -> str | None:
    """The headline LAG method's name (lag@k with the run's k, clamped to N)."""
    k = min(results["settings"]["config"]["k"], results["settings"]["n_knowledge_adapters"])
    name = f"lag@{k}"
    return name if name in results["table"] else None


def headline_prefix(results: dict) -> str | None:
    k = min(results["settings"]["config"]["k"], results["settings"]["n_knowledge_adapters"])
    name = f"lag-prefix@{k}"
    return name if name in results["table"] else None


def findings(results: dict, cfg: BenchConfig) -> dict:
    """The numbers issue 14 asks about: per-token LAG and lag-prefix against the Oracle, the floor and Arrow, with
    gain fractions, targets met or not; token against sequence routing."""
    norm = results["normalised"]
    if "error" in norm:
        return {"error": norm["error"]}
    gain = results.get("gain") or {}
    lag, prefix = headline_lag(results), headline_prefix(results)

    def avg(m):
        return norm.get(m, {}).get("AVG") if m else None

    def g(m):
        return gain.get(m, {}).get("AVG") if m else None

    out = {"lag": lag, "lag_avg": avg(lag), "lag_gain": g(lag), "lag_seq_avg": avg(f"{lag}/seq") if lag else None,
           "prefix": prefix, "prefix_avg": avg(prefix), "prefix_gain": g(prefix),
           "arrow_avg": avg("arrow"), "arrow_gain": g("arrow"), "rag_avg": avg("rag"), "rag_gain": g("rag"),
           "r_lag_avg": avg("r-lag"), "base_avg": avg("base")}
    targets = {}
    for key, name in (("lag", lag), ("lag-prefix", prefix)):
        if name and avg(name) is not None:
            want_avg, want_gain = TARGETS[key]
            targets[key] = {"avg": avg(name), "gain": g(name), "target_avg": want_avg, "target_gain": want_gain,
                            "met": avg(name) >= want_avg and (g(name) or -1e9) >= want_gain}
    if lag and avg(lag) is not None and out["arrow_avg"] is not None:
        targets["lag above arrow"] = {"met": avg(lag) > out["arrow_avg"]}
    if lag and avg(lag) is not None and out["r_lag_avg"] is not None:
        targets["r-lag >= lag"] = {"met": out["r_lag_avg"] >= avg(lag)}
    out["targets"] = targets
    r = results["routing"]
    for key, name in (("lag", lag), ("prefix", prefix)):
        if name and name in r:
            kn = r[name].get("knowledge", {})
            out[f"{key}_subject_tokens_to_gold"] = kn.get("subject")
            out[f"{key}_answer_tokens_to_gold"] = kn.get("answer")
    if lag and f"{lag}/seq" in r:
        v = r[f"{lag}/seq"].get("knowledge", {})
        out["lag_vote_gold"] = v.get("vote")
        out["lag_vote_gold_count"] = [v.get("vote_hits"), v.get("vote_total")]
    return out


def _fmt(x, pct=False):
    if x is None:
        return "—"
    return f"{100 * x:.1f}" if pct else f"{x:.1f}"


def families_of(normalised: dict) -> list[str]:
    """The families a run's normalised table holds, in LAMA_FAMILIES order, then AVG."""
    from .kilt import LAMA_FAMILIES

    present = {f for per in normalised.values() for f in per}
    return [f for f in LAMA_FAMILIES if f in present] + ["AVG"]


def report_markdown(results: dict) -> str:
    s = results["settings"]
    cfg = s["config"]
    lines = [f"# LAMA knowledge benchmark — size {s['size']}", "",
             f"{s['n_knowledge_adapters']} knowledge adapters (gate/up/down, rank {cfg['know_r']}, "
             f"{cfg['know_steps']} steps), task adapters {', '.join(s['task_adapters'])} (q/k/v/o, rank "
             f"{cfg['task_r']}); model `{s['model']}`; data `{s['data_dir']}`; fact checking answered in the "
             f"`{cfg.get('fc_form', 'recall')}` form.", "",
             "Questions: " + ", ".join(f"{d} {n}" for d, n in results["data"]["questions"].items())
             + f". BM25 top-1 retrieval finds the gold article for {100 * results['retrieval_top1']:.1f}% of them.", "",
             "## Scores per dataset", "",
             "EM (%) for slot filling and QA, label accuracy (%) for fact checking, title accuracy (%) for entity "
             "linking; in parentheses the strict score (no prefix credit).", "",
             "| method | " + " | ".join(DATASETS) + " |", "|---|" + "---|" * len(DATASETS)]
    for m, per in results["scores"].items():
        cells = []
        for d in DATASETS:
            r = per.get(d)
            if r is None:
                cells.append("—")
            elif d == FACT_CHECKING:
                cells.append(f"{r['score']:.1f}")
            else:
                cells.append(f"{r['score']:.1f} ({r['strict']:.1f})")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    norm = results["normalised"]
    gain = results.get("gain") or {}
    lines += ["", "## Normalised by the Oracle (%, per family; AVG = mean over families)", "",
              "The paper's Eq. 9. `gain` is the gain fraction (score − floor) / (Oracle − floor), the floor being "
              "the no-adapter base model's normalised score.", ""]
    if results.get("not_normalised"):
        lines += [f"Left out (the Oracle scores 0 there): {', '.join(results['not_normalised'])}.", ""]
    if "error" in norm:
        lines.append(f"Not computed: {norm['error']}")
    else:
        fams = families_of(norm)
        lines += ["| method | " + " | ".join(fams) + " | gain (AVG) |", "|---|" + "---|" * (len(fams) + 1)]
        for m, per in norm.items():
            lines.append(f"| {m} | " + " | ".join(_fmt(per.get(f)) for f in fams)
                         + f" | {_fmt(gain.get(m, {}).get('AVG'))} |")
        if gain:
            lines += ["", "### Gain fraction per family (%)", "", "| method | " + " | ".join(fams) + " |",
                      "|---|" + "---|" * len(fams)]
            for m, per in gain.items():
                lines.append(f"| {m} | " + " | ".join(_fmt(per.get(f)) for f in fams) + " |")
    f = results.get("findings", {})
    if f and "error" not in f:
        lines += ["", "## Against the paper", "",
                  f"The paper's floor (its no-adapter model) is {PAPER['floor']}% of its Oracle; ours is "
                  f"{_fmt(f['base_avg'])}%. Its gain fractions are computed from its Table 4 the same way.", "",
                  "| method | ours: % of Oracle | ours: gain fraction | paper: % of Oracle | paper: gain fraction |",
                  "|---|---|---|---|---|"]
        rows = [(f"per-token LAG ({f['lag']})", f["lag_avg"], f["lag_gain"], "lag"),
                (f"lag-prefix ({f['prefix']}, ours)", f["prefix_avg"], f["prefix_gain"], None),
                ("Arrow", f["arrow_avg"], f["arrow_gain"], "arrow"), ("RAG", f["rag_avg"], f["rag_gain"], "rag"),
                ("R-LAG (RAG+LAG)", f["r_lag_avg"], gain.get("r-lag", {}).get("AVG"), "rag+lag")]
        for label, ours, ours_gain, key in rows:
            paper = (_fmt(PAPER[key]), _fmt(paper_gain(key))) if key else ("—", "—")
            lines.append(f"| {label} | {_fmt(ours)} | {_fmt(ours_gain)} | {paper[0]} | {paper[1]} |")
    lines += ["", "## Routing accuracy", "",
              "Share of routing decisions (token × module, all layers) that pick the gold adapter: knowledge over "
              "the subject-mention tokens, all prompt tokens and the answer positions (the decisions that produced "
              "an answer token), task over prompt tokens and answer positions; for `/seq` the share of questions "
              "whose vote picks the gold adapter. In RAG-form prompts the subject's mentions in the article count as "
              "subject tokens too.", "",
              "| method | knowledge: subject tokens | knowledge: prompt | knowledge: answer | task: prompt | "
              "task: answer | knowledge vote | task vote |", "|---|---|---|---|---|---|---|---|"]
    for m, per in results["routing"].items():
        kn, tk = per.get("knowledge", {}), per.get("task", {})
        vote_k = f"{_fmt(kn.get('vote'), True)} ({kn.get('vote_hits')}/{kn.get('vote_total')})" \
            if kn.get("vote") is not None else "—"
        lines.append(f"| {m} | {_fmt(kn.get('subject'), True)} | {_fmt(kn.get('prompt'), True)} | "
                     f"{_fmt(kn.get('answer'), True)} | {_fmt(tk.get('prompt'), True)} | {_fmt(tk.get('answer'), True)} "
                     f"| {vote_k} | {_fmt(tk.get('vote'), True)} |")
    if results["k_sweep"]:
        lines += ["", "## LAG's k (knowledge library)", "",
                  "| k | token (% of Oracle) | sequence (% of Oracle) | subject tokens to gold (%) | vote gold (%) |",
                  "|---|---|---|---|---|"]
        for row in results["k_sweep"]:
            lines.append(f"| {row['k']} | {_fmt(row['token'])} | {_fmt(row['sequence'])} | "
                         f"{_fmt(row['subject_routing'], True)} | {_fmt(row['vote'], True)} |")
    if f and "error" not in f:
        lines += ["", "## Findings", "", *finding_lines(f)]
    lines += ["", "## Settings", "", f"- {s['p_lag_definition']}", f"- {s.get('task_training', '')}",
              f"- {s['answer_checking']}",
              "- lag@k with k ≥ N is SpectR over the whole library; it reuses `spectral`'s answers.",
              f"- Answered in {s.get('eval_dtype', 'float32')} (training in float32; routing in the libraries' "
              f"dtype) by {s.get('eval_workers', 1)} process(es) of {s.get('torch_threads', '?')} torch thread(s) "
              "in all.",
              "", "Timings (s): " + ", ".join(f"{k} {v:.0f}" for k, v in results["timings"].items()
                                              if isinstance(v, (int, float))), ""]
    return "\n".join(lines)


def finding_lines(f: dict) -> list[str]:
    """The findings as markdown bullets (report and terminal)."""
    lines = [f"- Per-token LAG ({f['lag']}): {_fmt(f['lag_avg'])}% of the Oracle, gain fraction "
             f"{_fmt(f['lag_gain'])}%; by sequence vote {_fmt(f['lag_seq_avg'])}%. Arrow {_fmt(f['arrow_avg'])}% "
             f"(gain {_fmt(f['arrow_gain'])}%), base (the floor) {_fmt(f['base_avg'])}%."]
    if f.get("prefix"):
        lines.append(f"- lag-prefix ({f['prefix']}): {_fmt(f['prefix_avg'])}% of the Oracle, gain fraction "
                     f"{_fmt(f['prefix_gain'])}%.")
    for key in ("lag", "prefix"):
        sub, ans = f.get(f"{key}_subject_tokens_to_gold"), f.get(f"{key}_answer_tokens_to_gold")
        if sub is not None:
            lines.append(f"- {f[key]} routes {_fmt(sub, True)}% of subject-mention decisions and {_fmt(ans, True)}% "
                         "of answer-position decisions to the gold knowledge adapter.")
    if f.get("lag_vote_gold_count"):
        hits, total = f["lag_vote_gold_count"]
        lines.append(f"- The sequence vote picks the gold knowledge adapter for {hits}/{total} questions.")
    for name, t in f.get("targets", {}).items():
        if "target_avg" in t:
            lines.append(f"- Target {name} ≥ {t['target_avg']:.0f}% of the Oracle with gain ≥ {t['target_gain']:.0f}%: "
                         f"{'met' if t['met'] else 'missed'} ({_fmt(t['avg'])}%, gain {_fmt(t['gain'])}%).")
        else:
            lines.append(f"- Target {name}: {'met' if t['met'] else 'missed'}.")
    return lines


def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h))
    FigureCanvasAgg(fig)
    return fig


def plot_k_sweep(results: dict, path: Path) -> Path:
    """Normalised score (AVG over families, % of the Oracle) against LAG's k, per token and per sequence."""
    fig = _figure(6.4, 4.2)
    ax = fig.subplots()
    rows = [r for r in results["k_sweep"] if r["token"] is not None or r["sequence"] is not None]
    if rows:
        ks = [r["k"] for r in rows]
        if any(r["token"] is not None for r in rows):
            ax.plot(ks, [r["token"] if r["token"] is not None else math.nan for r in rows], "o-", label="LAG per token")
        if any(r["sequence"] is not None for r in rows):
            ax.plot(ks, [r["sequence"] if r["sequence"] is not None else math.nan for r in rows], "s--",
                    label="LAG per sequence (vote)")
        ax.set_xscale("log")
        ax.set_xticks(ks)
        ax.set_xticklabels([str(k) for k in ks])
    norm = results["normalised"]
    if "error" not in norm:
        ax.axhline(100, color="black", lw=0.8, label="Oracle")
        for name, style in (("arrow", ":"), ("base", "-.")):
            if name in norm and "AVG" in norm[name]:
                ax.axhline(norm[name]["AVG"], color="grey", ls=style, lw=1, label=name)
    ax.set_xlabel("k (Arrow candidates per token, knowledge library)")
    ax.set_ylabel("normalised score, % of Oracle (AVG)")
    ax.set_title(f"LAG's k — {results['settings']['n_knowledge_adapters']} knowledge adapters")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def plot_routing(results: dict, path: Path, layers: int) -> Path:
    """Per layer: share of routing decisions that pick the gold knowledge adapter (subject tokens, answer positions)
    and the gold task adapter (prompt tokens), for the headline LAG, lag-prefix, Arrow and SpectR."""
    fig = _figure(10, 4.2)
    ax_k, ax_t = fig.subplots(1, 2, sharey=True)
    routing = results["routing"]
    lag = headline_lag(results)
    x = list(range(layers))
    for name, color in ((lag, "tab:blue"), (headline_prefix(results), "tab:red"), ("arrow", "tab:orange"),
                        ("spectral", "tab:green")):
        if not name or name not in routing:
            continue
        if name == "spectral" and lag in routing and routing[lag] == routing[name]:
            continue  # the headline LAG is SpectR here (k >= N): one line, not two on top of each other
        kn, tk = routing[name].get("knowledge"), routing[name].get("task")
        if kn:
            ax_k.plot(x, [v if v is not None else math.nan for v in kn["subject_by_layer"]], "-", color=color,
                      label=f"{name}: subject tokens")
            ax_k.plot(x, [v if v is not None else math.nan for v in kn.get("answer_by_layer") or [None] * layers], "--",
                      color=color, label=f"{name}: answer positions")
        if tk:
            ax_t.plot(x, [v if v is not None else math.nan for v in tk["prompt_by_layer"]], "-", color=color,
                      label=f"{name}: prompt tokens")
    n = results["settings"]["n_knowledge_adapters"]
    ax_k.axhline(1 / n, color="grey", lw=0.8, ls="--", label=f"chance (1/{n})")
    ax_t.axhline(1 / max(1, len(results["settings"]["task_adapters"])), color="grey", lw=0.8, ls="--", label="chance")
    ax_k.set_title("knowledge library: gold adapter's share")
    ax_t.set_title("task library: gold adapter's share")
    for ax in (ax_k, ax_t):
        ax.set_xlabel("layer")
        ax.set_ylim(0, 1.02)
        ax.legend(fontsize=7)
    ax_k.set_ylabel("share of routing decisions")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def print_summary(results: dict, console) -> None:
    """The normalised table with gain fractions, and the findings, for the terminal."""
    from rich.table import Table

    norm = results["normalised"]
    if "error" in norm:
        console.print(f"[yellow]normalised scores not computed:[/] {norm['error']}")
    else:
        gain = results.get("gain") or {}
        t = Table(title="LAMA bench: % of the Oracle (gain: share of the floor-to-Oracle distance)", header_style="bold")
        fams = families_of(norm)
        t.add_column("method")
        for fam in fams:
            t.add_column(fam, justify="right")
        t.add_column("gain", justify="right")
        for m, per in norm.items():
            t.add_row(m, *[_fmt(per.get(fam)) for fam in fams], _fmt(gain.get(m, {}).get("AVG")))
        console.print(t)
    f = results.get("findings", {})
    if f and "error" not in f:
        for line in finding_lines(f):
            console.print(line, highlight=False)
    console.print(f"results: {results['settings']['out_dir']}")
