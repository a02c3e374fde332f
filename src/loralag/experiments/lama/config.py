"""The LAMA benchmark's settings: sizes, modules, the methods it compares and the k sweep."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

from loralag.errors import LoralagError
from loralag.experiments.lama.data import FC_FORMS, build_data
from loralag.training import CONTRAST_INITS, INITS

PLAG_NOTE = (
    "P-LAG: LAG routes both libraries per token exactly as in `lag`, and the BM25 top-1 article's knowledge "
    "adapter is added on every token and layer on top of LAG's pick (the two deltas are summed; when LAG "
    "picks the retrieved adapter itself it counts twice)."
)
TASK_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
KNOWLEDGE_MODULES = ("gate_proj", "up_proj", "down_proj")
GRANULARITIES = ("token", "sequence", "both")
# what the task adapters (but fact checking's) train under (task_under)
TASK_UNDER = ("none", "lag", "lag-bare", "lag-fact")
EVAL_DTYPES = ("float32", "bfloat16", "float16")
# what the task adapters' contrast/salient init contrasts each family's inputs with (task_contrast)
TASK_CONTRAST = ("generic", "families")


@dataclass
class BenchConfig:
    """Everything a run depends on; a size is a preset of these."""

    n_entities: int = 200  # knowledge adapters, one per subject entity
    questions_per_dataset: int | None = None  # default: one per knowledge entity
    n_train_pairs: int = 200  # task-adapter training pairs per family
    context_every: int = 3  # one task-training prompt in this many has its entity's page in front (RAG form)
    fc_bare_facts: int = 48  # bare fact-checking training facts, each under its entity's own knowledge adapter
    fc_all_under: bool = False  # every bare fact-checking training fact under its entity's adapter (no cap)
    fc_steps: int | None = None  # the fact-checking task adapter's steps (None: 2 × task_steps: 2 pairs per fact)
    fc_form: str = "label"  # fact checking answers the bare label (FEVER's); "recall": object, then verdict
    # wrong objects per fact-checking fact, each a (true, false) claim pair: a verdict that must come from the object
    fc_false: int = 1
    # every claim about a task-training entity bare under that entity's knowledge adapter, every other claim with
    # its page in front, all of them (no cap, no base-model filter): fact checking learns to check a claim against
    # an injected fact from every fact that has an adapter (README, "Fact checking off chance": not a default)
    fc_under_train: bool = False
    fc_train_a: bool = False  # the fact-checking adapter trains A too, even where task_freeze_a keeps the others'
    # > 0: the fact-checking adapter trains A within its init's top fc_a_within directions (TrainConfig.a_within),
    # even where task_freeze_a keeps the others': more than B alone can learn, routed on what tells its family apart
    fc_a_within: int = 0
    seed: int = 0
    shared_init: bool = False  # every adapter from one LoRA init (loralag 0.1's way), to measure what distinct ones do
    max_article_chars: int = 400
    # knowledge adapters
    know_r: int = 6
    know_alpha: int = 12
    know_steps: int = 12
    know_lr: float = 2e-3
    know_batch: int = 4
    # A's init (TrainConfig.init); "contrast" for both libraries routed best of the four full-size settings
    # measured (README, "Distinct inits")
    know_init: str = "contrast"
    know_qa: bool = False  # the knowledge texts also restate each fact as a question and answer (data.rewrites)
    know_freeze_a: bool = False  # train the knowledge adapters' B alone, A kept at its init (TrainConfig.freeze_a)
    # task adapters
    task_r: int = 8
    task_alpha: int = 16
    task_steps: int = 80
    task_lr: float = 2e-3
    task_batch: int = 4
    task_init: str = "contrast"
    # train the task adapters' B alone, A kept at its init (TrainConfig.freeze_a): their arrows stay where the init
    # put them, on what tells the families apart (the full size's)
    task_freeze_a: bool = False
    # "generic": the contrast/salient init against generic text (the base model's own samples); "families":
    # against every task family's training pairs pooled (TrainConfig.contrast_against), so each task adapter's
    # A starts on what tells its family's inputs from the other families' (the full size's)
    task_contrast: str = "generic"
    # the task adapters' training seed (None: seed): another value retrains only them, into their own folder,
    # to measure how much one training of the task adapters moves the scores (README, LAMA)
    task_seed: int | None = None
    # "lag": the slot-filling, QA and entity-linking adapters train under the training entities' knowledge
    # library routed per token by this router (at k), the knowledge per-token LAG delivers at test time, right
    # or wrong, instead of none; "lag-bare": only their pairs without a page in front (RAG's pairs have their
    # knowledge source); "lag-fact" (the full size's): slot filling and QA only, the two families that need the
    # fact (entity linking trains without: under the routed library it answered worse, README); "none": without
    # knowledge adapters
    task_under: str = "none"
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
    "tiny": dict(
        n_entities=6,
        n_train_pairs=24,
        context_every=0,
        fc_bare_facts=2,
        know_steps=8,
        know_lr=3e-3,
        task_steps=12,
        task_batch=4,
        task_lr=3e-3,
        k_sweep=(1, "N"),
        max_new_tokens=12,
    ),
    # a sanity check at the scale of the earlier 12-adapter measurement
    "small": dict(n_entities=12, n_train_pairs=60, fc_bare_facts=16, task_steps=40, task_batch=4, task_lr=2e-3),
    # the benchmark: 200 knowledge adapters
    # answering in bfloat16: 1.75x faster here (CPUs with AVX512-BF16 or AMX), as such models usually run
    # slot filling's and QA's task adapters trained under the routed knowledge, every task adapter's init
    # contrasted with the other families and only B trained: per-token LAG's best measured setting (README,
    # "Where the shortfall lies"); not at the small size, where the training entities' knowledge adapters (44
    # more) would add about 11 minutes to its 19
    "full": dict(
        n_entities=200,
        questions_per_dataset=200,
        n_train_pairs=200,
        task_steps=80,
        task_batch=4,
        task_lr=2e-3,
        eval_dtype="bfloat16",
        task_under="lag-fact",
        task_contrast="families",
        task_freeze_a=True,
    ),
}
BASE_METHODS = (
    "base",
    "oracle",
    "arrow",
    "lag",
    "lag-prefix",
    "spectral",
    "arrow-mix",
    "rag",
    "prag",
    "r-lag",
    "p-lag",
    "k-sweep",
)


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
    chosen_init = overrides.get("task_init") is not None and overrides.get("task_contrast") is None
    if chosen_init and cfg.task_init not in CONTRAST_INITS:
        cfg = replace(cfg, task_contrast="generic")  # a size's families contrast goes with its contrast init
    if cfg.eval_dtype not in EVAL_DTYPES:
        raise LoralagError(f"eval_dtype must be one of {EVAL_DTYPES}, got {cfg.eval_dtype!r}")
    if cfg.granularity not in GRANULARITIES:
        raise LoralagError(f"granularity must be one of {GRANULARITIES}, got {cfg.granularity!r}")
    for init in (cfg.know_init, cfg.task_init):
        if init not in INITS:
            raise LoralagError(f"an adapter init must be one of {INITS}, got {init!r}")
    if cfg.task_contrast not in TASK_CONTRAST:
        raise LoralagError(f"task_contrast must be one of {TASK_CONTRAST}, got {cfg.task_contrast!r}")
    if cfg.task_contrast != "generic" and cfg.task_init not in CONTRAST_INITS:
        raise LoralagError(
            f"task_contrast={cfg.task_contrast!r} needs task_init {' or '.join(map(repr, CONTRAST_INITS))}"
        )
    if cfg.fc_form not in FC_FORMS:
        raise LoralagError(f"fc_form must be one of {FC_FORMS}, got {cfg.fc_form!r}")
    if isinstance(cfg.fc_false, bool) or not isinstance(cfg.fc_false, int) or cfg.fc_false < 1:
        raise LoralagError(f"fc_false (wrong objects per fact-checking fact) must be >= 1, got {cfg.fc_false!r}")
    if isinstance(cfg.fc_a_within, bool) or not isinstance(cfg.fc_a_within, int) or cfg.fc_a_within < 0:
        raise LoralagError(f"fc_a_within must be an integer >= 0, got {cfg.fc_a_within!r}")
    if cfg.fc_a_within and (cfg.fc_a_within < cfg.task_r or cfg.task_init == "peft"):
        raise LoralagError(
            f"fc_a_within ({cfg.fc_a_within}) needs a data-aware task_init (not {cfg.task_init!r}) and at least "
            f"task_r ({cfg.task_r}) directions"
            if cfg.task_init == "peft"
            else f"fc_a_within ({cfg.fc_a_within}) must be at least task_r ({cfg.task_r})"
        )
    if cfg.task_under not in TASK_UNDER:
        raise LoralagError(f"task_under must be one of {TASK_UNDER}, got {cfg.task_under!r}")
    if cfg.n_entities < 2:
        raise LoralagError("the knowledge library needs at least 2 entities")
    if cfg.methods is not None:
        unknown = set(cfg.methods) - set(BASE_METHODS)
        if unknown:
            raise LoralagError(f"unknown methods {sorted(unknown)}; choose from {BASE_METHODS}")
    return cfg


def fc_bare_cap(cfg: BenchConfig) -> int | None:
    """How many bare fact-checking training facts train under their entity's knowledge adapter (None: all)."""
    return None if cfg.fc_all_under else cfg.fc_bare_facts


def bench_data(cfg: BenchConfig, data_dir: str | Path):
    """The benchmark's data (entities, questions, training pairs) as a run with `cfg` builds it from `data_dir`."""
    return build_data(
        data_dir,
        cfg.n_entities,
        cfg.questions_per_dataset,
        cfg.n_train_pairs,
        cfg.seed,
        cfg.max_article_chars,
        context_every=cfg.context_every,
        fc_bare_facts=fc_bare_cap(cfg),
        fc_form=cfg.fc_form,
        fc_false=cfg.fc_false,
    )


def default_data_dir() -> Path:
    """$LORALAG_LAMA_DATA, else ../shared/data/lama-trex from the working directory or from the repository."""
    env = os.environ.get("LORALAG_LAMA_DATA")
    if env:
        return Path(env)
    for root in (Path.cwd(), Path(__file__).resolve().parents[4]):
        p = root.parent / "shared" / "data" / "lama-trex"
        if p.is_dir():
            return p
    return Path("../shared/data/lama-trex")


def default_cache_dir() -> Path:
    from loralag.models import cache_dir

    return cache_dir() / "lama_bench"


# -- methods ---------------------------------------------------------------------------------------------------
@dataclass
class Method:
    """How one method routes. knowledge/task: a router name, or "gold" / "retrieved" (through `fixed`)."""

    name: str
    knowledge: str = "none"
    task: str = "none"
    k: int = 20
    rag: bool = False  # the retrieved page (title and article) goes in the prompt
    plag: bool = False  # the retrieved article's adapter is added on top of the knowledge routing
    reuse: str | None = None  # identical to another method: reuse its answers
    mixed: bool = False  # also run "<name>/seq-task": task library by vote, knowledge library per token
    sequence: bool = True  # also run "<name>/seq" (the sequence vote) where the run asks for it

    @property
    def routed(self) -> list[str]:
        """Libraries routed per token (what the sequence mode votes on)."""
        return [
            lib
            for lib, r in (("knowledge", self.knowledge), ("task", self.task))
            if r not in ("none", "gold", "retrieved")
        ]


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
