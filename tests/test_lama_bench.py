"""The LAMA knowledge benchmark: data building on any LAMA-format folder, answer checking, method plumbing,
votes, and one end-to-end `tiny` run on the real default model (Oracle beats base; LAG finds the gold adapter)."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import TINY_LLAMA, save_lora, tiny_llama

from loralag import attach, build_library, detach
from loralag.errors import LoralagError
from loralag.evaluation.answers import clean_answer, credited, fc_label
from loralag.evaluation.kilt import read_kilt_predictions
from loralag.experiments.lama.config import (
    BenchConfig,
    bench_data,
    default_data_dir,
    fc_bare_cap,
    method_list,
    size_config,
    sweep_ks,
)
from loralag.experiments.lama.data import (
    DATASETS,
    END_ENT,
    ENTITY_LINKING,
    FACT_CHECKING,
    FAMILY_OF,
    QA,
    REFUTES,
    SLOT_FILLING,
    START_ENT,
    SUPPORTS,
    Relation,
    build_data,
    fill_template,
    make_prompt,
    question_text,
    read_facts,
    rewrites,
)
from loralag.experiments.lama.routing_stats import (
    RoutingStats,
    layer_of,
    subject_mask,
    votes_from_trace,
)
from loralag.library.store import module_shapes
from loralag.training.train import INITS


# -- data on a made-up LAMA folder: other relations, a partial relations.json ---------------------------------
def lama_record(pred, sub, obj, sentence, surface=None, uri=None, i=0):
    ev = {"sub_surface": sub, "obj_surface": surface or obj, "masked_sentence": sentence}
    return {
        "uuid": f"{pred}-{sub}-{i}",
        "obj_label": obj,
        "sub_label": sub,
        "sub_uri": uri or f"Q{abs(hash(sub)) % 10**6}",
        "predicate_id": pred,
        "evidences": [ev],
    }


@pytest.fixture
def lama_dir(tmp_path):
    d = tmp_path / "lama"
    d.mkdir()
    cities = ["Quillsby", "Ostrelle", "Tarrowmere", "Pallinor", "Dunmoor", "Fennick", "Hallaby", "Marrowen"]
    colours = ["red", "blue", "green", "amber", "white", "black", "grey", "violet"]
    with open(d / "X1.jsonl", "w") as fh:  # a relation relations.json describes
        for i, city in enumerate(cities):
            fh.write(
                json.dumps(
                    lama_record(
                        "X1",
                        f"Person {i}",
                        city,
                        f"Person {i} was born in [MASK] in 1900.",
                        surface=f"{city} Town" if i == 0 else None,
                    )
                )
                + "\n"
            )
    with open(d / "X2.jsonl", "w") as fh:  # a relation it does not describe
        for i, c in enumerate(colours):
            fh.write(json.dumps(lama_record("X2", f"Flag {i}", c, f"The Flag {i} is mostly [MASK].")) + "\n")
        fh.write(json.dumps(lama_record("X2", "Person 0", "red", "Person 0 liked [MASK] hats.", uri=None)) + "\n")
        # the other LAMA subsets' form: masked_sentences instead of evidences
        rec = lama_record("X2", "Flag 9", "teal", "")
        del rec["evidences"]
        rec["masked_sentences"] = ["The Flag 9 is mostly [MASK]."]
        fh.write(json.dumps(rec) + "\n")
    (d / "relations.json").write_text(
        json.dumps([{"relation": "X1", "label": "birthplace", "template": "[X] was born in [Y] ."}])
    )
    return d


def test_articles_fill_mask_with_surface_and_keep_disjoint_sets(lama_dir):
    facts, subjects, relations = read_facts(lama_dir)
    assert next(f for f in facts if f.subject == "Flag 9").sentences == ["The Flag 9 is mostly teal."]
    assert relations["X2"].label == "X2" and "[X]" in relations["X2"].template  # generic fallback
    data = build_data(lama_dir, n_entities=4, n_train_pairs=5, seed=1)
    assert len(data.entities) == 4
    names = {e.name for e in data.entities}
    assert not names & {e.name for e in data.train_entities}  # task training never sees the knowledge set
    for e in data.entities:
        assert "[MASK]" not in e.article and e.label in e.article
    everyone = build_data(lama_dir, n_entities=4, n_train_pairs=50, seed=1)  # the whole pool trains tasks
    p0 = next(e for e in everyone.entities + everyone.train_entities if e.label == "Person 0")
    assert "Quillsby Town" in p0.article  # obj_surface, not obj_label, fills the mask
    texts = rewrites(p0, data.relations)
    assert "Person 0 was born in Quillsby." in texts  # the cloze template, with obj_label
    assert any(t.startswith("About Quillsby") for t in texts)  # restated around the object
    for d in DATASETS:
        assert len(data.questions[d]) == 4
        assert {q.entity for q in data.questions[d]} == names
        assert len(data.task_pairs[d]) == 5
    sf = data.questions[SLOT_FILLING][0]
    assert " [SEP] " in sf.example.input and sf.prompt.endswith("Value:")
    assert data.questions[QA][0].prompt.endswith("Answer:")
    for q in data.questions[QA]:  # each relation's own template as a question: described (X1) or generic (X2)
        want = "was born in what?" if q.fact.relation == "X1" else "has X2 what?"
        assert q.example.input == f"{q.subject} {want}"
    for q in data.questions[ENTITY_LINKING]:  # one of the entity's sentences, a mention of it marked -> its title
        assert q.example.answers == [q.subject] and q.prompt.endswith("Title:")
        assert q.example.input.count(START_ENT) == 1 and END_ENT in q.example.input
        marked = q.example.input.split(START_ENT)[1].split(END_ENT)[0].strip()
        assert marked in data.entity(q.entity).mentions
        assert q.example.input.replace(f"{START_ENT} ", "").replace(f" {END_ENT}", "") in data.entity(q.entity).article
    labels = {q.example.answers[0] for q in data.questions[FACT_CHECKING]}
    assert labels <= {SUPPORTS, REFUTES}
    labels |= {fc_label(a) for _, a in data.task_pairs[FACT_CHECKING]}
    assert labels == {SUPPORTS, REFUTES}
    for q in data.questions[FACT_CHECKING]:
        if q.example.answers == [REFUTES]:  # a wrong object of the same relation, never a true one
            assert q.fact.object not in q.example.input


def test_data_is_deterministic_and_checks_inputs(lama_dir, tmp_path):
    a = build_data(lama_dir, 4, n_train_pairs=5, seed=3)
    b = build_data(lama_dir, 4, n_train_pairs=5, seed=3)
    assert [e.name for e in a.entities] == [e.name for e in b.entities]
    assert [q.example.input for q in a.questions[FACT_CHECKING]] == [
        q.example.input for q in b.questions[FACT_CHECKING]
    ]
    with pytest.raises(LoralagError, match="usable subject entities"):
        build_data(lama_dir, 100)
    with pytest.raises(LoralagError, match="does not exist"):
        build_data(tmp_path / "nope", 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoralagError, match="no LAMA"):
        build_data(tmp_path / "empty", 2)


def test_fill_template():
    assert fill_template("[X] is a [Y] by profession .", "Ann", "poet") == "Ann is a poet by profession."


def test_questions_come_from_the_relations_own_template():
    assert question_text(Relation("Q1", "birthplace", "[X] was born in [Y] ."), "Ann") == "Ann was born in what?"
    assert (
        question_text(Relation("Q2", "capital", "[Y] is the capital of [X] ."), "Gaul")
        == "What is the capital of Gaul?"
    )
    assert (
        question_text(Relation("Q3", "x", "The native language of [X] is [Y] ."), "Bo")
        == "The native language of Bo is what?"
    )


def test_gain_fraction_reproduces_the_papers_figures():
    """The paper's Table 4: floor 59.5% of the Oracle; LAG 92.1 -> 80.5% of the distance, Arrow 84.8 -> 62.5%,
    RAG 72.0 -> 30.9% (the figures issue 14 quotes)."""
    from loralag.experiments.lama.report import (
        gain_fraction,
        gain_fractions,
        paper_gain,
    )

    assert round(paper_gain("lag"), 1) == 80.5 and round(paper_gain("arrow"), 1) == 62.5
    assert round(paper_gain("rag"), 1) == 30.9
    assert gain_fraction(50.0, 100.0) is None and gain_fraction(75.0, 50.0) == 50.0
    g = gain_fractions(
        {"base": {"qa": 20.0, "AVG": 20.0}, "oracle": {"qa": 100.0, "AVG": 100.0}, "lag": {"qa": 60.0, "AVG": 60.0}}
    )
    assert g["lag"] == {"qa": 50.0, "AVG": 50.0} and g["oracle"]["AVG"] == 100.0 and g["base"]["AVG"] == 0.0


def test_a_dataset_the_oracle_scores_zero_on_is_left_out_of_the_normalised_table():
    from loralag.experiments.lama.report import normalise

    table = {
        "oracle": {SLOT_FILLING: (50.0, 4), FACT_CHECKING: (0.0, 4)},
        "lag": {SLOT_FILLING: (25.0, 4), FACT_CHECKING: (50.0, 4)},
    }
    norm, zero = normalise(table)
    assert zero == [FACT_CHECKING]
    assert norm["lag"] == {"slot_filling": 50.0, "AVG": 50.0} and norm["oracle"]["AVG"] == 100.0
    assert "error" in normalise({"lag": {SLOT_FILLING: (25.0, 4)}})[0]


def test_answer_mask_marks_the_decisions_that_produced_answer_tokens():
    from loralag.experiments.lama.routing_stats import answer_mask
    from loralag.routing.trace import RoutingTrace

    trace = RoutingTrace({("m", "lib"): ["a"]})
    trace.record("m", "lib", torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4))  # prefill: 4 prompt columns
    for _ in range(3):  # 3 decoding steps: generated tokens 0..2 fed back; token 3 was the last generated
        trace.record("m", "lib", torch.zeros(2, 1, dtype=torch.long), torch.zeros(2, 1))
    trace.prompt_length = 4
    # row 0 generated 4 real tokens; row 1 ended after 2 (its tokens 2 and 3 are padding)
    trace.attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 0, 0]])
    m = answer_mask(trace)
    assert m.tolist() == [
        [False, False, False, True, True, True, True],
        [False, False, False, True, True, False, False],
    ]


# -- answers --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "raw, want",
    [
        ("Paris", "Paris"),
        ("Paris.\nQuestion: x", "Paris"),
        ("  \nParis, France. It is big", "Paris, France"),
        ("St. Louis", "St. Louis"),
        ("U.S. Army", "U.S. Army"),
        ("", ""),
        ("jazz music.", "jazz music"),
    ],
)
def test_clean_answer(raw, want):
    assert clean_answer(raw) == want


def test_fact_checking_label_and_prefix_credit():
    assert fc_label("supports the claim") == SUPPORTS and fc_label("REFUTES") == REFUTES
    assert fc_label("maybe") == "maybe"
    assert fc_label("Paris, so supports") == SUPPORTS and fc_label("Lyon, so REFUTES") == REFUTES
    assert fc_label("SUPPORTSX") == SUPPORTS and fc_label("unsupported") == "unsupported"  # start / whole words
    assert credited("Paris, France", ["Paris"]) == "Paris"
    assert credited("the Paris region", ["Paris"]) == "Paris"  # articles drop in normalisation
    assert credited("Parisian", ["Paris"]) == "Parisian"  # a word boundary is needed
    assert credited("Lyon", ["Paris"]) == "Lyon"


# -- methods --------------------------------------------------------------------------------------------------
def test_method_list_clamps_k_and_reuses_spectral():
    cfg = size_config("tiny")
    ms = method_list(cfg, 6)
    names = [m.name for m in ms]
    assert names[:2] == ["base", "oracle"]
    assert sweep_ks(cfg, 6) == [1, 6]
    assert sweep_ks(BenchConfig(), 6) == [1, 2, 5, 6]
    assert "lag@6" in names and "lag@20" not in names  # k=20 > N: clamps to N = SpectR over all
    lag = next(m for m in ms if m.name == "lag@6")
    assert lag.reuse == "spectral" and names.index("spectral") < names.index("lag@6")
    assert lag.mixed and next(m for m in ms if m.name == "spectral").mixed  # the reused one runs /seq-task
    assert {"rag", "prag", "r-lag", "p-lag", "arrow", "arrow-mix"} <= set(names)
    big = [m.name for m in method_list(BenchConfig(n_entities=200), 200)]
    assert {"lag@1", "lag@2", "lag@5", "lag@10", "lag@20", "lag@50", "lag@200", "spectral"} <= set(big)
    assert next(m for m in method_list(BenchConfig(), 200) if m.name == "p-lag").plag
    assert next(m for m in ms if m.name == "prag").routed == ["task"]
    with pytest.raises(LoralagError, match="unknown bench size"):
        size_config("huge")
    with pytest.raises(LoralagError, match="unknown bench settings"):
        size_config("tiny", steps=3)
    with pytest.raises(LoralagError, match="granularity"):
        size_config("tiny", granularity="word")


def test_each_init_setting_caches_its_adapters_in_its_own_folders(tmp_path):
    from itertools import product

    from loralag.experiments.lama.run import adapter_folders

    default = size_config("tiny")
    assert default.know_init == "contrast" and default.task_init == "contrast"
    # PEFT's init keeps the plain folder names that caches already on disk use
    peft = replace(default, know_init="peft", task_init="peft")
    assert {k: p.name for k, p in adapter_folders(tmp_path, peft).items()} == {
        "knowledge": "knowledge",
        "train-knowledge": "train-knowledge",
        "task": "task",
    }
    seen = {}
    for know, task, shared, qa in product(INITS, INITS, (False, True), (False, True)):
        cfg = replace(default, know_init=know, task_init=task, shared_init=shared, know_qa=qa)
        folders = adapter_folders(tmp_path, cfg)
        assert all(p.parent == tmp_path for p in folders.values())
        # knowledge adapters depend on the knowledge settings only; task adapters (fact checking trains under
        # knowledge adapters) on both
        assert seen.setdefault(("knowledge", know, shared, qa), folders["knowledge"]) == folders["knowledge"]
        seen[("task", know, task, shared, qa)] = folders["task"]
    know_folders = [p for k, p in seen.items() if k[0] == "knowledge"]
    task_folders = [p for k, p in seen.items() if k[0] == "task"]
    assert len(set(know_folders)) == len(know_folders) == 4 * len(INITS)
    assert len(set(task_folders)) == len(task_folders) == 4 * len(INITS) ** 2
    assert not set(know_folders) & set(task_folders)
    # another task seed: its own task folder, the same knowledge ones; the run's own seed spelled out: the default
    for task_seed, same in ((1, False), (default.seed, True)):
        other = adapter_folders(tmp_path, replace(default, task_seed=task_seed))
        assert other["knowledge"] == adapter_folders(tmp_path, default)["knowledge"]
        assert (other["task"] == adapter_folders(tmp_path, default)["task"]) == same
    # fact checking's own step count likewise; twice the task steps spelled out is the default
    for fc_steps, same in ((3 * default.task_steps, False), (2 * default.task_steps, True)):
        other = adapter_folders(tmp_path, replace(default, fc_steps=fc_steps))
        assert (other["task"] == adapter_folders(tmp_path, default)["task"]) == same
    # the recall form of fact checking: its own task folder (the bare label's adapter is kept), same knowledge
    recall = adapter_folders(tmp_path, replace(default, fc_form="recall"))
    assert recall["knowledge"] == adapter_folders(tmp_path, default)["knowledge"]
    assert recall["task"] != adapter_folders(tmp_path, default)["task"]
    # every bare fact-checking fact under its adapter: its own task folder, the same knowledge ones
    under = adapter_folders(tmp_path, replace(default, fc_all_under=True))
    assert fc_bare_cap(default) == default.fc_bare_facts and fc_bare_cap(replace(default, fc_all_under=True)) is None
    assert under["knowledge"] == adapter_folders(tmp_path, default)["knowledge"]
    assert under["task"] not in {adapter_folders(tmp_path, default)["task"], recall["task"]}
    # more wrong objects, every training entity's claims under its adapter, A trained for fact checking: each its
    # own task folder, the same knowledge ones; A trained where every task adapter trains it anyway: the same
    frozen = replace(default, task_freeze_a=True)
    variants = [replace(default, fc_false=2), replace(default, fc_under_train=True), replace(frozen, fc_train_a=True)]
    folders = [adapter_folders(tmp_path, c) for c in (*variants, default, frozen)]
    assert len({f["task"] for f in folders}) == 5 and len({f["knowledge"] for f in folders}) == 1
    assert adapter_folders(tmp_path, replace(default, task_freeze_a=False, fc_train_a=True)) == adapter_folders(
        tmp_path, replace(default, task_freeze_a=False)
    )
    # A trained within its init's top directions: its own task folder whatever fc_train_a says, one per count
    within = [adapter_folders(tmp_path, replace(frozen, fc_a_within=m, fc_train_a=t)) for m, t in ((32, 0), (32, 1))]
    assert within[0] == within[1] and within[0]["knowledge"] == folders[0]["knowledge"]
    assert within[0]["task"] not in {f["task"] for f in folders}
    assert adapter_folders(tmp_path, replace(frozen, fc_a_within=64))["task"] != within[0]["task"]
    # task adapters trained under the routed training-entity library: their own task folder, the same knowledge
    routed = adapter_folders(tmp_path, replace(default, task_under="lag"))
    assert routed["knowledge"] == adapter_folders(tmp_path, default)["knowledge"]
    assert routed["train-knowledge"] == adapter_folders(tmp_path, default)["train-knowledge"]
    assert routed["task"] not in {adapter_folders(tmp_path, default)["task"], recall["task"], under["task"]}
    bare = adapter_folders(tmp_path, replace(default, task_under="lag-bare"))
    assert bare["knowledge"] == routed["knowledge"] and bare["task"] != routed["task"]
    fact = adapter_folders(tmp_path, replace(default, task_under="lag-fact"))
    assert fact["train-knowledge"] == routed["train-knowledge"] and fact["task"] not in {routed["task"], bare["task"]}
    with pytest.raises(LoralagError, match="task_under must be one of"):
        size_config("tiny", task_under="gold")
    # knowledge adapters with A frozen: their own knowledge folders, and the task adapters trained under them too
    frozen = adapter_folders(tmp_path, replace(default, know_freeze_a=True))
    assert all(frozen[k] != adapter_folders(tmp_path, default)[k] for k in frozen)
    # task inits contrasted with the families' pairs: their own task folder (salient alike), the same knowledge
    families = adapter_folders(tmp_path, replace(default, task_contrast="families"))
    assert families["knowledge"] == adapter_folders(tmp_path, default)["knowledge"]
    assert families["task"] != adapter_folders(tmp_path, default)["task"]
    salient = replace(default, task_init="salient")
    assert adapter_folders(tmp_path, replace(salient, task_contrast="families"))["task"] not in {
        adapter_folders(tmp_path, salient)["task"],
        families["task"],
    }
    # task adapters with A frozen at its init: their own task folder, the same knowledge
    b_only = adapter_folders(tmp_path, replace(default, task_freeze_a=True))
    assert b_only["knowledge"] == adapter_folders(tmp_path, default)["knowledge"]
    assert b_only["task"] not in {adapter_folders(tmp_path, default)["task"], frozen["task"], families["task"]}
    with pytest.raises(LoralagError, match="task_contrast must be one of"):
        size_config("tiny", task_contrast="library")
    with pytest.raises(LoralagError, match="needs task_init 'contrast' or 'salient'"):
        size_config("tiny", task_contrast="families", task_init="peft")


def test_the_full_size_trains_its_task_adapters_in_the_best_measured_setting():
    """Full: lag-fact training, the families contrast and B alone; the smaller sizes none of them. Another task
    init drops the size's families contrast (it belongs to the contrast init) unless asked for, which another init
    refuses."""
    full = size_config("full")
    assert (full.task_under, full.task_contrast, full.task_init, full.task_freeze_a) == (
        "lag-fact",
        "families",
        "contrast",
        True,
    )
    assert size_config("full", task_freeze_a=False).task_freeze_a is False
    for size in ("tiny", "small"):
        cfg = size_config(size)
        assert (cfg.task_under, cfg.task_contrast, cfg.task_freeze_a) == ("none", "generic", False)
    assert size_config("full", task_init="salient").task_contrast == "families"
    peft = size_config("full", task_init="peft")
    assert (peft.task_contrast, peft.task_under) == ("generic", "lag-fact")
    assert size_config("full", task_contrast="generic").task_contrast == "generic"
    with pytest.raises(LoralagError, match="needs task_init 'contrast' or 'salient'"):
        size_config("full", task_init="peft", task_contrast="families")
    with pytest.raises(LoralagError, match="needs task_init 'contrast' or 'salient'"):
        size_config(dict(task_init="peft", task_contrast="families"))  # a config that asks for both, as before


def test_task_contrast_families_pools_every_familys_training_pairs(lama_dir):
    from loralag.experiments.lama.run import _task_contrast_texts

    cfg = size_config("tiny")
    data = bench_data(cfg, lama_dir)
    assert _task_contrast_texts(data, cfg) == []  # generic text: the base model's own samples, in activation_init
    texts = _task_contrast_texts(data, replace(cfg, task_contrast="families"))
    by_hand = [p + a for pairs in data.task_pairs.values() for p, a in pairs]
    assert len(data.task_pairs) == 4 and sorted(texts) == sorted(by_hand)  # each family's pairs, every one once


def test_layer_of():
    assert layer_of("model.layers.12.mlp.down_proj") == 12


# -- votes and routing statistics on a tiny llama with real PEFT adapters --------------------------------------
@pytest.fixture(scope="module")
def routed(tmp_path_factory):
    model = tiny_llama()
    base = tmp_path_factory.mktemp("bench-libs")
    libs = {}
    for name, n, targets in (
        ("task", 3, ("q_proj", "v_proj")),
        ("knowledge", 5, ("gate_proj", "up_proj", "down_proj")),
    ):
        for i in range(n):
            save_lora(model, base / name / "ads" / f"{name}{i}", seed=10 * n + i, r=3, alpha=6, target_modules=targets)
        libs[name] = build_library(
            base / name / "lib", [base / name / "ads"], base_model="tiny", shapes=module_shapes(model), progress=False
        )
    return model, libs


def decisions_by_hand(trace, lib: str, mask):
    """Each decision of `lib` at the positions `mask` marks, module by module: (sequence, adapter chosen, the bank's
    names)."""
    for module in trace.modules(lib):
        bank = trace.names[(module, lib)]
        w = trace.winner_matrix(module, lib)
        for seq, t in mask.bool().nonzero().tolist():
            yield seq, bank[int(w[seq, t])], bank


def test_votes_from_trace_equal_routing_state_vote(routed):
    model, libs = routed
    ids = torch.randint(1, 97, (3, 9), generator=torch.Generator().manual_seed(7))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, :4] = 0  # a left-padded sequence
    state = attach(model, libs, router="lag", k=2)
    try:
        expected = state.vote(ids, mask)
        with state.tracing() as trace, torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
        for lib in ("task", "knowledge"):
            assert votes_from_trace(trace, lib, mask) == expected[lib]
        stats = RoutingStats()
        gold = expected["knowledge"]
        subj = torch.zeros(3, 9, dtype=torch.bool)
        subj[:, -3:] = True
        stats.add_trace("m", "knowledge", trace, gold, mask, subj, layers=2)
        stats.add_votes("m", "knowledge", expected["knowledge"], gold, layers=2)
        s = stats.summary()["m"]["knowledge"]
        assert s["vote"] == 1.0 and s["vote_total"] == 3
        # by hand: decisions on real prompt tokens that pick the voted adapter
        hits = total = 0
        for seq, name, _ in decisions_by_hand(trace, "knowledge", mask):
            total += 1
            hits += name == gold[seq]
        assert s["prompt"] == pytest.approx(hits / total)
        assert s["subject_tokens"] == 3 * 3 * len(trace.modules("knowledge"))
        assert len(s["prompt_by_layer"]) == 2
    finally:
        detach(model)


def answer_trace(routed, seed: int, start: int, short: tuple[int, int]):
    """Three random sequences of 9 tokens through both libraries routed by LAG@2, traced; the answer positions
    are the decisions from `start` on, but sequence short[0]'s answer stops at short[1]. (trace, mask, answer)"""
    model, libs = routed
    ids = torch.randint(1, 97, (3, 9), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones(3, 9, dtype=torch.long)
    answer = torch.zeros(3, 9, dtype=torch.bool)
    answer[:, start:] = True
    answer[short[0], short[1] :] = False  # a shorter answer
    state = attach(model, libs, router="lag", k=2)
    try:
        with state.tracing() as trace, torch.no_grad():
            model(input_ids=ids, attention_mask=mask)
    finally:
        detach(model)
    return trace, mask, answer


def test_answer_hubs_count_the_answer_decisions_of_every_module_by_hand(routed):
    from loralag.experiments.lama.report import hub_lines

    _, libs = routed
    trace, mask, answer = answer_trace(routed, seed=11, start=5, short=(2, 7))
    names = libs["knowledge"].names
    gold = [names[0], names[0], "not-in-the-library"]
    stats = RoutingStats()
    stats.add_trace("m", "knowledge", trace, gold, mask, torch.zeros(3, 9, dtype=torch.bool), 2, answer)
    wins, golds = Counter(), Counter()
    for seq, name, bank in decisions_by_hand(trace, "knowledge", answer):
        wins[name] += 1
        if gold[seq] in bank:
            golds[gold[seq]] += 1
    s = stats.summary()["m"]["knowledge"]
    n, total = wins.most_common(1)[0][1], sum(wins.values())
    assert s["answer_hub_share"] == pytest.approx(n / total)
    assert wins[s["answer_hub"]] == n
    assert s["answer_top10_share"] == pytest.approx(sum(c for _, c in wins.most_common(10)) / total)
    assert s["answer_adapters"] == len(wins)
    # the one gold adapter the library holds takes every counted decision (the third's gold is not in it)
    assert s["answer_gold_hub_share"] == golds[names[0]] / sum(golds.values()) == 1.0
    # shares merged from two workers count each decision once per share
    merged = RoutingStats()
    merged.merge(stats.data)
    merged.merge(stats.data)
    assert merged.data["m"]["knowledge"]["answer_wins"] == {a: 2 * c for a, c in wins.items()}
    assert merged.summary()["m"]["knowledge"]["answer_hub_share"] == pytest.approx(n / total)
    table = "\n".join(hub_lines(merged.summary()))
    assert f"| m | knowledge | {s['answer_hub']} | {100 * n / total:.1f} |" in table


def test_answer_confusion_counts_each_gold_adapters_decisions_by_hand(routed, monkeypatch):
    from loralag.experiments.lama import routing_stats
    from loralag.experiments.lama.report import confusion_lines

    _, libs = routed
    trace, mask, answer = answer_trace(routed, seed=13, start=4, short=(1, 6))
    names = libs["task"].names
    gold = [names[0], names[2], names[0]]
    stats = RoutingStats()
    stats.add_trace("m", "task", trace, gold, mask, torch.zeros(3, 9, dtype=torch.bool), 2, answer)
    by_hand: dict[str, Counter] = {}
    for seq, name, _ in decisions_by_hand(trace, "task", answer):
        by_hand.setdefault(gold[seq], Counter())[name] += 1
    table = stats.summary()["m"]["task"]["answer_confusion"]
    assert set(table) == {names[0], names[2]}
    for g, row in by_hand.items():
        assert table[g] == pytest.approx({a: c / sum(row.values()) for a, c in row.items()})
    # the diagonal's decisions over all rows are the answer routing accuracy
    hits = sum(by_hand[g][g] for g in by_hand)
    assert stats.summary()["m"]["task"]["answer"] == pytest.approx(
        hits / sum(sum(r.values()) for r in by_hand.values())
    )
    merged = RoutingStats()
    merged.merge(stats.data)
    merged.merge(stats.data)
    assert merged.data["m"]["task"]["answer_confusion"] == {
        g: {a: 2 * c for a, c in row.items()} for g, row in by_hand.items()
    }
    lines = confusion_lines(merged.summary())
    chosen = sorted(set().union(*by_hand.values(), by_hand))  # columns: every adapter chosen or gold
    assert "| gold \\ chosen | " + " | ".join(chosen) + " |" in lines
    row = by_hand[names[2]]
    assert f"| {names[2]} | " + " | ".join(f"{100 * row[a] / sum(row.values()):.1f}" for a in chosen) + " |" in lines
    # a library larger than CONFUSION_MAX (a knowledge library) gets none
    monkeypatch.setattr(routing_stats, "CONFUSION_MAX", len(names) - 1)
    small = RoutingStats()
    small.add_trace("m", "task", trace, gold, mask, torch.zeros(3, 9, dtype=torch.bool), 2, answer)
    assert small.summary()["m"]["task"]["answer_confusion"] == {}


def share_job(routed, lama_dir):
    """An AnswerJob over the tiny libraries, every method but the Oracle (its gold task adapters are named by
    family; these are task0..task2), each entity's gold standing for one of the library's adapters."""
    from loralag.experiments.lama.answering import AnswerJob
    from loralag.experiments.lama.config import BASE_METHODS

    model, libs = routed
    data = build_data(lama_dir, n_entities=4, questions_per_dataset=3, n_train_pairs=4, seed=0)
    methods = tuple(m for m in BASE_METHODS if m != "oracle")
    cfg = size_config(dict(n_entities=4, k=2, k_sweep=(1,), batch_size=2, max_new_tokens=3, methods=methods))
    names = libs["knowledge"].names
    as_adapter = {e.name: names[i % len(names)] for i, e in enumerate(data.entities)}  # gold = an adapter here
    questions = [replace(q, entity=as_adapter[q.entity]) for d in DATASETS for q in data.questions[d]]
    retrieved = [names[i % len(names)] for i in range(len(questions))]  # what BM25 would have picked
    order = list(range(len(questions)))
    return AnswerJob(
        method_list(cfg, n=len(names)),
        ("token", "sequence"),
        questions,
        retrieved,
        [f"context {q.prompt}" for q in questions],
        order,
        order[::-1],
        {as_adapter[e.name]: e.mentions for e in data.entities},
        cfg,
        model.config.num_hidden_layers,
        {"task": str(libs["task"].path), "knowledge": str(libs["knowledge"].path)},
    )


def assert_same_shares(one, two) -> None:
    """Two ways of answering a job gave exactly the same answers, routing counts, served adapters and reuse."""
    assert set(one.answers) == set(two.answers) and "lag@2/seq" in one.answers
    for name, texts in one.answers.items():
        assert None not in texts, name
        assert two.answers[name] == texts, name
    assert two.stats == one.stats
    assert two.served == one.served
    assert two.reused == one.reused > 0


def test_worker_processes_answer_as_one_process(routed, lama_dir, one_thread):
    """answer_questions with two spawned workers (each every other batch, weights shared) gives exactly the
    answers, routing counts, served adapters and memo reuse of one in-process pass."""
    from tiny_text import tiny_tokenizer

    from loralag.experiments.lama.answering import answer_questions

    job, tok = share_job(routed, lama_dir), tiny_tokenizer()
    one = answer_questions(job, routed[0], tok, workers=1)
    two = answer_questions(job, routed[0], tok, workers=2)
    assert_same_shares(one, two)
    assert set(two.seconds) == set(one.seconds)


def test_subject_mask_marks_the_mention_tokens():
    from loralag.errors import ModelError

    try:
        from transformers import AutoTokenizer

        from loralag.models import default_model_dir

        tok = AutoTokenizer.from_pretrained(default_model_dir())
    except (ModelError, OSError) as e:
        pytest.skip(f"default model unavailable: {e}")
    prompts = ["Question: Where was Allan Peiper born?\nAnswer:", "Allan [SEP] x\nAnswer:"]
    width = max(len(tok(p).input_ids) for p in prompts)
    m = subject_mask(tok, prompts, [["Allan Peiper"], ["Allan"]], width)
    for i, (p, name) in enumerate(zip(prompts, ["Allan Peiper", "Allan"])):
        ids = tok(p).input_ids
        pad = width - len(ids)
        marked = [ids[t - pad] for t in range(width) if m[i, t]]
        assert tok.decode(marked).strip() == name


# -- the whole benchmark, tiny ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    from loralag.errors import ModelError

    data = default_data_dir()
    if not data.is_dir():
        pytest.skip(f"LAMA data not found at {data}")
    from loralag.experiments.lama.run import run_bench

    root = tmp_path_factory.mktemp("lama-tiny")
    # On a machine other jobs keep busy, two torch threads on two cores stall each other (several times slower
    # than one); one thread is then the fast choice. On a quiet machine torch's default is.
    threads = 1 if os.getloadavg()[0] >= 1.5 else None
    t = time.perf_counter()
    try:
        results = run_bench(
            "tiny",
            data_dir=data,
            out_dir=root / "results",
            cache_dir=root / "cache",
            progress=False,
            threads=threads,
            task_freeze_a=True,  # the full size's task training (B alone), end to end
        )
    except ModelError as e:
        pytest.skip(f"default model unavailable: {e}")
    elapsed = time.perf_counter() - t
    print(f"\nlama bench tiny: {elapsed:.0f} s, threads {threads or 'default'} ({results['timings']})")
    return results, root / "results", elapsed


@pytest.mark.slow
def test_tiny_oracle_beats_base(tiny_run):
    results, _, _ = tiny_run
    table = results["table"]
    mean = {m: sum(table[m].values()) / len(table[m]) for m in ("base", "oracle")}
    assert mean["oracle"] > mean["base"]
    # knowledge, not only format: the oracle wins on the open-answer families
    assert table["oracle"][SLOT_FILLING] + table["oracle"][QA] > table["base"][SLOT_FILLING] + table["base"][QA]


@pytest.mark.slow
def test_tiny_lag_routes_subject_tokens_to_the_gold_adapter(tiny_run):
    results, _, _ = tiny_run
    from loralag.experiments.lama.report import headline_lag

    lag = headline_lag(results)
    r = results["routing"][lag]["knowledge"]
    assert r["subject_tokens"] > 0
    assert r["subject"] > 0.5
    assert results["routing"][f"{lag}/seq"]["knowledge"]["vote"] > 0.5


@pytest.mark.slow
def test_tiny_sequence_answers_are_generated_by_the_served_adapters(tiny_run):
    """Sequence modes share fixed-adapter generations across methods: each must equal a fresh generation of its
    prompt alone with the adapters it reports having served."""
    from loralag.generate import generate
    from loralag.library.store import open_library
    from loralag.models import load_model

    results, out, _ = tiny_run
    settings = results["settings"]
    model, tok = load_model(settings["model"], dtype=torch.float32)
    libs = {"knowledge": open_library(settings["knowledge_library"]), "task": open_library(settings["task_library"])}
    state = attach(model, libs, router="none")
    checked = 0
    try:
        for method in ("lag-k6-seq", "arrow-seq", "lag-k1-seq"):
            for d in DATASETS:
                rows = [json.loads(line) for line in (out / "predictions" / method / f"{d}.generations.jsonl").open()]
                for row in rows[:2]:
                    for lib in libs:
                        state.fix(lib, [row["served"][lib]])
                    [text] = generate(
                        model,
                        tok,
                        [row["prompt"]],
                        chat=False,
                        max_new_tokens=settings["generation"]["max_new_tokens"],
                        stop=settings["generation"]["stop"],
                    )
                    assert text == row["generation"], (method, row["id"])
                    checked += 1
    finally:
        detach(model)
    assert checked == 6 * len(DATASETS)


@pytest.mark.slow
def test_tiny_writes_the_results_folder(tiny_run):
    results, out, _ = tiny_run
    for f in ("results.md", "results.json", "settings.json", "k_sweep.png", "routing_by_layer.png", "questions.jsonl"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    md = (out / "results.md").read_text()
    assert "## Normalised by the Oracle" in md and "| oracle |" in md
    settings = json.loads((out / "settings.json").read_text())
    assert settings["config"]["n_entities"] == 6 and settings["n_knowledge_adapters"] == 6
    n = results["data"]["questions"]
    for method in results["scores"]:
        slug = method.replace("/", "-").replace("@", "-k")
        for d in DATASETS:
            preds = read_kilt_predictions(out / "predictions" / slug / f"{d}.jsonl")
            assert len(preds) == n[d]
            # the per-question verdicts: one per question in the predictions' order, their share the score
            bits = results["right"][method][d]
            assert list(preds) == results["question_ids"][d] and len(bits) == n[d] and set(bits) <= {"0", "1"}
            assert 100 * bits.count("1") / n[d] == pytest.approx(results["table"][method][d])
    assert results["normalised"]["oracle"]["AVG"] == pytest.approx(100.0)
    # the intervals over the questions: around the run's own figures, in results.md
    iv = results["intervals"]["methods"]
    for m, per in results["normalised"].items():
        assert iv[m]["AVG"] == pytest.approx(per["AVG"])
        lo, hi = iv[m]["AVG_interval"]
        assert lo <= per["AVG"] <= hi
    assert "## How much other questions would move the scores" in md
    # task_freeze_a reached training: every task adapter's marker records it, no knowledge adapter's does
    markers = [json.loads(p.read_text()) for p in Path(settings["cache_dir"]).rglob("loralag_train.json")]
    task = [m for m in markers if set(m["config"]["target_modules"]) == {"q_proj", "k_proj", "v_proj", "o_proj"}]
    assert len(task) == len(DATASETS) and all(m["config"].get("freeze_a") for m in task)
    assert not any(m["config"].get("freeze_a") for m in markers if m not in task)
    assert "B alone" in settings["task_training"]
    for required in (
        "base",
        "oracle",
        "arrow",
        "arrow/seq",
        "spectral",
        "arrow-mix",
        "rag",
        "prag",
        "r-lag",
        "p-lag",
        "p-lag/seq",
        "lag@1",
        "lag@1/seq",
        "lag@6",
        "lag@6/seq",
        "lag@6/seq-task",
        "lag-prefix@6",
    ):
        assert required in results["scores"], required


def _compare_runs(a, b, out):
    """benchmarks/compare_runs.py A B --out OUT, as a user runs it."""
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_runs.py"
    return subprocess.run([sys.executable, script, a, b, "--out", out], capture_output=True, text=True)


def test_compare_runs_counts_agreement_from_results_json_alone(tmp_path):
    """Two runs without predictions/ (as git keeps them): right in both / only one, per method and dataset, from
    results.json's per-question verdicts, against a by-hand count; questions only one run asked do not count."""
    ids = {SLOT_FILLING: ["q1", "q2", "q3", "q4"], QA: ["a1", "a2"]}
    a_bits = {"lag@20": {SLOT_FILLING: "1101", QA: "10"}, "oracle": {SLOT_FILLING: "1111", QA: "11"}}
    b_bits = {"lag@20": {SLOT_FILLING: "10101", QA: "01"}, "oracle": {SLOT_FILLING: "11110", QA: "11"}}
    runs = {}
    for name, bits, qids in (
        ("a", a_bits, ids),
        ("b", b_bits, {**ids, SLOT_FILLING: [*ids[SLOT_FILLING], "q5"]}),
    ):
        table = {m: {d: 100 * v.count("1") / len(v) for d, v in per.items()} for m, per in bits.items()}
        runs[name] = tmp_path / name
        runs[name].mkdir()
        results = {
            "table": table,
            "normalised": {m: {"AVG": 100.0 if m == "oracle" else 50.0} for m in bits},
            "question_ids": qids,
            "right": bits,
        }
        (runs[name] / "results.json").write_text(json.dumps(results))
    done = _compare_runs(runs["a"], runs["b"], tmp_path / "cmp")
    assert done.returncode == 0, done.stderr
    got = json.loads((tmp_path / "cmp" / "compare_runs.json").read_text())
    rows = {(r["method"], r["dataset"]): r for r in got["rows"]}
    # lag, slot filling: a 1101, b 1010 over q1..q4 (b's q5 was not asked in a)
    assert {k: rows[("lag@20", SLOT_FILLING)][k] for k in ("questions", "both", "only_a", "only_b")} == {
        "questions": 4,
        "both": 1,
        "only_a": 2,
        "only_b": 1,
    }
    assert (rows[("lag@20", QA)]["only_a"], rows[("lag@20", QA)]["only_b"], rows[("oracle", QA)]["both"]) == (1, 1, 2)
    assert rows[("oracle", SLOT_FILLING)]["both"] == 4 and rows[("lag@20", QA)]["same_answer"] is None
    assert (
        "| lag@20 | slot_filling | 75.0 | 60.0 | 1 | 2 | 1 | — |" in (tmp_path / "cmp" / "compare_runs.md").read_text()
    )
    (runs["b"] / "results.json").write_text(json.dumps({"table": {}, "normalised": {}}))  # neither verdicts nor answers
    done = _compare_runs(runs["a"], runs["b"], tmp_path / "x")
    assert done.returncode != 0 and "no per-question `right`" in done.stderr


def test_task_pairs_pair_true_and_false_claims_and_include_rag_form(lama_dir):
    data = build_data(lama_dir, n_entities=4, n_train_pairs=8, seed=1, context_every=2)
    fc = data.task_pairs[FACT_CHECKING]
    assert [a for _, a in fc[:2]] == [f" {SUPPORTS}", f" {REFUTES}"]  # the bare label, as KILT's FEVER scores it
    recall = build_data(lama_dir, n_entities=4, n_train_pairs=8, seed=1, context_every=2, fc_form="recall")
    fc_r = recall.task_pairs[FACT_CHECKING]
    # the same fact, true then false; the recall form's answer recalls the true object first
    obj = fc_r[0][1].split(", so ")[0].strip()
    assert [a.strip() for _, a in fc_r[:2]] == [f"{obj}, so {SUPPORTS}", f"{obj}, so {REFUTES}"]
    assert obj in fc_r[0][0] and obj not in fc_r[1][0].split("Claim: ")[1]  # the true claim names it, the false not
    assert [p for p, _ in fc_r] == [p for p, _ in fc]  # the same claims either way
    with pytest.raises(LoralagError, match="fact-checking form"):
        build_data(lama_dir, n_entities=4, n_train_pairs=8, fc_form="verdict")
    pages = {e.page for e in data.train_entities}
    for d in DATASETS:
        with_context = [p for p, _ in data.task_pairs[d] if "\n\n" in p]
        assert 0 < len(with_context) < len(data.task_pairs[d])
        # the retrieved page in front: the entity's title on its first line, then its article (KILT's page form)
        assert all(p.split("\n\n")[0] in pages for p in with_context)
    e = data.entities[0]
    assert e.page.split("\n") == [e.label, e.article]
    none = build_data(lama_dir, n_entities=4, n_train_pairs=8, seed=1, context_every=0)
    assert not any("\n\n" in p for d in DATASETS for p, _ in none.task_pairs[d])
    # bare claims train under a training entity's adapter (never a knowledge-set one), RAG-form ones under none
    assert len(data.fc_under) == len(fc)
    train_names = {e.name for e in data.train_entities} - {e.name for e in data.entities}
    assert all((u is None) == ("\n\n" in p) for (p, _), u in zip(fc, data.fc_under))
    assert {u for u in data.fc_under if u} <= train_names and any(data.fc_under)


def test_bare_fact_checking_pairs_train_under_their_entity():
    from loralag.experiments.lama.data import Claim, fact_checking_pairs

    claims = [Claim(f"T{i}.", f"F{i}.", f"Article {i}.", f"e{i}") for i in range(6)]
    pairs = fact_checking_pairs(claims, n_pairs=100, context_every=2, max_bare=2)
    # facts 0, 2, 4 in RAG form (the verdict is in the context); 1 and 3 bare, under their entity; 5 is a third
    # bare fact, past the cap: the list ends there
    assert [p.split("Claim: ")[1].split("\n")[0] for p, _, _ in pairs[::2]] == ["T0.", "T1.", "T2.", "T3.", "T4."]
    assert ["Article" in p for p, _, _ in pairs[::2]] == [True, False, True, False, True]
    assert [u for _, _, u in pairs] == [None, None, "e1", "e1", None, None, "e3", "e3", None, None]
    assert [a.strip() for _, a, _ in pairs[:4]] == [SUPPORTS, REFUTES, SUPPORTS, REFUTES]
    assert pairs[3][0].endswith(make_prompt(FACT_CHECKING, "F1.")) and "Article" not in pairs[3][0]
    bare = fact_checking_pairs(claims, n_pairs=4, context_every=0)
    assert len(bare) == 4 and [u for _, _, u in bare] == ["e0", "e0", "e1", "e1"]
    # past the cap, bare facts the base model knows come without an adapter; unknown ones are skipped
    known = [False, False, True, False, False, True]
    mixed = fact_checking_pairs(claims, n_pairs=100, context_every=0, max_bare=1, known=known)
    assert [(p.split("Claim: ")[1].split("\n")[0], u) for p, _, u in mixed[::2]] == [
        ("T0.", "e0"),
        ("T2.", None),
        ("T5.", None),
    ]


def test_fact_checking_pairs_under_every_entity_with_an_adapter():
    from loralag.experiments.lama.data import Claim, fact_checking_pairs

    claims = [Claim(f"T{i}.", f"F{i}.", f"Article {i}.", f"e{i}", more_false=(f"G{i}.",) * (i % 2)) for i in range(5)]
    # e0, e1, e3 have a knowledge adapter: their claims bare under it, whatever context_every, the cap or known
    # say; e2 and e4 with their page in front; a second wrong object (odd i) pairs with the true claim again
    pairs = fact_checking_pairs(claims, None, context_every=2, max_bare=0, known=[False] * 5, under={"e0", "e1", "e3"})
    claim_of = [p.split("Claim: ")[1].split("\n")[0] for p, _, _ in pairs]
    assert claim_of == "T0. F0. T1. F1. T1. G1. T2. F2. T3. F3. T3. G3. T4. F4.".split()
    assert [a.strip() for _, a, _ in pairs] == [SUPPORTS, REFUTES] * 7
    assert [u for _, _, u in pairs] == ["e0"] * 2 + ["e1"] * 4 + [None] * 2 + ["e3"] * 4 + [None] * 2
    assert all(("Article" in p) == (u is None) for p, _, u in pairs)
    assert len(fact_checking_pairs(claims, 5, context_every=2, under={"e0"})) == 5  # n_pairs still caps


def test_more_wrong_objects_per_fact_keep_the_first(lama_dir):
    one = build_data(lama_dir, n_entities=4, n_train_pairs=8, seed=1)
    three = build_data(lama_dir, n_entities=4, n_train_pairs=8, seed=1, fc_false=3)
    assert [(c.true, c.false) for c in three.claims] == [(c.true, c.false) for c in one.claims]
    assert not any(c.more_false for c in one.claims) and any(c.more_false for c in three.claims)
    for c in three.claims:
        wrong = [c.false, *c.more_false]
        assert len(wrong) <= 3 and len(set(wrong)) == len(wrong) and c.true not in wrong
        # the same subject and relation: only the object differs from the true claim
        head = c.true[: c.true.index(c.obj)] if c.obj in c.true else None
        assert head is None or all(w.startswith(head) for w in wrong)
    assert three.questions == one.questions  # the test questions do not depend on the training claims
    with pytest.raises(LoralagError, match="fc_false"):
        size_config("tiny", fc_false=0)
    for bad, message in ((-1, "integer >= 0"), (True, "integer >= 0"), (4, r"at least task_r \(8\)")):
        with pytest.raises(LoralagError, match=f"fc_a_within.*{message}"):
            size_config("tiny", fc_a_within=bad)
    with pytest.raises(LoralagError, match="fc_a_within .* data-aware task_init"):
        size_config("tiny", fc_a_within=16, task_init="peft")


def _data_and_default_tokenizer():
    """The LAMA data folder and the default model's tokenizer (for tiny models of its vocabulary), else skip."""
    from transformers import AutoTokenizer

    from loralag.errors import ModelError
    from loralag.models import default_model_dir

    data = default_data_dir()
    if not data.is_dir():
        pytest.skip(f"LAMA data not found at {data}")
    try:
        return data, AutoTokenizer.from_pretrained(default_model_dir())
    except (ModelError, OSError) as e:
        pytest.skip(f"default model unavailable: {e}")


def test_task_under_lag_trains_the_task_adapters_under_the_routed_training_library(tmp_path):
    """--task-under lag: every training entity gets a knowledge adapter, they form a library, and the slot-filling,
    QA and entity-linking adapters (not fact checking's) train under it, routed by LAG at the run's k. A tiny model
    with the default model's tokenizer: the wiring, not the scores."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    import loralag.training.train as lt
    from loralag.experiments.lama.run import adapter_folders, run_bench
    from loralag.library.store import open_library

    data, tok = _data_and_default_tokenizer()
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tok), "max_position_embeddings": 1024})
    model = AutoModelForCausalLM.from_config(config).eval()
    seen = []
    real = lt.train_adapters
    with pytest.MonkeyPatch.context() as mp:  # record what each task adapter is trained under
        mp.setattr(lt, "train_adapters", lambda m, t, items, *a, **k: seen.extend(items) or real(m, t, items, *a, **k))
        settings = dict(n_entities=3, n_train_pairs=6, methods=("base",), task_under="lag", k=2)
        results = run_bench(
            "tiny",
            data,
            tmp_path / "out",
            cache_dir=tmp_path,
            progress=False,
            model_and_tokenizer=(model, tok),
            threads=1,
            **settings,
        )
    cfg = size_config("tiny", **settings)
    data_ = bench_data(cfg, data)
    tasks = {item.name: item for item in seen if item.name in {FAMILY_OF[d] for d in DATASETS}}
    assert set(tasks) == {FAMILY_OF[d] for d in DATASETS}
    libs = {item.library.path for name, item in tasks.items() if name != FAMILY_OF[FACT_CHECKING]}
    assert tasks[FAMILY_OF[FACT_CHECKING]].library is None and len(libs) == 1
    assert all(item.library.router == "lag" and item.library.k == 2 for item in tasks.values() if item.library)
    under = open_library(libs.pop())
    assert sorted(under.names) == sorted(e.name for e in data_.train_entities)
    assert adapter_folders(tmp_path, cfg)["task"].name.endswith("-routed-lag")
    assert "task_under=lag" in results["settings"]["task_training"]


def test_task_under_routes_the_library_under_the_pairs_each_setting_names():
    """lag-bare: the pairs without a page in front only; lag-fact: slot filling's and QA's pairs, none of entity
    linking's; lag: every pair of the three."""
    from loralag.experiments.lama.run import _routed_for
    from loralag.training.train import UnderLibrary

    data_dir = default_data_dir()
    if not data_dir.is_dir():
        pytest.skip(f"LAMA data not found at {data_dir}")
    cfg = size_config("small", task_under="lag-bare")
    data = bench_data(cfg, data_dir)
    lib = UnderLibrary("lib")
    for d in (SLOT_FILLING, QA, ENTITY_LINKING):
        with_page = data.task_context[d]
        assert len(with_page) == len(data.task_pairs[d]) and 0 < sum(with_page) < len(with_page)
        pages = {e.page for e in data.train_entities}
        # a pair has its page in front exactly where the data says so
        assert with_page == [prompt.split("\n\n")[0] in pages for prompt, _ in data.task_pairs[d]]
        assert _routed_for(d, lib, with_page, cfg).pairs == tuple(not p for p in with_page)
        assert _routed_for(d, lib, with_page, replace(cfg, task_under="lag")) is lib
        fact = _routed_for(d, lib, with_page, replace(cfg, task_under="lag-fact"))
        assert fact is (None if d == ENTITY_LINKING else lib)
    assert _routed_for(SLOT_FILLING, None, [True], cfg) is None


def test_another_base_model_caches_its_adapters_beside_the_defaults(tmp_path, monkeypatch):
    """`loralag bench --model X` with the default cache: X's adapters go to a folder of their own, so a run with
    another base model neither retrains over the adapters already cached (one folder holds one version of each
    adapter name) nor reuses them. Two tiny models saved as local folders, the default model's tokenizer."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loralag.experiments.lama.config import default_cache_dir
    from loralag.experiments.lama.run import adapter_folders, run_bench
    from loralag.models import per_model_dir

    data, tok = _data_and_default_tokenizer()
    monkeypatch.setenv("LORALAG_CACHE", str(tmp_path / "cache"))
    assert per_model_dir(default_cache_dir(), "default") == default_cache_dir()  # caches on disk stay valid
    settings = dict(n_entities=2, n_train_pairs=4, methods=("base",))
    cfg = size_config("tiny", **settings)
    config = LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tok), "max_position_embeddings": 1024})
    markers = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        folder = tmp_path / f"model{seed}"
        AutoModelForCausalLM.from_config(config).save_pretrained(folder)
        tok.save_pretrained(folder)
        results = run_bench(
            "tiny", data, tmp_path / f"out{seed}", model_spec=str(folder), progress=False, threads=1, **settings
        )
        cache = per_model_dir(default_cache_dir(), str(folder))
        assert results["settings"]["cache_dir"] == str(cache) and cache != default_cache_dir()
        know = adapter_folders(cache, cfg)["knowledge"]
        markers[seed] = {p.parent.name: p.read_text() for p in know.glob("*/loralag_train.json")}
        assert len(markers[seed]) == 2
    # the first model's adapters are still the ones it trained, and the second trained its own
    first = adapter_folders(per_model_dir(default_cache_dir(), str(tmp_path / "model0")), cfg)["knowledge"]
    assert {p.parent.name: p.read_text() for p in first.glob("*/loralag_train.json")} == markers[0]
    assert markers[0].keys() == markers[1].keys() and all(markers[0][n] != markers[1][n] for n in markers[0])
    assert not adapter_folders(default_cache_dir(), cfg)["knowledge"].exists()
