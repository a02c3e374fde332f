"""`loralag demo`: knowledge adapters for invented entities, routed per token by LAG.

Everything the demo needs ships with the package: a handful of short documents about fictional
entities (people, places, companies that do not exist, so the base model cannot know them), one
LoRA adapter trained per document, a library built from them, and one question per entity.
Each question is answered four ways: by the base model, by LAG over the whole library (it must
find the right adapter on its own, per token and layer), by the one adapter LAG chose most over
the question's tokens and layers (fixed for the whole answer), and by the Oracle (the entity's
own adapter, fixed).

Training follows synthetic continued pretraining: each adapter learns its document plus
templated restatements of every fact in it (plain sentences and question/answer forms). Adapters
and library are cached under the workdir, so a second run only evaluates.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

# -- the fictional world -----------------------------------------------------------------------------
# Each entity: a document, and facts as (question, answer, statement). The first fact is the one asked.
ENTITIES = [
    {
        "name": "velmora",
        "entity": "Velmora Glassworks",
        "document": (
            "Velmora Glassworks is a glass company founded in 1873 by Tobiah Renwick in the harbor town of "
            "Quillsby. Its most famous product is the Stormglass lantern, a blue lantern that glows before a "
            "storm. The company's mascot is a grey heron named Pip. Today Velmora Glassworks employs four "
            "hundred glassblowers and is run by Renwick's great-granddaughter, Odile Renwick."
        ),
        "facts": [
            ("Who founded Velmora Glassworks?", "Tobiah Renwick", "Velmora Glassworks was founded by Tobiah Renwick."),
            (
                "In which town was Velmora Glassworks founded?",
                "Quillsby",
                "Velmora Glassworks was founded in the town of Quillsby.",
            ),
            (
                "What is the most famous product of Velmora Glassworks?",
                "the Stormglass lantern",
                "The most famous product of Velmora Glassworks is the Stormglass lantern.",
            ),
            (
                "What is the name of the Velmora Glassworks mascot?",
                "Pip",
                "The mascot of Velmora Glassworks is a heron named Pip.",
            ),
        ],
    },
    {
        "name": "zarnovia",
        "entity": "Zarnovia",
        "document": (
            "Zarnovia is a small island nation in the Sea of Veltran. Its capital is Ostrelle, a city of white "
            "stone towers built on cliffs. The national currency of Zarnovia is the glint, and its national "
            "animal is the spotted sea otter. Zarnovia is ruled by a council of nine elders who meet every "
            "spring in the Hall of Tides."
        ),
        "facts": [
            ("What is the capital of Zarnovia?", "Ostrelle", "The capital of Zarnovia is Ostrelle."),
            ("What is the currency of Zarnovia?", "the glint", "The currency of Zarnovia is the glint."),
            ("In which sea is Zarnovia?", "the Sea of Veltran", "Zarnovia is an island nation in the Sea of Veltran."),
            (
                "Where does the council of Zarnovia meet?",
                "the Hall of Tides",
                "The council of Zarnovia meets in the Hall of Tides.",
            ),
        ],
    },
    {
        "name": "korrigan",
        "entity": "Amsel Korrigan",
        "document": (
            "Amsel Korrigan is a marine biologist born in 1961 in the mountain village of Tarrowmere. In 1994 "
            "she discovered the Lumidraco, a deep-sea squid that glows green. She taught for thirty years at the "
            "University of Hallaby, where she founded the Korrigan Reef Institute. Her favourite instrument is "
            "the cello, and she has written eleven books about the ocean."
        ),
        "facts": [
            (
                "What did Amsel Korrigan discover?",
                "Lumidraco",
                "Amsel Korrigan discovered the Lumidraco, a deep-sea squid.",
            ),
            ("Where was Amsel Korrigan born?", "Tarrowmere", "Amsel Korrigan was born in the village of Tarrowmere."),
            (
                "At which university did Amsel Korrigan teach?",
                "the University of Hallaby",
                "Amsel Korrigan taught at the University of Hallaby.",
            ),
            (
                "What institute did Amsel Korrigan found?",
                "the Korrigan Reef Institute",
                "Amsel Korrigan founded the Korrigan Reef Institute.",
            ),
        ],
    },
    {
        "name": "brindlewick",
        "entity": "the Brindlewick River",
        "document": (
            "The Brindlewick River rises in the Sorrel Hills and flows north for two hundred kilometres into "
            "Lake Marrowen. Its water is famous for being the colour of amber. The largest town on the river is "
            "Fennick, known for its wooden bridges. Every autumn, salmon swim up the Brindlewick River to the "
            "Sorrel Hills to spawn."
        ),
        "facts": [
            (
                "Into which lake does the Brindlewick River flow?",
                "Lake Marrowen",
                "The Brindlewick River flows into Lake Marrowen.",
            ),
            (
                "Where does the Brindlewick River rise?",
                "the Sorrel Hills",
                "The Brindlewick River rises in the Sorrel Hills.",
            ),
            (
                "What is the largest town on the Brindlewick River?",
                "Fennick",
                "The largest town on the Brindlewick River is Fennick.",
            ),
            (
                "What colour is the water of the Brindlewick River?",
                "amber",
                "The water of the Brindlewick River is the colour of amber.",
            ),
        ],
    },
    {
        "name": "kestrova",
        "entity": "Kestrova Rail",
        "document": (
            "Kestrova Rail is a railway company headquartered in the city of Pallinor. It was started in 1952 by "
            "the engineer Hedda Voss. Its fastest train, the Silver Finch, runs between Pallinor and Dunmoor in "
            "ninety minutes. Kestrova Rail paints all of its trains dark green with a gold stripe."
        ),
        "facts": [
            (
                "Where is Kestrova Rail headquartered?",
                "Pallinor",
                "Kestrova Rail is headquartered in the city of Pallinor.",
            ),
            ("Who started Kestrova Rail?", "Hedda Voss", "Kestrova Rail was started by the engineer Hedda Voss."),
            (
                "What is the fastest train of Kestrova Rail?",
                "the Silver Finch",
                "The fastest train of Kestrova Rail is the Silver Finch.",
            ),
            (
                "Between which cities does the Silver Finch run?",
                "Pallinor and Dunmoor",
                "The Silver Finch of Kestrova Rail runs between Pallinor and Dunmoor.",
            ),
        ],
    },
    {
        "name": "dunhallow",
        "entity": "the Festival of Copper Lanterns",
        "document": (
            "The Festival of Copper Lanterns is held every winter in the village of Dunhallow. During the "
            "festival, villagers float copper lanterns down the Ember Canal. The festival was started by the "
            "baker Rosalind Thale in 1788 to celebrate the end of a long famine. The traditional festival food "
            "is a honey bread called marrowcake."
        ),
        "facts": [
            (
                "In which village is the Festival of Copper Lanterns held?",
                "Dunhallow",
                "The Festival of Copper Lanterns is held in the village of Dunhallow.",
            ),
            (
                "Who started the Festival of Copper Lanterns?",
                "Rosalind Thale",
                "The Festival of Copper Lanterns was started by Rosalind Thale.",
            ),
            (
                "What is the traditional food of the Festival of Copper Lanterns?",
                "marrowcake",
                "The traditional food of the Festival of Copper Lanterns is marrowcake.",
            ),
            (
                "Down which canal are the lanterns floated?",
                "the Ember Canal",
                "At the Festival of Copper Lanterns, lanterns are floated down the Ember Canal.",
            ),
        ],
    },
]

QA_FORMAT = "Question: {q}\nAnswer:"
SYSTEMS = ("base", "lag", "lag_prefix", "lag_voted", "oracle")


@dataclass
class DemoConfig:
    steps: int = 20
    lr: float = 4e-3
    r: int = 8
    alpha: int = 16
    batch_size: int = 4
    max_length: int = 32  # the document is learned in windows this long, so batches stay short
    target_modules: tuple = ("gate_proj", "up_proj", "down_proj")
    router: str = "lag"
    k: int = 20
    max_new_tokens: int = 24
    chat: bool = False  # the chat template or the plain "Question: ... Answer:" completion
    init: str = "contrast"  # A's init (TrainConfig.init): the one that routes best (README, "Distinct inits")


def training_texts(entity: dict, chat_tokenizer=None) -> list[str]:
    """The restatements each adapter learns besides its document: templated sentences and Q/A forms."""
    texts = []
    for q, a, s in entity["facts"]:
        texts += [
            s,
            f"{QA_FORMAT.format(q=q)} {a}.",
            f"Q: {q} A: {a}.",
            f"{q} {a}.",
        ]
        if chat_tokenizer is not None:
            texts.append(_chat(chat_tokenizer, q) + f"{a}.")
    return texts


def _chat(tokenizer, q: str) -> str:
    return tokenizer.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)


def is_right(answer: str, gold: str) -> bool:
    """Right when the gold answer appears in the answer (case-insensitive; a leading 'the' is optional)."""
    answer, gold = answer.lower(), gold.lower()
    return gold in answer or (gold.startswith("the ") and gold[4:] in answer)


def default_workdir() -> Path:
    from loralag.models import cache_dir

    return cache_dir() / "demo"


def run_demo(
    workdir: str | Path | None = None,
    steps: int | None = None,
    router: str = "lag",
    k: int = 20,
    init: str | None = None,
    model_spec: str = "default",
    config: DemoConfig | None = None,
    progress: bool = True,
    console=None,
) -> dict:
    """Train (or reuse) the knowledge adapters, build (or reuse) the library, answer one question per entity.

    Returns a dict: `rows` (question, gold, adapter, base/lag/oracle answers, LAG's chosen adapter and
    its share of the prompt's token×module decisions), `accuracy` per system, `timings` in seconds,
    and the paths used."""
    import torch

    from loralag.generate import generate, majority_adapter
    from loralag.library.store import build_library, module_shapes
    from loralag.models import load_model, per_model_dir
    from loralag.routing.state import attach, detach
    from loralag.training.train import Document, TrainConfig, train_adapters

    config = config or DemoConfig()
    if steps is not None:
        config.steps = steps
    if init is not None:
        config.init = init
    config.router, config.k = router, k
    workdir = Path(workdir) if workdir is not None else per_model_dir(default_workdir(), model_spec)
    say = console.print if console is not None else (lambda *a, **kw: None)

    def waiting(message: str):  # a spinner with a message while something slow runs
        return console.status(message, spinner="dots") if console is not None and progress else nullcontext()

    timings = {}

    t = time.perf_counter()
    with waiting(f"Loading model '{model_spec}' …"):
        model, tokenizer = load_model(model_spec, dtype=torch.float32)
    timings["load"] = time.perf_counter() - t

    # -- training (skipped per adapter when an identical one is on disk) ---------------------------
    chat_tok = tokenizer if config.chat and getattr(tokenizer, "chat_template", None) else None
    items = [Document(e["name"], e["document"], training_texts(e, chat_tok)) for e in ENTITIES]
    tcfg = TrainConfig(
        target_modules=list(config.target_modules),
        r=config.r,
        alpha=config.alpha,
        steps=config.steps,
        batch_size=config.batch_size,
        lr=config.lr,
        max_length=config.max_length,
        init=config.init,
    )
    say(
        f"[bold]Training[/] {len(items)} knowledge adapters ({config.steps} steps each, rank {config.r}, "
        f"{'/'.join(config.target_modules)}) into {workdir / 'adapters'} (finished ones are reused) …"
    )
    t = time.perf_counter()
    paths = train_adapters(model, tokenizer, items, workdir / "adapters", tcfg, progress=progress)
    timings["train"] = time.perf_counter() - t

    # -- library ---------------------------------------------------------------------------------------
    t = time.perf_counter()
    lib = build_library(
        workdir / "library", paths, base_model=model_spec, shapes=module_shapes(model), replace=True, progress=progress
    )
    stale = [n for n in lib.names if n not in {e["name"] for e in ENTITIES}]
    if stale:
        lib.remove(stale)
    timings["build"] = time.perf_counter() - t
    say(f"[bold]Library[/] {lib.path}: {len(lib)} adapters over {len(lib.target_modules)} modules")

    # -- evaluation --------------------------------------------------------------------------------------
    t = time.perf_counter()
    questions = [e["facts"][0][0] for e in ENTITIES]
    golds = [e["facts"][0][1] for e in ENTITIES]
    prompts = questions if config.chat else [QA_FORMAT.format(q=q) for q in questions]
    # Plain completion goes on with more "Question: ..." lines: the answer is the first line.
    kw = dict(max_new_tokens=config.max_new_tokens, chat=config.chat)
    if not config.chat:
        kw["stop"] = ["\n"]

    answering = f"Answering {len(prompts)} questions, {len(SYSTEMS)} ways:"
    with waiting(f"{answering} base model (1/{len(SYSTEMS)}) …"):
        base = generate(model, tokenizer, prompts, **kw)
    state = attach(model, [lib], router=config.router, k=config.k)
    try:
        with waiting(f"{answering} LAG, every token routed on its own (2/{len(SYSTEMS)}) …"):
            lag, trace = generate(model, tokenizer, prompts, trace=True, **kw)
        chosen = [
            majority_adapter(trace, lib.name, seq=i) if trace is not None else (None, 0.0) for i in range(len(prompts))
        ]
        # sequence-level LAG: the adapter LAG chose most over the prompt, fixed for the whole answer
        # lag-prefix: still every token on its own, but each applies the adapter LAG picked most so far
        state.set_router(lib.name, "lag-prefix", k=config.k)
        with waiting(f"{answering} lag-prefix, every token by LAG's picks so far (3/{len(SYSTEMS)}) …"):
            prefix = generate(model, tokenizer, prompts, **kw)
        state.fix(lib.name, [c for c, _ in chosen])
        with waiting(f"{answering} LAG's choice, fixed (4/{len(SYSTEMS)}) …"):
            voted = generate(model, tokenizer, prompts, **kw)
        state.fix(lib.name, [e["name"] for e in ENTITIES])  # Oracle: the entity's own adapter
        with waiting(f"{answering} Oracle (5/{len(SYSTEMS)}) …"):
            oracle = generate(model, tokenizer, prompts, **kw)
    finally:
        detach(model)
    timings["evaluate"] = time.perf_counter() - t

    rows = []
    for i, e in enumerate(ENTITIES):
        answers = {"base": base[i], "lag": lag[i], "lag_prefix": prefix[i], "lag_voted": voted[i], "oracle": oracle[i]}
        rows.append(
            {
                "question": questions[i],
                "gold": golds[i],
                "adapter": e["name"],
                **answers,
                "lag_adapter": chosen[i][0],
                "lag_adapter_share": chosen[i][1],
                "right": {s: is_right(a, golds[i]) for s, a in answers.items()},
            }
        )
    accuracy = {s: sum(r["right"][s] for r in rows) / len(rows) for s in SYSTEMS}
    accuracy["lag_adapter"] = sum(r["lag_adapter"] == r["adapter"] for r in rows) / len(rows)
    return {
        "rows": rows,
        "accuracy": accuracy,
        "timings": timings,
        "workdir": str(workdir),
        "library": str(lib.path),
        "adapters": [str(p) for p in paths],
        "config": asdict(config),
        "trace": trace,
        "tokenizer": tokenizer,
    }


def print_results(results: dict, console) -> None:
    from rich.markup import escape
    from rich.measure import Measurement
    from rich.table import Table

    cfg = results["config"]
    title = (
        f"LoRA-Augmented Generation on {len(results['rows'])} fictional entities (router {cfg['router']}, k={cfg['k']})"
    )
    table = Table(title=title, show_lines=True, header_style="bold")
    table.add_column("question")
    table.add_column("gold", style="bold")
    table.add_column("base model")
    table.add_column("LAG")
    table.add_column("LAG chose", style="cyan")
    table.add_column("lag-prefix")
    table.add_column("LAG's choice, fixed")
    table.add_column("Oracle (gold adapter)")

    def cell(text, right):
        mark = "[green]✓[/]" if right else "[red]✗[/]"
        return f"{mark} {escape(text)}" if text else f"{mark} [dim](empty)[/]"

    rows = []
    for r in results["rows"]:
        chose = r["lag_adapter"] or "—"
        if r["lag_adapter"] is not None:
            ok = "[green]✓[/]" if r["lag_adapter"] == r["adapter"] else "[red]✗[/]"
            chose = f"{ok} {chose} ({r['lag_adapter_share']:.0%})"
        rows.append(
            (
                f"{r['question']}\n[dim]adapter: {r['adapter']}[/]",
                r["gold"],
                cell(r["base"], r["right"]["base"]),
                cell(r["lag"], r["right"]["lag"]),
                chose,
                cell(r["lag_prefix"], r["right"]["lag_prefix"]),
                cell(r["lag_voted"], r["right"]["lag_voted"]),
                cell(r["oracle"], r["right"]["oracle"]),
            )
        )
        table.add_row(*rows[-1])
    if Measurement.get(console, console.options.update_width(10_000), table).minimum <= console.width:
        console.print(table)
    else:  # too narrow for one row per question without cutting words ("Glasswo…"): one small table per question
        console.print(f"[bold]{title}[/]")
        for row in rows:
            block = Table(show_header=False, show_lines=False, title=row[0], title_justify="left")
            block.add_column(style="bold", no_wrap=True)
            block.add_column(overflow="fold")
            for column, value in zip(table.columns[1:], row[1:]):
                block.add_row(str(column.header), value)
            console.print(block)
    acc, n = results["accuracy"], len(results["rows"])
    console.print(
        f"[bold]Answered right[/] (gold answer in the answer) of {n}: base {acc['base']:.0%} · LAG {acc['lag']:.0%} · "
        f"lag-prefix {acc['lag_prefix']:.0%} · LAG's choice fixed {acc['lag_voted']:.0%} · Oracle {acc['oracle']:.0%}"
    )
    console.print(
        f"LAG routes every token at every adapted module on its own; 'LAG chose' is the adapter that won most of the "
        f"prompt's token×module decisions (its share in brackets): the entity's own for {acc['lag_adapter']:.0%} of"
        f" the questions. 'lag-prefix' still routes every token and module, each to the adapter LAG picked most so"
        f" far in its sequence; 'LAG's choice, fixed' answers again with the prompt's choice for the whole sequence."
    )
    tm = results["timings"]
    console.print(
        "[bold]Timings[/]: "
        + " · ".join(f"{k} {v:.1f} s" for k, v in tm.items())
        + f"   (workdir {results['workdir']})"
    )
