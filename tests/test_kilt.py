"""KILT/NQ-open/FEVER/LAMA readers and the official KILT downstream metrics, on real data and hand-worked cases."""

import json
import random
from pathlib import Path

import pytest
from conftest import DATA  # $LORALAG_TEST_DATA, else ../shared/data

from loralag.errors import LoralagError
from loralag.evaluation.kilt import (
    KILT_FAMILIES,
    LAMA_FAMILIES,
    Example,
    exact_match_score,
    f1_score,
    infer_task,
    metric_max_over_ground_truths,
    normalised_scores,
    normalize_answer,
    read_fever,
    read_kilt,
    read_kilt_predictions,
    read_lama,
    read_lama_relations,
    read_nq_open,
    rougel_score,
    score_dataset,
    strict_accuracy,
    write_kilt_predictions,
)

KILT_FILES = sorted((DATA / "kilt").glob("*.jsonl")) + sorted((DATA / "kilt" / "samples").glob("*.jsonl"))


def need(path: Path):
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set LORALAG_TEST_DATA: see the README's Test data)")
    return path


def _nonblank_lines(path: Path) -> int:
    with open(path, encoding="utf-8") as fh:
        return sum(1 for line in fh if line.strip())


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.skipif(not KILT_FILES, reason=f"no KILT files under {DATA / 'kilt'}")
@pytest.mark.parametrize("path", KILT_FILES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_gold_answers_score_100_on_every_kilt_file(path):
    examples = read_kilt(path)
    assert len(examples) == _nonblank_lines(path)
    assert examples[0].task is not None, f"task not inferred from {path.name}"
    assert all(ex.answers for ex in examples)
    preds = {ex.id: ex.answers[0] for ex in examples}
    res = score_dataset(examples, preds)
    assert res["n"] == len(examples) and res["n_missing"] == 0 and res["n_empty"] == 0
    # ROUGE-L of a text with itself is 2/(2 + 1e-8), a hair under 1, exactly as in the rouge package
    assert res["score"] == pytest.approx(100.0, abs=1e-5), res
    assert res["em"] == 100.0 and res["accuracy"] == 100.0


def test_task_names_from_kilt_file_names():
    names = {
        "fever-dev-kilt.jsonl": "fever",
        "aidayago2-train-kilt.jsonl": "aidayago2",
        "wned-dev-kilt.jsonl": "wned",
        "cweb-dev-kilt.jsonl": "cweb",
        "trex-dev-kilt.jsonl": "trex",
        "structured_zeroshot-dev-kilt.jsonl": "structured_zeroshot",
        "nq-train-kilt.jsonl": "nq",
        "hotpotqa-dev-kilt.jsonl": "hotpotqa",
        "triviaqa-dev_id-kilt.jsonl": "triviaqa",
        "eli5-dev-kilt.jsonl": "eli5",
        "wow-dev-kilt.jsonl": "wow",
        "NQ-open.dev.jsonl": "nq",
        "wned-cweb.jsonl": "cweb",
        "zsre_dev.jsonl": "structured_zeroshot",
        "my_data.jsonl": None,
        "knowledge.jsonl": None,
    }
    for name, task in names.items():
        assert infer_task(name) == task, name


def test_kilt_reader_fields_and_provenance_only_outputs():
    path = need(DATA / "kilt" / "samples" / "nq-train-kilt.jsonl")
    first = read_kilt(path)[0]
    # the second output is provenance only: no answer from it, but its title counts
    assert first.id == "5328212470870865242"
    assert first.input == "how i.met your mother who is the mother"
    assert first.answers == ["Tracy McConnell"]
    assert first.provenance == ["The Mother (How I Met Your Mother)"]
    assert first.task == "nq"
    trivia = read_kilt(need(DATA / "kilt" / "samples" / "triviaqa-dev_id-kilt.jsonl"))
    assert trivia[0].input == "" and "Jim Laker" in trivia[0].answers  # KILT ships TriviaQA without questions
    zsre = read_kilt(DATA / "kilt" / "samples" / "structured_zeroshot-dev-kilt.jsonl", task="zsRE")
    assert zsre[0].task == "structured_zeroshot" and "template_questions" in zsre[0].raw["meta"]


def test_nq_open_reader_parses_every_line():
    path = need(DATA / "nq-open" / "NQ-open.dev.jsonl")
    ex = read_nq_open(path)
    assert len(ex) == _nonblank_lines(path) == 3610
    assert ex[0].input == "when was the last time anyone was on the moon"
    assert ex[0].answers == ["14 December 1972 UTC", "December 1972"] and ex[0].task == "nq"
    assert len({e.id for e in ex}) == len(ex)


def test_fever_reader_parses_every_line():
    path = need(DATA / "fever" / "paper_dev.jsonl")
    ex = read_fever(path)
    assert len(ex) == _nonblank_lines(path) == 9999
    assert {e.answers[0] for e in ex} == {"SUPPORTS", "REFUTES", "NOT ENOUGH INFO"}
    assert ex[0].id == "91198" and ex[0].input.startswith("Colin Kaepernick became")
    soul = next(e for e in ex if e.id == "137334")
    assert soul.provenance == ["Soul Food (film)"]  # Soul_Food_-LRB-film-RRB-


def test_lama_reader_parses_every_line_and_keeps_raw_fields():
    files = sorted(need(DATA / "lama-trex").glob("P*.jsonl"))
    total = 0
    for f in files:
        ex = read_lama(f)
        assert len(ex) == _nonblank_lines(f)
        total += len(ex)
        assert all(e.raw["predicate_id"] == f.stem for e in ex)
    assert total == 18517
    e = read_lama(DATA / "lama-trex" / "P19.jsonl")[0]
    assert (e.input, e.answers, e.task) == ("Allan Peiper", ["Alexandra"], "lama")
    assert e.raw["evidences"][0]["masked_sentence"].startswith("Allan Peiper (born 26 April 1960 in [MASK]")
    rel = read_lama_relations(DATA / "lama-trex" / "relations.json")
    assert rel["P19"]["template"].count("[X]") == 1 and len(rel) == len(files)


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "line, reader",
    [
        ('{"id": "1", "input": "q", "output": [{"answer": "a"}]', read_kilt),  # truncated JSON
        ('["not", "an", "object"]', read_kilt),
        ('{"input": "q", "output": [{"answer": "a"}]}', read_kilt),  # no id
        ('{"id": "1", "input": "q", "output": [{"answer": 3}]}', read_kilt),
        ('{"id": "1", "input": "q", "output": {"answer": "a"}}', read_kilt),
        ('{"question": "q", "answer": "a"}', read_nq_open),  # answer must be a list
        ('{"question": "q"}', read_nq_open),
        ('{"id": 1, "claim": "c", "label": "MAYBE"}', read_fever),
        ('{"id": 1, "label": "SUPPORTS"}', read_fever),
        ('{"sub_label": "s", "predicate_id": "P1"}', read_lama),
        (
            '{"sub_label": "s", "obj_label": "o", "predicate_id": "P1", "evidences": [{"masked_sentence": 5}]}',
            read_lama,
        ),
    ],
)
def test_bad_line_names_file_and_line(tmp_path, line, reader):
    good = {
        read_kilt: '{"id": "0", "input": "q", "output": [{"answer": "a"}]}',
        read_nq_open: '{"question": "q", "answer": ["a"]}',
        read_fever: '{"id": 0, "claim": "c", "label": "REFUTES"}',
        read_lama: '{"sub_label": "s", "obj_label": "o", "predicate_id": "P1"}',
    }[reader]
    path = tmp_path / "data.jsonl"
    path.write_text(good + "\n\n" + line + "\n", encoding="utf-8")
    with pytest.raises(LoralagError, match=r"data\.jsonl:3: "):
        reader(path)


def test_missing_file_and_duplicate_ids(tmp_path):
    with pytest.raises(LoralagError, match="no such file"):
        read_kilt(tmp_path / "absent.jsonl")
    path = tmp_path / "dup.jsonl"
    path.write_text('{"id": "1", "input": "q", "output": []}\n' * 2, encoding="utf-8")
    with pytest.raises(LoralagError, match="more than once"):
        read_kilt(path)


# ---------------------------------------------------------------------------------------------- metrics by hand


def test_normalisation():
    assert normalize_answer("The Beatles") == "beatles"
    assert normalize_answer("  An apple, a DAY! ") == "apple day"
    assert normalize_answer("theater") == "theater"  # articles only as whole words
    assert exact_match_score("The Beatles", "beatles") is True
    assert exact_match_score("U.S.A.", "usa") is True  # punctuation is removed, not replaced by spaces
    assert exact_match_score("New-York", "new york") is False
    assert exact_match_score("Paris", "Paris, France") is False


def test_token_f1_by_hand():
    # pred "the cat sat" -> [cat, sat]; gold "cat sat down" -> [cat, sat, down]: P = 2/2, R = 2/3
    p, r = 2 / 2, 2 / 3
    assert f1_score("the cat sat", "cat sat down") == pytest.approx(2 * p * r / (p + r)) == pytest.approx(0.8)
    # repeated tokens count by multiset: pred [a1, b, b] vs gold [b]: common 1, P = 1/3, R = 1
    assert f1_score("a1 b b", "b") == pytest.approx(2 * (1 / 3) * 1 / (1 / 3 + 1))
    assert f1_score("dog", "cat") == 0
    assert f1_score("!!!", "!!!") == 0  # both normalise to nothing: the scorer's F1 is 0 (EM is 1)
    assert exact_match_score("!!!", "!!!") is True


def test_rouge_l_by_hand():
    # Lin's example: LCS("police kill the gunman", "police killed the gunman") = police, the, gunman = 3 of 4 words
    p = r = 3 / 4
    assert rougel_score("police killed the gunman", "police kill the gunman") == pytest.approx(
        2 * p * r / (p + r + 1e-8), abs=1e-15
    )
    # no normalisation: case matters ("Police" != "police"): LCS = the, gunman
    assert rougel_score("Police killed the gunman", "police kill the gunman") == pytest.approx(0.5, abs=1e-8)
    # the rouge package counts distinct words: hyp "the cat the cat" has 2 word types, LCS words {the, cat}
    assert rougel_score("the cat the cat", "the cat") == pytest.approx(1.0, abs=1e-8)
    # sentences split on "." and the union of per-sentence LCS words: ref {a, b, c, d}; hyp {a, b, d, e}
    # LCS(ref "a b c d", hyp "b a") = one word; the traceback from the end picks "b"; LCS with "d e" = d -> {b, d}
    assert rougel_score("b a. d e", "a b c d") == pytest.approx(2 * 0.5 * 0.5 / (1 + 1e-8), abs=1e-15)
    assert rougel_score("...", "anything") == 0.0  # the package raises ValueError; KILT scores 0.0
    assert rougel_score("", "x") == 0.0


def test_max_over_gold_answers():
    golds = ["Barack Obama", "Obama", "the 44th president"]
    assert metric_max_over_ground_truths(exact_match_score, "obama", golds) is True
    assert metric_max_over_ground_truths(f1_score, "president obama", golds) == pytest.approx(2 / 3)
    assert metric_max_over_ground_truths(rougel_score, "Obama", golds) == pytest.approx(1.0, abs=1e-7)
    assert strict_accuracy("Obama ", golds) and not strict_accuracy("obama", golds)
    with pytest.raises(LoralagError):
        metric_max_over_ground_truths(f1_score, "x", [])


def test_score_dataset_counts_and_official_conventions():
    ex = [
        Example("1", "q1", ["Paris"], task="nq"),
        Example("2", "q2", ["The Beatles", "Beatles"], task="nq"),
        Example("3", "q3", ["blue whale"], task="nq"),
        Example("4", "q4", ["x"], task="nq"),
    ]
    preds = {"1": " Paris ", "2": "the beatles", "3": "a whale", "4": "   ", "99": "extra"}
    res = score_dataset(ex, preds)
    assert res["metric"] == "em" and res["task"] == "nq"
    assert res["em"] == pytest.approx(100 * 2 / 4)
    assert res["accuracy"] == pytest.approx(100 * 1 / 4)  # strict: only " Paris " -> "Paris" matches exactly
    assert res["f1"] == pytest.approx(100 * (1 + 1 + 2 * 1 * 0.5 / 1.5 + 0) / 4)
    assert (res["n"], res["n_empty"], res["n_missing"], res["n_extra"]) == (4, 1, 0, 1)
    assert "per_example" not in res
    # per example, in the examples' order: EM for "Paris" and "the beatles", not for "a whale" or the empty one
    assert score_dataset(ex, preds, per_example=True)["per_example"] == [1.0, 1.0, 0.0, 0.0]
    f1 = score_dataset(ex, preds, metric="f1", per_example=True)
    assert f1["per_example"] == pytest.approx([1.0, 1.0, 2 * 1 * 0.5 / 1.5, 0.0])
    assert 100 * sum(f1["per_example"]) / 4 == pytest.approx(f1["score"])
    with pytest.raises(LoralagError, match="no prediction for 1 of 4"):
        score_dataset(ex, {"1": "Paris", "2": "x", "3": "y"})
    res = score_dataset(ex, {"1": "Paris"}, allow_missing=True)
    assert res["em"] == 25.0 and res["n_missing"] == 3
    fever = [Example("a", "c", ["SUPPORTS"], task="fever"), Example("b", "c", ["REFUTES"], task="fever")]
    res = score_dataset(fever, {"a": "SUPPORTS", "b": "refutes"})
    assert res["metric"] == "accuracy" and res["score"] == 50.0 and res["em"] == 100.0
    wow = [Example("w", "hi", ["I love the Beatles"], task="wow")]
    assert score_dataset(wow, {"w": "I love the Beatles"})["metric"] == "rougel"
    assert score_dataset(wow, {"w": "x"}, metric="f1")["score"] == 0.0


def test_rouge_l_equals_the_rouge_package():
    rouge = pytest.importorskip("rouge", reason="optional check: pip install rouge==1.0.1 (what KILT's scorer uses)")
    scorer = rouge.Rouge()

    def official(pred, gold):  # KILT's _rougel_score
        try:
            return scorer.get_scores(pred, gold, avg=True)["rouge-l"]["f"]
        except ValueError:
            return 0.0

    rng = random.Random(0)
    vocab = ["a", "b", "c", "d", "The", "the", ".", ". ", "  ", "x.y", "e", "\t"]
    for _ in range(1500):
        pred = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))
        gold = " ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12)))
        assert rougel_score(pred, gold) == official(pred, gold), (pred, gold)
    wow = DATA / "kilt" / "wow-dev-kilt.jsonl"
    if wow.exists():  # real responses scored against other examples' responses
        answers = [e.answers[0] for e in read_kilt(wow)[:200]]
        for a, b in zip(answers, answers[1:]):
            assert rougel_score(a, b) == official(a, b)


# ---------------------------------------------------------------------------------------------- normalised score


def test_normalised_score_by_hand():
    results = {
        "oracle": {"fever": (80.0, 100), "nq": (40.0, 100), "hotpotqa": (20.0, 300), "wow": (10.0, 50)},
        "lag": {"fever": (60.0, 100), "nq": (20.0, 100), "hotpotqa": (20.0, 300), "wow": (5.0, 50)},
    }
    out = normalised_scores(results)
    # fact checking: 60/80; open-domain QA: sample-weighted (100 * 20/40 + 300 * 20/20) / 400; dialogue: 5/10
    qa = (100 * 0.5 + 300 * 1.0) / 400
    assert out["lag"]["fact_checking"] == pytest.approx(0.75)
    assert out["lag"]["open_domain_qa"] == pytest.approx(qa) == pytest.approx(0.875)
    assert out["lag"]["dialogue"] == pytest.approx(0.5)
    assert out["lag"]["AVG"] == pytest.approx((0.75 + qa + 0.5) / 3)
    assert set(out["lag"]) == {"fact_checking", "open_domain_qa", "dialogue", "AVG"}  # no EL/SF results
    assert out["oracle"] == {"fact_checking": 1.0, "open_domain_qa": 1.0, "dialogue": 1.0, "AVG": 1.0}
    assert normalised_scores(results, percent=True)["lag"]["dialogue"] == pytest.approx(50.0)
    assert set(KILT_FAMILIES) == {"fact_checking", "entity_linking", "slot_filling", "open_domain_qa", "dialogue"}


def test_normalised_score_custom_families_and_errors():
    lama = {
        "oracle": {"lama_slot_filling": (50.0, 10), "lama_qa": (40.0, 10), "lama_fact_checking": (90.0, 10)},
        "base": {"lama_slot_filling": (25.0, 10), "lama_qa": (10.0, 10), "lama_fact_checking": (45.0, 10)},
    }
    out = normalised_scores(lama, families=LAMA_FAMILIES)
    assert out["base"] == pytest.approx({"slot_filling": 0.5, "qa": 0.25, "fact_checking": 0.5, "AVG": 1.25 / 3})
    with pytest.raises(LoralagError, match="no family"):
        normalised_scores(lama)  # LAMA dataset names are not KILT datasets
    with pytest.raises(LoralagError, match="oracle"):
        normalised_scores({"m": {"nq": (1.0, 1)}})
    with pytest.raises(LoralagError, match="cannot normalise"):
        normalised_scores({"oracle": {"nq": (0.0, 5)}, "m": {"nq": (1.0, 5)}})
    with pytest.raises(LoralagError, match="positive int"):
        normalised_scores({"oracle": {"nq": (1.0, 0)}})


# ---------------------------------------------------------------------------------------------- prediction files


def test_prediction_file_round_trip(tmp_path):
    preds = {"5a8b57f25542995d1e6f1371": "yes", "42": 'Café "Müller"\nline two', "x": ""}
    path = write_kilt_predictions(tmp_path / "out" / "guess.jsonl", preds)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 3
    assert json.loads(lines[0]) == {"id": "5a8b57f25542995d1e6f1371", "output": [{"answer": "yes"}]}
    assert read_kilt_predictions(path) == preds
    assert list(read_kilt_predictions(path)) == list(preds)  # order kept
    # the KILT reader reads it as a (gold-format) KILT file too
    assert [e.answers for e in read_kilt(path)] == [["yes"], ['Café "Müller"\nline two'], []]
    with pytest.raises(LoralagError):
        write_kilt_predictions(tmp_path / "bad.jsonl", {"1": 3})
    assert not (tmp_path / "bad.jsonl").exists()
