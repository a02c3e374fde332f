"""`loralag eval`: scoring KILT-format predictions, the paper's normalised score, and generating predictions.

The references are independent of the code under test: gold answers scored as predictions, metrics worked
out by hand from the KILT scorer's definitions, and Eq. 9 computed by hand.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import (  # DATA: $LORALAG_TEST_DATA, else ../shared/data
    DATA,
    invoke,
    output,
    save_lora,
    tiny_llama,
)
from tiny_text import tiny_tokenizer

from loralag.evaluation import evaluate as ev
from loralag.evaluation.kilt import read_kilt, read_kilt_predictions

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def kilt_rec(i, question, answers):
    return {"id": str(i), "input": question, "output": [{"answer": a} for a in answers]}


def write_preds(path: Path, preds: dict) -> Path:
    return write_jsonl(path, [{"id": k, "output": [{"answer": v}]} for k, v in preds.items()])


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def scores_json(out: Path) -> dict:
    return json.loads((out / "scores.json").read_text())


# --------------------------------------------------------------------------------------------- small files


@pytest.fixture
def small_data(tmp_path):
    """One file per supported format, and the gold answers of each as a predictions folder."""
    d = tmp_path / "data"
    files = {
        "nq-dev-kilt": write_jsonl(
            d / "nq-dev-kilt.jsonl",
            [
                kilt_rec("q1", "who wrote hamlet", ["William Shakespeare", "Shakespeare"]),
                kilt_rec("q2", "capital of france", ["Paris"]),
                {
                    "id": "q3",
                    "input": "largest planet",
                    "output": [{"provenance": [{"title": "Jupiter"}]}, {"answer": "Jupiter"}],
                },
            ],
        ),
        "wow-dev-kilt": write_jsonl(
            d / "wow-dev-kilt.jsonl",
            [
                kilt_rec(
                    "w1", "I like jazz.\nMe too, who do you like?", ["Miles Davis is great. He played the trumpet."]
                )
            ],
        ),
        # no task in the name: told from its content (every gold answer is a FEVER label)
        "claims": write_jsonl(
            d / "claims.jsonl",
            [kilt_rec("c1", "The sun is hot.", ["SUPPORTS"]), kilt_rec("c2", "The moon is cheese.", ["REFUTES"])],
        ),
        "NQ-open.dev": write_jsonl(
            d / "NQ-open.dev.jsonl",
            [{"question": "who", "answer": ["me", "I"]}, {"question": "what", "answer": ["it"]}],
        ),
        "paper_dev": write_jsonl(
            d / "fever" / "paper_dev.jsonl",
            [
                {"id": 7, "claim": "A claim.", "label": "NOT ENOUGH INFO", "evidence": [[[1, None, None, None]]]},
                {"id": 8, "claim": "B claim.", "label": "REFUTES", "evidence": [[[2, 3, "B_-LRB-x-RRB-", 0]]]},
            ],
        ),
        "P19": write_jsonl(
            d / "lama" / "P19.jsonl",
            [
                {
                    "uuid": "u1",
                    "sub_label": "Ada",
                    "obj_label": "London",
                    "predicate_id": "P19",
                    "evidences": [{"masked_sentence": "Ada was born in [MASK]."}],
                }
            ],
        ),
    }
    (d / "lama" / "relations.json").write_text(
        json.dumps([{"relation": "P19", "label": "place of birth", "template": "[X] was born in [Y] ."}])
    )
    gold = tmp_path / "gold"
    for stem, path in files.items():
        dataset = ev.load_dataset(path)
        write_preds(gold / f"{stem}.jsonl", {ex.id: ex.answers[0] for ex in dataset.examples})
    return files, gold


def test_formats_tasks_and_families_are_detected(small_data):
    files, _ = small_data
    got = {d.name: (d.format, d.task, d.family, d.metric, d.n) for d in ev.load_datasets(files.values())}
    assert got == {
        "nq-dev-kilt": ("kilt", "nq", "open_domain_qa", "em", 3),
        "wow-dev-kilt": ("kilt", "wow", "dialogue", "rougel", 1),
        "claims": ("kilt", "fever", "fact_checking", "accuracy", 2),
        "NQ-open.dev": ("nq_open", "nq", "open_domain_qa", "em", 2),
        "paper_dev": ("fever", "fever", "fact_checking", "accuracy", 2),
        "P19": ("lama", "lama", "slot_filling", "em", 1),
    }
    lama = ev.load_dataset(files["P19"])
    assert lama.examples[0].input == "Ada [SEP] place of birth"  # KILT's T-REx slot-filling input
    # --task forces the task of a KILT file; limit keeps the first examples
    forced = ev.load_dataset(files["nq-dev-kilt"], task="hotpotqa", limit=2)
    assert (forced.task, forced.n, len(forced.all_ids)) == ("hotpotqa", 2, 3)


def test_gold_predictions_score_100_through_the_cli(small_data, tmp_path):
    files, gold = small_data
    out = tmp_path / "out"
    result = invoke("eval", *files.values(), "--predictions", gold, "--out", out)
    assert result.exit_code == 0, output(result)
    report = scores_json(out)
    ((method, per),) = report["scores"].items()
    assert method == "gold" and set(per) == set(files)
    for stem, res in per.items():
        assert res["n_missing"] == 0 and res["n_empty"] == 0
        # ROUGE-L of a text with itself is 2/(2 + 1e-8), a hair under 100 (as in the rouge package)
        assert res["score"] == pytest.approx(100.0, abs=1e-5), stem
        assert res["em"] == 100.0 and res["accuracy"] == 100.0, stem
    text = output(result)
    assert "nq-dev-kilt" in text and "paper_dev" in text and "100.00" in text
    assert "| gold | P19 | lama | 1 | em | 100.00 |" in (out / "scores.md").read_text()


def test_hand_computed_metrics_through_the_cli(tmp_path):
    data = write_jsonl(
        tmp_path / "nq-dev-kilt.jsonl",
        [
            kilt_rec("1", "q", ["The Eiffel Tower"]),
            kilt_rec("2", "q", ["Paris", "City of Paris"]),
            kilt_rec("3", "q", ["New York City"]),
            kilt_rec("4", "q", ["42"]),
            kilt_rec("5", "q", ["blue whale"]),
        ],
    )
    preds = write_preds(
        tmp_path / "p.jsonl", {"1": "eiffel tower!", "2": "Paris", "3": "the city of New York", "5": "  "}
    )  # 4 has no prediction
    out = tmp_path / "out"
    result = invoke("eval", data, "--predictions", f"mine={preds}", "--out", out)
    assert result.exit_code == 0, output(result)
    assert "1 of 5 examples of nq-dev-kilt have no prediction" in output(result)
    r = scores_json(out)["scores"]["mine"]["nq-dev-kilt"]
    # 1: normalised "eiffel tower" == gold: EM 1, F1 1; not the gold string: accuracy 0; ROUGE-L is
    #    case-sensitive and keeps punctuation: {eiffel, tower!} vs {The, Eiffel, Tower} share nothing: 0
    # 2: exact: 1 everywhere, ROUGE-L 2/(2+1e-8)
    # 3: tokens [city, of, new, york] vs [new, york, city]: P 3/4, R 1, F1 6/7; EM 0;
    #    ROUGE-L: LCS "New York" = 2 of 5 hypothesis words (P 2/5) and 3 reference words (R 2/3)
    # 4 missing, 5 empty: 0
    rouge3 = 2 * ((2 / 5) * (2 / 3)) / (2 / 5 + 2 / 3 + 1e-8)
    assert r["n"] == 5 and r["n_missing"] == 1 and r["n_empty"] == 2
    assert r["accuracy"] == pytest.approx(100 * 1 / 5)
    assert r["em"] == pytest.approx(100 * 2 / 5)
    assert r["f1"] == pytest.approx(100 * (1 + 1 + 6 / 7) / 5)
    assert r["rougel"] == pytest.approx(100 * (2 / (2 + 1e-8) + rouge3) / 5, rel=1e-12)
    # no oracle, no normalised table: the plot shows each method's primary score per dataset
    assert (out / "scores.png").read_bytes()[:8] == PNG_MAGIC
    drawn = ev.plot_scores(scores_json(out), tmp_path / "plot.png")
    assert drawn["groups"] == ["nq-dev-kilt"] and drawn["values"] == {
        "mine": {"nq-dev-kilt": pytest.approx(r["score"])}
    }
    assert r["metric"] == "em" and r["score"] == r["em"]

    # --strict: a missing prediction is an error, as in the official scorer
    result = invoke("eval", data, "--predictions", preds, "--strict")
    assert result.exit_code == 2 and "no prediction for 1 of 5" in output(result) and "'4'" in output(result)


def test_normalised_table_is_eq9_by_hand(tmp_path):
    d = tmp_path / "data"
    nq = write_jsonl(d / "nq-dev-kilt.jsonl", [kilt_rec(f"n{i}", "q", [f"a{i}"]) for i in range(4)])
    hp = write_jsonl(d / "hotpotqa-dev-kilt.jsonl", [kilt_rec(f"h{i}", "q", [f"b{i}"]) for i in range(2)])
    fv = write_jsonl(d / "fever-dev-kilt.jsonl", [kilt_rec(f"f{i}", "c", ["SUPPORTS"]) for i in range(3)])

    def method(name, nq_right, hp_right, fv_right):
        folder = tmp_path / name
        write_preds(folder / "nq-dev-kilt.jsonl", {f"n{i}": f"a{i}" if i < nq_right else "x" for i in range(4)})
        write_preds(folder / "hotpotqa-dev-kilt.jsonl", {f"h{i}": f"b{i}" if i < hp_right else "x" for i in range(2)})
        write_preds(
            folder / "fever-dev-kilt.jsonl", {f"f{i}": "SUPPORTS" if i < fv_right else "REFUTES" for i in range(3)}
        )
        return f"{name}={folder}"

    out = tmp_path / "out"
    result = invoke(
        "eval",
        nq,
        hp,
        fv,
        "-p",
        method("oracle", 2, 2, 2),
        "-p",
        method("a", 1, 1, 1),
        "-p",
        method("b", 2, 0, 2),
        "--out",
        out,
    )
    assert result.exit_code == 0, output(result)
    report = scores_json(out)
    assert report["scores"]["oracle"]["nq-dev-kilt"]["score"] == 50.0
    assert report["scores"]["oracle"]["fever-dev-kilt"]["score"] == pytest.approx(200 / 3)
    norm = report["normalised"]
    assert norm["oracle"] == "oracle"
    # Eq. 9 by hand. oracle: nq 50, hotpotqa 100, fever 66.7.
    # a: nq 25/50 = 0.5 (n 4), hotpotqa 50/100 = 0.5 (n 2) -> QA (4*0.5 + 2*0.5)/6 = 0.5; fever 1/2 -> AVG 0.5
    # b: nq 1 (n 4), hotpotqa 0 (n 2) -> QA 4/6; fever 1 -> AVG (2/3 + 1)/2 = 5/6
    expect = {
        "oracle": {"open_domain_qa": 1.0, "fact_checking": 1.0, "AVG": 1.0},
        "a": {"open_domain_qa": 0.5, "fact_checking": 0.5, "AVG": 0.5},
        "b": {"open_domain_qa": 4 / 6, "fact_checking": 1.0, "AVG": 5 / 6},
    }
    for m, fams in expect.items():
        assert set(norm["families"][m]) == set(fams)
        for fam, value in fams.items():
            assert norm["families"][m][fam] == pytest.approx(100 * value), (m, fam)
    assert norm["datasets"]["b"] == pytest.approx(
        {"nq-dev-kilt": 100.0, "hotpotqa-dev-kilt": 0.0, "fever-dev-kilt": 100.0}
    )
    assert "Normalised score" in output(result) and "AVG" in output(result)
    md = (out / "scores.md").read_text()
    assert "| b | 100.00 | 66.67 | 83.33 |" in md  # fact_checking comes first in the paper's family order
    assert (out / "scores.png").read_bytes()[:8] == PNG_MAGIC and "scores.png" in output(result)
    # the plot draws the table: the bars' heights, read back from the figure, are the report's numbers
    drawn = ev.plot_scores(report, tmp_path / "again.png")
    assert drawn["groups"] == ["fact_checking", "open_domain_qa", "AVG"]
    assert set(drawn["values"]) == set(norm["families"])
    for m, fams in norm["families"].items():
        assert {g: v for g, v in drawn["values"][m].items() if v is not None} == pytest.approx(fams), m

    # another oracle, named explicitly: each method relative to b
    result = invoke(
        "eval", nq, hp, fv, "-p", method("a", 1, 1, 1), "-p", method("b", 2, 0, 2), "--oracle", "a", "--out", out
    )
    assert result.exit_code == 0, output(result)
    assert scores_json(out)["normalised"]["families"]["b"]["fact_checking"] == pytest.approx(200.0)
    # an oracle scoring 0 on a dataset cannot normalise
    result = invoke("eval", nq, hp, fv, "-p", method("a", 1, 1, 1), "-p", method("b", 2, 0, 2), "--oracle", "b")
    assert result.exit_code == 2 and "hotpotqa-dev-kilt" in output(result)
    result = invoke("eval", nq, "-p", method("a", 1, 1, 1), "--oracle", "zzz")
    assert result.exit_code == 2 and "zzz" in output(result)


def test_errors_name_the_file_and_line(small_data, tmp_path):
    files, gold = small_data
    data = files["nq-dev-kilt"]

    unknown = write_jsonl(
        tmp_path / "unknown.jsonl",
        [{"id": "q1", "output": [{"answer": "x"}]}, {"id": "zz", "output": [{"answer": "y"}]}],
    )
    result = invoke("eval", data, "-p", unknown)
    assert result.exit_code == 2
    assert f"{unknown}:2" in output(result) and "'zz'" in output(result) and str(data) in output(result)

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "q1", "output": [{"answer": "x"}]}\n{"id": "q2", "output": [\n')
    result = invoke("eval", data, "-p", bad)
    assert result.exit_code == 2 and f"{bad}:2" in output(result) and "not valid JSON" in output(result)

    shape = write_jsonl(tmp_path / "shape.jsonl", [{"id": "q1", "output": "x"}])
    result = invoke("eval", data, "-p", shape)
    assert result.exit_code == 2 and f"{shape}:1" in output(result)

    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    result = invoke("eval", data, "-p", empty)
    assert result.exit_code == 2 and str(empty) in output(result) and "empty" in output(result)
    result = invoke("eval", empty, "-p", gold / "nq-dev-kilt.jsonl")
    assert result.exit_code == 2 and str(empty) in output(result) and "empty" in output(result)

    result = invoke("eval", tmp_path / "nope.jsonl", "-p", gold)
    assert result.exit_code == 2 and "nope.jsonl: no such file" in output(result)
    result = invoke("eval", data, "-p", tmp_path / "nopreds")
    assert result.exit_code == 2 and "nopreds" in output(result)
    # a folder without the dataset's file; a single file for two datasets
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "P19.jsonl").write_text((gold / "P19.jsonl").read_text())
    result = invoke("eval", data, files["P19"], "-p", partial)
    assert result.exit_code == 2 and f"{partial / 'nq-dev-kilt.jsonl'}: no such file" in output(result)
    result = invoke("eval", data, files["P19"], "-p", gold / "nq-dev-kilt.jsonl")
    assert result.exit_code == 2 and "one predictions file but 2 data files" in output(result)

    unnamed = write_jsonl(tmp_path / "mine.jsonl", [kilt_rec("1", "q", ["a"])])
    result = invoke("eval", unnamed, "-p", gold)
    assert result.exit_code == 2 and "--task" in output(result) and str(unnamed) in output(result)
    result = invoke("eval", data)
    assert result.exit_code == 2 and "--predictions" in output(result)


def test_prompts_and_answer_cleaning(small_data):
    files, _ = small_data
    qa = ev.load_dataset(files["nq-dev-kilt"])
    fc = ev.load_dataset(files["paper_dev"])
    wow = ev.load_dataset(files["wow-dev-kilt"])
    lama = ev.load_dataset(files["P19"])
    assert ev.build_prompt(qa.examples[0], qa) == "Question: who wrote hamlet\nAnswer:"
    assert ev.build_prompt(fc.examples[1], fc) == "Claim: B claim.\nIs this claim SUPPORTS or REFUTES?\nAnswer:"
    assert ev.build_prompt(wow.examples[0], wow) == "Me too, who do you like?\nReply:"  # the last turn
    assert ev.build_prompt(lama.examples[0], lama) == "Ada [SEP] place of birth\nAnswer:"
    assert ev.build_prompt(qa.examples[1], qa, template="Q: {input} A:") == "Q: capital of france A:"

    assert ev.clean_prediction(" Paris. It is big.\nmore", qa) == "Paris"
    assert ev.clean_prediction("\n St. Louis\n", qa) == "St. Louis"
    assert ev.clean_prediction("refutes, because", fc) == "REFUTES"
    assert ev.clean_prediction("Yes.", fc) == "SUPPORTS"
    assert ev.clean_prediction("not enough info", fc) == "NOT ENOUGH INFO"
    assert ev.clean_prediction("maybe", fc) == "maybe"
    assert ev.clean_prediction("\nI love him. He is great.\nBye", wow) == "I love him. He is great."

    el = ev.Dataset(Path("aidayago2-dev-kilt.jsonl"), "x", "kilt", "aidayago2", [])
    text = "a" * 500 + " [START_ENT] Leicester [END_ENT] " + "b" * 500
    cut = ev.build_prompt(ev.kilt.Example("1", text, ["Leicester"]), el, template="{input}", max_input_chars=100)
    assert len(cut) == 100 and "[START_ENT] Leicester [END_ENT]" in cut

    assert ev.parse_method("lag=runs/x") == ("lag", Path("runs/x"))
    assert ev.parse_method("runs/lag.jsonl") == ("lag", Path("runs/lag.jsonl"))
    assert ev.parse_method("runs/a=b/preds") == ("preds", Path("runs/a=b/preds"))


# --------------------------------------------------------------------------------------------- generation


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    model = tiny_llama()
    model.save_pretrained(tmp / "model")
    tiny_tokenizer().save_pretrained(tmp / "model")
    for i, name in enumerate(["alpha", "beta"]):
        save_lora(model, tmp / "adapters" / name, seed=i, target_modules=("q_proj", "v_proj", "up_proj"))
    assert invoke("build", tmp / "lib", tmp / "adapters", "--model", tmp / "model").exit_code == 0
    d = tmp / "data"
    write_jsonl(
        d / "nq-dev-kilt.jsonl",
        [
            kilt_rec("q1", "what is the capital of the red moon ?", ["one"]),
            kilt_rec("q2", "who is the sun ?", ["two"]),
            kilt_rec("q3", "where is the blue river ?", ["three"]),
        ],
    )
    write_jsonl(
        d / "fever-dev-kilt.jsonl",
        [kilt_rec("f1", "the moon is red .", ["SUPPORTS"]), kilt_rec("f2", "the sun is blue .", ["REFUTES"])],
    )
    return tmp


def _check_kilt_predictions(path: Path, data: Path):
    ids = [ex.id for ex in read_kilt(data)]
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [rec["id"] for rec in lines] == ids  # every example, in the data file's order
    for rec in lines:
        assert set(rec) == {"id", "output"} and len(rec["output"]) == 1 and isinstance(rec["output"][0]["answer"], str)
    return read_kilt_predictions(path)


def test_generation_writes_kilt_predictions_and_scores_them(world, tmp_path):
    data = [world / "data" / "nq-dev-kilt.jsonl", world / "data" / "fever-dev-kilt.jsonl"]
    out = tmp_path / "base"
    result = invoke(
        "eval",
        *data,
        "--model",
        world / "model",
        "--out",
        out,
        "--max-new-tokens",
        "3",
        "--batch-size",
        "2",
        "--no-chat",
    )
    assert result.exit_code == 0, output(result)
    for f in data:
        _check_kilt_predictions(out / f.name, f)
    report = scores_json(out)
    assert set(report["scores"]) == {"base"} and report["scores"]["base"]["nq-dev-kilt"]["n"] == 3
    assert "normalised" not in report
    # the written predictions score the same when read back
    again = invoke("eval", *data, "-p", f"base={out}", "--out", tmp_path / "again")
    assert again.exit_code == 0 and scores_json(tmp_path / "again")["scores"] == report["scores"]

    # routed by LAG at sequence granularity, over the first 2 examples only, normalised by gold answers
    # (predicted for all 3 examples: the third is beyond --limit, not scored)
    gold = tmp_path / "gold"
    for f in data:
        write_preds(gold / f.name, {ex.id: ex.answers[0] for ex in read_kilt(f)})
    lag = tmp_path / "lag"
    result = invoke(
        "eval",
        *data,
        "--model",
        world / "model",
        "--library",
        world / "lib",
        "--k",
        "1",
        "--granularity",
        "sequence",
        "--limit",
        "2",
        "--max-new-tokens",
        "2",
        "--no-chat",
        "--out",
        lag,
        "-p",
        f"oracle={gold}",
        "--prompt-template",
        "Q : {input} A :",
    )
    assert result.exit_code == 0, output(result)
    assert len(read_kilt_predictions(lag / "nq-dev-kilt.jsonl")) == 2
    report = scores_json(lag)
    assert set(report["scores"]) == {"lag", "oracle"} and report["scores"]["oracle"]["nq-dev-kilt"]["n"] == 2
    assert report["scores"]["oracle"]["nq-dev-kilt"]["score"] == 100.0
    assert set(report["normalised"]["families"]["lag"]) == {"fact_checking", "open_domain_qa", "AVG"}


def test_generation_with_fixed_adapters(world, tmp_path):
    data = world / "data" / "nq-dev-kilt.jsonl"
    common = ("--model", world / "model", "--library", world / "lib", "--max-new-tokens", "3", "--no-chat")
    out = tmp_path / "fixed"
    result = invoke("eval", data, *common, "--router", "fixed", "--adapter", "alpha", "--out", out)
    assert result.exit_code == 0, output(result)
    fixed = _check_kilt_predictions(out / "nq-dev-kilt.jsonl", data)
    assert "fixed" in scores_json(out)["scores"]

    # the same through the API, one example at a time (no padding: a different batch layout than the CLI's),
    # with RoutingState.fix by hand
    from loralag import attach, detach, open_library
    from loralag.generate import generate
    from loralag.models import load_model

    model, tok = load_model(str(world / "model"))
    ds = ev.load_dataset(data)

    def reference(adapter_of: dict) -> dict:
        out = {}
        for ex in ds.examples:
            model._loralag_state.fix("lib", [adapter_of[ex.id]])
            text = generate(model, tok, [ev.build_prompt(ex, ds)], max_new_tokens=3, chat=False)[0]
            out[ex.id] = ev.clean_prediction(text, ds)
        return out

    attach(model, {"lib": open_library(world / "lib")}, router="fixed")
    try:
        expect_fixed = reference({"q1": "alpha", "q2": "alpha", "q3": "alpha"})
        expect_oracle = reference({"q1": "beta", "q2": "alpha", "q3": None})
        base = reference({"q1": None, "q2": None, "q3": None})
    finally:
        detach(model)
    assert fixed == expect_fixed
    assert fixed != base  # the adapter is really applied

    # per-example adapters (an Oracle) from a map; examples not in it use --adapter, or the base model
    amap = tmp_path / "map.json"
    amap.write_text(json.dumps({"q1": "lib/beta", "q2": ["alpha"]}))
    result = invoke(
        "eval",
        data,
        *common,
        "--router",
        "fixed",
        "--adapter-map",
        amap,
        "--name",
        "oracle",
        "--out",
        tmp_path / "oracle",
    )
    assert result.exit_code == 0, output(result)
    assert _check_kilt_predictions(tmp_path / "oracle" / "nq-dev-kilt.jsonl", data) == expect_oracle
    # a method named "oracle" is the default oracle; scoring 0 it cannot normalise: a warning, scores still written
    assert "no normalised table" in output(result)
    assert "normalised_error" in scores_json(tmp_path / "oracle")

    for args, msg in (
        (("--router", "fixed"), "--adapter"),
        (("--adapter", "nobody"), "nobody"),
        (("--router", "bogus"), "unknown router 'bogus'"),
    ):
        result = invoke("eval", data, *common, *args, "--out", tmp_path / "err")
        assert result.exit_code == 2 and msg in output(result), output(result)
    result = invoke("eval", data, "--model", world / "model")
    assert result.exit_code == 2 and "--out" in output(result)


# --------------------------------------------------------------------------------------------- real data

KILT_DIR = DATA / "kilt"


@pytest.mark.skipif(
    not KILT_DIR.is_dir(), reason=f"no KILT data at {KILT_DIR} (set LORALAG_TEST_DATA: see the README's Test data)"
)
@pytest.mark.parametrize("folder", [KILT_DIR, KILT_DIR / "samples"], ids=["dev", "samples"])
def test_gold_scores_100_on_every_shared_kilt_file(folder, tmp_path):
    files = sorted(folder.glob("*.jsonl"))
    assert files
    gold = tmp_path / "gold"
    for f in files:  # gold answers straight from the file, not through the readers under test
        recs = [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
        write_preds(
            gold / f.name,
            {str(r["id"]): next(o["answer"] for o in r["output"] if o.get("answer", "").strip()) for r in recs},
        )
    out = tmp_path / "out"
    result = invoke("eval", *files, "-p", f"oracle={gold}", "--out", out)
    assert result.exit_code == 0, output(result)
    report = scores_json(out)
    assert set(report["scores"]["oracle"]) == {f.stem for f in files}
    for stem, res in report["scores"]["oracle"].items():
        assert res["n_missing"] == 0 and res["score"] == pytest.approx(100.0, abs=1e-5), stem
    assert all(v == pytest.approx(100.0) for v in report["normalised"]["families"]["oracle"].values())


@pytest.mark.skipif(not (DATA / "fever").is_dir(), reason="no shared NQ-open / FEVER / LAMA data")
def test_gold_scores_100_on_shared_nq_open_fever_and_lama(tmp_path):
    files = [
        DATA / "nq-open" / "NQ-open.dev.jsonl",
        DATA / "fever" / "paper_dev.jsonl",
        DATA / "lama-trex" / "P19.jsonl",
        DATA / "lama-trex" / "P1412.jsonl",
    ]
    gold = tmp_path / "gold"
    for f in files:
        d = ev.load_dataset(f)
        write_preds(gold / f"{f.stem}.jsonl", {ex.id: ex.answers[-1] for ex in d.examples})
    out = tmp_path / "out"
    result = invoke("eval", *files, "-p", gold, "--out", out)
    assert result.exit_code == 0, output(result)
    per = scores_json(out)["scores"]["gold"]
    assert per["paper_dev"]["n"] == 9999 and per["paper_dev"]["accuracy"] == 100.0
    assert all(r["em"] == 100.0 for r in per.values())
