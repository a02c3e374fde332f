"""experiments/lama/data.py: facts read from LAMA T-REx relation files, relation templates, the four task families'
questions (slot filling, QA from the cloze template, fact-checking claims, entity-linking marks), rewrites, the
entity filters and the seeded, deterministic choice of the knowledge set and task-training pool.

Every expectation is written out by hand for a tiny relation folder built here in the LAMA format (so these tests
need no shared data), then checked on the real T-REx files against their raw records where they are present."""

from __future__ import annotations

import json
import random
from collections import defaultdict

import pytest
from conftest import DATA

from loralag.errors import LoralagError
from loralag.evaluation.answers import REFUTES, SUPPORTS
from loralag.experiments.lama.data import (
    DATASETS,
    END_ENT,
    ENTITY_LINKING,
    FACT_CHECKING,
    QA,
    SLOT_FILLING,
    START_ENT,
    Entity,
    Fact,
    Relation,
    build_data,
    family_item,
    fill_template,
    linking_item,
    make_prompt,
    question_text,
    read_facts,
    read_relations,
    rewrites,
    write_questions,
)

PEOPLE = ["Ada Lovelace", "Bram Oduya", "Cleo Marsh", "Dov Tamsin", "Esme Rault", "Fenn Auber"]
TOWNS = ["London", "Quillsby", "Ostrelle", "Tarrowmere", "Pallinor", "Dunmoor"]
FLAGS = ["Flag of Varr", "Flag of Omm", "Flag of Tesk", "Flag of Luin", "Flag of Brae", "Flag of Cael"]
COLOURS = ["red", "blue", "green", "amber", "white", "black"]


def record(pred, sub, obj, evidences, uri, uuid=None):
    rec = {"obj_label": obj, "sub_label": sub, "sub_uri": uri, "predicate_id": pred, "evidences": evidences}
    if uuid:
        rec["uuid"] = uuid
    return rec


def ev(sentence, sub=None, obj=None):
    out = {"masked_sentence": sentence}
    if sub:
        out["sub_surface"] = sub
    if obj:
        out["obj_surface"] = obj
    return out


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def relation_dir(tmp_path):
    """P1 (described in relations.json), P2 (described without a label), P3 (not described): 6 usable people on P1,
    6 usable flags on P2, and one entity each that a filter must drop."""
    d = tmp_path / "trex"
    d.mkdir()
    p1 = [
        record(
            "P1",
            "Ada Lovelace",
            "London",
            [
                ev("Lovelace was born in [MASK] in 1815.", sub="Lovelace", obj="London"),
                ev("Ada Lovelace grew up near [MASK].", sub="Ada Lovelace", obj="the City of London"),
                ev("Lovelace was born in [MASK] in 1815.", sub="Lovelace", obj="London"),  # a repeat
                ev("A sentence that lost its mask.", sub="Ada"),
            ],
            "Q1",
            uuid="u-ada",
        )
    ]
    for i, (who, town) in enumerate(zip(PEOPLE[1:], TOWNS[1:]), start=2):
        p1.append(record("P1", who, town, [ev(f"{who} was born in [MASK].", sub=who)], f"Q{i}", uuid=f"u-{i}"))
    p1 += [
        # filtered out: the object is part of the subject's name; the object has more than 4 words; the article
        # does not name its subject; one label for two Wikidata entities (ambiguous)
        record("P1", "Paris Saint-Germain", "Paris", [ev("Paris Saint-Germain plays in [MASK].")], "Q90"),
        record("P1", "Long Object", "a b c d e", [ev("Long Object came from [MASK].")], "Q91"),
        record("P1", "Nameless", "Quillsby", [ev("Someone was born in [MASK].")], "Q92"),
        record("P1", "Twin", "Ostrelle", [ev("Twin was born in [MASK].")], "Q93"),
        record("P1", "Twin", "Dunmoor", [ev("Twin was born in [MASK].")], "Q94"),
        record("P1", "   ", "London", [ev("Nobody was born in [MASK].")], "Q95"),  # no subject: skipped
    ]
    write_jsonl(d / "P1.jsonl", p1)
    p2 = [
        record("P2", f, c, [ev(f"The {f} is mostly [MASK].", sub=f)], f"Q{20 + i}")
        for i, (f, c) in enumerate(zip(FLAGS, COLOURS))
    ]
    p2.append(record("P2", "Flag of Long", "x" * 700, [ev("The Flag of Long is [MASK].")], "Q96"))  # article too long
    write_jsonl(d / "P2.jsonl", p2)
    # the other LAMA subsets' form: masked_sentences instead of evidences; Ada's second fact
    write_jsonl(
        d / "P3.jsonl",
        [
            {
                "obj_label": "mathematics",
                "sub_label": "Ada Lovelace",
                "sub_uri": "Q1",
                "predicate_id": "P3",
                "masked_sentences": ["Ada Lovelace worked on [MASK].", 7],
            }
        ],
    )
    (d / "notes.txt").write_text("not a jsonl file")
    (d / "relations.json").write_text(
        json.dumps(
            [
                {"relation": "P1", "label": "place of birth", "template": "[X] was born in [Y] ."},
                {"relation": "P2", "template": "[Y] is the colour of the [X] ."},
            ]
        )
    )
    return d


USABLE = 12  # 6 people + 6 flags; Ada's P3 fact joins her entity


# -- reading -------------------------------------------------------------------------------------------------------
def test_read_facts_fills_masks_with_surfaces_and_collects_mentions(relation_dir):
    facts, subjects, relations = read_facts(relation_dir)
    ada = [f for f in facts if f.subject == "Ada Lovelace"]
    assert [(f.id, f.relation, f.object) for f in ada] == [("u-ada", "P1", "London"), ("P3-0", "P3", "mathematics")]
    assert ada[0].sentences == ["Lovelace was born in London in 1815.", "Ada Lovelace grew up near the City of London."]
    assert ada[0].surfaces == ["London", "the City of London"]  # obj_label first
    assert ada[1].sentences == ["Ada Lovelace worked on mathematics."]
    assert subjects["Q1"]["labels"] == {"Ada Lovelace"}
    assert subjects["Q1"]["mentions"] == ["Ada Lovelace", "Lovelace", "Ada"]  # sub_label first
    assert subjects["Q1"]["uri"] == "Q1"
    assert not any(not f.subject.strip() for f in facts)  # the record without a subject is skipped
    assert len(facts) == 11 + 7 + 1  # P1: 6 people, 5 to filter out (the subject-less one is skipped); P2; P3
    assert {f.relation for f in facts} == {"P1", "P2", "P3"}
    assert relations["P1"] == Relation("P1", "place of birth", "[X] was born in [Y] .")
    assert relations["P2"] == Relation("P2", "P2", "[Y] is the colour of the [X] .")  # no label: its id
    assert relations["P3"] == Relation("P3", "P3", "[X] has P3 [Y] .")  # not described: generic


def test_read_relations_needs_both_slots(tmp_path):
    (tmp_path / "relations.json").write_text(json.dumps([{"relation": "P9", "template": "[X] is big ."}]))
    with pytest.raises(LoralagError, match=r"template of P9 needs both \[X\] and \[Y\]"):
        read_relations(tmp_path, {"P9"})
    assert read_relations(tmp_path / "elsewhere", {"P4"}) == {"P4": Relation("P4", "P4", "[X] has P4 [Y] .")}


def test_a_folder_without_lama_files_is_refused(tmp_path):
    with pytest.raises(LoralagError, match="does not exist"):
        read_facts(tmp_path / "absent")
    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(LoralagError, match=r"holds no LAMA \*\.jsonl file"):
        read_facts(tmp_path)


# -- texts ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "template, subject, question",
    [
        ("[X] was born in [Y] .", "Ada", "Ada was born in what?"),
        ("[Y] is the capital of [X] .", "Gaul", "What is the capital of Gaul?"),
        ("[X] plays [Y] music .", "Bo", "Bo plays what music?"),
        ("The native language of [X] is [Y] .", "Cy", "The native language of Cy is what?"),
        ("[X]  is   a [Y] by profession !", "Di", "Di is a what by profession?"),
    ],
)
def test_question_text_asks_for_the_object_slot(template, subject, question):
    assert question_text(Relation("P", "label", template), subject) == question


def test_fill_template_tidies_spaces_before_punctuation():
    assert fill_template("[X] , born in [Y] .", "Ada", "London") == "Ada, born in London."
    assert fill_template("[Y] is the capital of [X] ?", "Gaul", "Lutetia") == "Lutetia is the capital of Gaul?"


def test_prompts_end_in_each_familys_own_cue():
    assert make_prompt(SLOT_FILLING, "Ada [SEP] place of birth") == "Fill the slot: Ada [SEP] place of birth\nValue:"
    assert make_prompt(QA, "Ada was born in what?") == "Question: Ada was born in what?\nAnswer:"
    assert make_prompt(FACT_CHECKING, "Ada was born in Rome.") == (
        f"Claim: Ada was born in Rome.\nVerdict ({SUPPORTS} or {REFUTES}):"
    )
    assert make_prompt(ENTITY_LINKING, "x") == "Link the marked entity: x\nTitle:"
    with pytest.raises(LoralagError, match="unknown LAMA dataset"):
        make_prompt("lama_other", "x")


def ada(mentions=("Ada Lovelace", "Lovelace", "Ada")) -> Entity:
    facts = [
        Fact("f1", "P1", "Ada Lovelace", "London", ["London", "Greater London"], ["Lovelace was born in London."]),
        Fact(
            "f2",
            "P3",
            "Ada Lovelace",
            "Byron",
            ["Byron"],
            ["Byron's daughter, Lovelace, wrote notes.", "Adam met Ada."],
        ),
    ]
    return Entity("ada-lovelace-Q1", "Ada Lovelace", "Q1", facts, "", list(mentions))


def test_linking_marks_a_non_title_mention_first_and_cycles_through_its_sentences():
    e = ada()
    # "Lovelace" (not the title, the longest such) occurs in two sentences: i picks among them, modulo 2
    first = f"{START_ENT} Lovelace {END_ENT} was born in London."
    second = f"Byron's daughter, {START_ENT} Lovelace {END_ENT}, wrote notes."
    assert [linking_item(e, i) for i in range(3)] == [
        (first, ["Ada Lovelace"]),
        (second, ["Ada Lovelace"]),
        (first, ["Ada Lovelace"]),
    ]
    # only "Ada" left: a whole word ("Adam" does not count), marked once
    only = ada(mentions=("Ada Lovelace", "Ada"))
    assert linking_item(only, 0) == (f"Adam met {START_ENT} Ada {END_ENT}.", ["Ada Lovelace"])
    assert linking_item(ada(mentions=("Ada Lovelace",)), 0) is None  # no sentence names the title


def test_rewrites_restate_each_fact_and_the_article_around_each_entity():
    relations = {
        "P1": Relation("P1", "place of birth", "[X] was born in [Y] ."),
        "P3": Relation("P3", "P3", "[X] knew [Y] ."),
    }
    assert rewrites(ada(), relations) == [
        "Ada Lovelace was born in London.",
        "The place of birth of Ada Lovelace is London.",
        "London is the place of birth of Ada Lovelace.",
        "Ada Lovelace knew Byron.",
        "The P3 of Ada Lovelace is Byron.",
        "Byron is the P3 of Ada Lovelace.",
        # around the subject: no sentence holds "Ada Lovelace" itself, so none; around each object:
        "About London: Lovelace was born in London.",
        "About Byron: Byron's daughter, Lovelace, wrote notes.",
    ]
    # qa: each fact also as a question and answer, right after its statements; nothing else changes
    assert rewrites(ada(), relations, qa=True) == [
        "Ada Lovelace was born in London.",
        "The place of birth of Ada Lovelace is London.",
        "London is the place of birth of Ada Lovelace.",
        "Q: What is the place of birth of Ada Lovelace? A: London.",
        "Ada Lovelace knew Byron.",
        "The P3 of Ada Lovelace is Byron.",
        "Byron is the P3 of Ada Lovelace.",
        "Q: What is the P3 of Ada Lovelace? A: Byron.",
        "About London: Lovelace was born in London.",
        "About Byron: Byron's daughter, Lovelace, wrote notes.",
    ]


def test_family_items_by_hand():
    rel = {"P1": Relation("P1", "place of birth", "[X] was born in [Y] .")}
    fact = Fact("f", "P1", "Ada", "Victoria", ["Victoria", "Queen Victoria", "Victorian", "Victoria (BC)"], [])
    rng = random.Random(0)
    pool = {"P1": ["Rome", "Victoria", "the Victoria"]}
    assert family_item(SLOT_FILLING, fact, rel, pool, {"Victoria"}, rng) == (
        "Ada [SEP] place of birth",
        ["Victoria", "Queen Victoria", "Victoria (BC)"],  # surfaces that name the object in full, not "Victorian"
    )
    assert family_item(QA, fact, rel, pool, {"Victoria"}, rng)[0] == "Ada was born in what?"
    true = family_item(FACT_CHECKING, fact, rel, pool, {"Victoria"}, rng, verdict=SUPPORTS)
    assert true == ("Ada was born in Victoria.", [SUPPORTS])
    for seed in range(10):  # the only wrong object: "the Victoria" normalises to a true one
        false = family_item(FACT_CHECKING, fact, rel, pool, {"Victoria"}, random.Random(seed), verdict=REFUTES)
        assert false == ("Ada was born in Rome.", [REFUTES])
    # no wrong object of the relation left: the claim is stated truly
    assert family_item(FACT_CHECKING, fact, rel, {"P1": ["Victoria"]}, {"Victoria"}, rng, verdict=REFUTES) == true
    verdicts = {family_item(FACT_CHECKING, fact, rel, pool, {"Victoria"}, random.Random(s))[1][0] for s in range(20)}
    assert verdicts == {SUPPORTS, REFUTES}  # by default a coin flip


# -- building the benchmark's data ---------------------------------------------------------------------------------
def test_filters_leave_exactly_the_usable_entities(relation_dir):
    data = build_data(relation_dir, n_entities=USABLE - 1, n_train_pairs=100, seed=0, max_article_chars=300)
    chosen = {e.label for e in data.entities} | {e.label for e in data.train_entities}
    assert chosen == set(PEOPLE) | set(FLAGS)  # the whole pool trains tasks at n_train_pairs=100
    with pytest.raises(LoralagError, match=f"has only {USABLE} usable subject entities"):
        build_data(relation_dir, n_entities=USABLE, max_article_chars=300)
    # a lower article cap drops Ada (her article is the longest of the usable ones: 118 characters)
    assert (
        len(
            " ".join(
                [
                    "Lovelace was born in London in 1815.",
                    "Ada Lovelace grew up near the City of London.",
                    "Ada Lovelace worked on mathematics.",
                ]
            )
        )
        == 118
    )
    with pytest.raises(LoralagError, match=f"has only {USABLE - 1} usable"):
        build_data(relation_dir, n_entities=USABLE - 1, max_article_chars=117)


def test_the_knowledge_set_alternates_relations_and_is_disjoint_from_the_pool(relation_dir):
    data = build_data(relation_dir, n_entities=6, n_train_pairs=100, seed=4)
    mains = [e.facts[0].relation for e in data.entities]
    assert mains == ["P1", "P2"] * 3  # round robin over the relations, in id order
    assert not {e.name for e in data.entities} & {e.name for e in data.train_entities}
    assert len(data.entities) + len(data.train_entities) == USABLE
    a = next(e for e in data.entities + data.train_entities if e.label == "Ada Lovelace")
    assert a.name == "ada-lovelace-Q1" and a.uri == "Q1"
    assert [(f.relation, f.object) for f in a.facts] == [("P1", "London"), ("P3", "mathematics")]
    assert a.article == (
        "Lovelace was born in London in 1815. Ada Lovelace grew up near the City of London. "
        "Ada Lovelace worked on mathematics."
    )
    assert a.mentions == ["Ada Lovelace", "Lovelace", "Ada"]


@pytest.mark.parametrize("seed", range(4))
def test_questions_by_hand(relation_dir, seed):
    data = build_data(relation_dir, n_entities=6, n_train_pairs=8, seed=seed)
    truth = {}  # (subject, relation) -> object
    for e in data.entities:
        for f in e.facts:
            truth[(e.label, f.relation)] = f.object
    for d in DATASETS:
        qs = data.questions[d]
        assert [q.entity for q in qs] == [e.name for e in data.entities]  # one per entity, in adapter order
        for i, q in enumerate(qs):
            e = data.entities[i]
            assert q.dataset == d and q.example.task == d and q.subject == e.label
            assert q.example.provenance == [e.label] and q.example.id == f"{d}-{q.fact.id}"
            assert q.prompt == make_prompt(d, q.example.input)
            assert q.fact in e.facts
    for q in data.questions[SLOT_FILLING]:
        label = "place of birth" if q.fact.relation == "P1" else q.fact.relation
        assert q.example.input == f"{q.subject} [SEP] {label}" and q.example.answers[0] == q.fact.object
    for q in data.questions[QA]:
        want = {
            "P1": f"{q.subject} was born in what?",
            "P2": f"What is the colour of the {q.subject}?",
            "P3": f"{q.subject} has P3 what?",
        }
        assert q.example.input == want[q.fact.relation] and q.example.answers[0] == q.fact.object
    relation_objects = {"P1": [*TOWNS, "Paris", "a b c d e"], "P2": [*COLOURS, "x" * 700], "P3": ["mathematics"]}
    for q in data.questions[FACT_CHECKING]:
        s = q.subject
        obj = {
            "P1": q.example.input.removeprefix(f"{s} was born in ").removesuffix("."),
            "P2": q.example.input.removesuffix(f" is the colour of the {s}."),
            "P3": q.example.input.removeprefix(f"{s} has P3 ").removesuffix("."),
        }[q.fact.relation]
        # the true object, or a wrong object of the same relation: any of its file's objects, filtered entities' too
        assert obj in relation_objects[q.fact.relation]
        assert q.example.answers == [SUPPORTS if obj == truth[(s, q.fact.relation)] else REFUTES]
    for q in data.questions[ENTITY_LINKING]:
        text = q.example.input
        assert text.count(START_ENT) == 1 and text.count(END_ENT) == 1 and q.example.answers == [q.subject]
        assert text.replace(f"{START_ENT} ", "").replace(f" {END_ENT}", "") in data.entity(q.entity).article


def test_same_seed_same_data_other_seed_other_order(relation_dir, tmp_path):
    def snapshot(seed):
        d = build_data(relation_dir, n_entities=6, n_train_pairs=8, seed=seed)
        out = tmp_path / f"q{seed}.jsonl"
        write_questions(out, d)
        return [e.name for e in d.entities], out.read_text(), d.task_pairs, d.fc_under, [c.true for c in d.claims]

    assert snapshot(1) == snapshot(1)
    orders = {tuple(snapshot(s)[0]) for s in range(6)}
    assert len(orders) > 1  # the seed draws the knowledge set


def test_write_questions_holds_every_question_once(relation_dir, tmp_path):
    data = build_data(relation_dir, n_entities=4, n_train_pairs=8, seed=2)
    write_questions(tmp_path / "q.jsonl", data)
    rows = [json.loads(line) for line in (tmp_path / "q.jsonl").read_text().splitlines()]
    assert len(rows) == sum(len(qs) for qs in data.questions.values())
    by_id = {q.example.id: q for qs in data.questions.values() for q in qs}
    for r in rows:
        q = by_id[r["id"]]
        assert r["dataset"] == q.dataset and r["input"] == q.example.input and r["prompt"] == q.prompt
        assert [o["answer"] for o in r["output"]] == q.example.answers and r["entity"] == q.entity


# -- the real T-REx files ------------------------------------------------------------------------------------------
TREX = DATA / "lama-trex"


@pytest.mark.skipif(not TREX.is_dir(), reason=f"no LAMA T-REx data at {TREX} (set LORALAG_TEST_DATA: see the README)")
def test_real_trex_questions_agree_with_the_raw_records():
    raw, objects = {}, defaultdict(set)
    for path in sorted(TREX.glob("*.jsonl")):
        for line in path.read_text(encoding="utf-8").splitlines():
            r = json.loads(line)
            raw[r["uuid"]] = r
            objects[r["predicate_id"]].add(r["obj_label"])
    templates = {r["relation"]: r["template"] for r in json.loads((TREX / "relations.json").read_text())}
    data = build_data(TREX, n_entities=20, n_train_pairs=16, seed=0)
    again = build_data(TREX, n_entities=20, n_train_pairs=16, seed=0)
    assert [e.name for e in again.entities] == [e.name for e in data.entities]
    assert len({e.facts[0].relation for e in data.entities}) == 20  # 20 entities over 22 relations: all distinct
    for e in data.entities + data.train_entities:
        assert "[MASK]" not in e.article and len(e.article) <= 600
        for f in e.facts:
            rec = raw[f.id]
            assert (rec["sub_label"], rec["obj_label"], rec["predicate_id"]) == (e.label, f.object, f.relation)
    for d in DATASETS:
        assert len(data.questions[d]) <= 20
    for q in data.questions[QA] + data.questions[SLOT_FILLING]:
        assert q.example.answers[0] == raw[q.fact.id]["obj_label"]
        assert q.subject in q.example.input
    for q in data.questions[QA]:
        assert q.example.input.endswith("?") and ("what" in q.example.input or q.example.input.startswith("What"))
    for q in data.questions[FACT_CHECKING]:
        stated = [
            o
            for o in objects[q.fact.relation]
            if fill_template(templates[q.fact.relation], q.subject, o) == q.example.input
        ]
        assert stated, q.example.input  # the claim is the template filled with an object of the same relation
        assert (q.example.answers == [SUPPORTS]) == (q.fact.object in stated)
    for q in data.questions[ENTITY_LINKING]:
        assert q.example.input.count(START_ENT) == 1 and q.example.answers == [q.subject]
