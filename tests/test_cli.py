"""The `loralag` command line on a tiny llama saved to disk, with a tiny offline tokenizer next to it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import invoke, output, save_lora, tiny_llama
from tiny_text import tiny_tokenizer

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.one_thread


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    model = tiny_llama()
    model.save_pretrained(tmp / "model")
    tiny_tokenizer().save_pretrained(tmp / "model")
    for i, name in enumerate(["alpha", "beta", "gamma"]):
        save_lora(model, tmp / "adapters" / name, seed=i, target_modules=("q_proj", "v_proj", "up_proj"))
    return tmp


@pytest.fixture(scope="module")
def lib(world):
    out = world / "lib"
    result = invoke("build", out, world / "adapters", "--model", world / "model")
    assert result.exit_code == 0, output(result)
    assert "3 adapters" in output(result)
    return out


def test_info_lists_adapters(lib):
    result = invoke("info", lib, "--adapters")
    assert result.exit_code == 0, output(result)
    text = output(result)
    for name in ("alpha", "beta", "gamma"):
        assert name in text
    assert "adapters 3" in text and "size on disk" in text
    assert "6 targeted" in text  # q, v, up in 2 layers
    assert "q_proj" in text and "up_proj" in text


def test_build_is_resumable(world, lib):
    result = invoke("build", lib, world / "adapters", "--model", world / "model")
    assert result.exit_code == 0, output(result)
    assert "3 adapters" in output(result)


def test_remove_export_compact_add(world, lib, tmp_path):
    result = invoke("remove", lib, "beta")
    assert result.exit_code == 0, output(result)
    text = output(invoke("info", lib, "--adapters"))
    assert "adapters 2" in text and "beta" not in text

    result = invoke("export", lib, tmp_path / "out")
    assert result.exit_code == 0, output(result)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["alpha", "gamma"]
    cfg = json.loads((tmp_path / "out" / "alpha" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and (tmp_path / "out" / "alpha" / "adapter_model.safetensors").is_file()

    result = invoke("export", lib, tmp_path / "one", "--adapter", "gamma")
    assert result.exit_code == 0 and [p.name for p in (tmp_path / "one").iterdir()] == ["gamma"]

    assert invoke("compact", lib).exit_code == 0
    result = invoke("add", lib, world / "adapters" / "beta")
    assert result.exit_code == 0, output(result)
    assert "adapters 3" in output(invoke("info", lib))


def test_errors_exit_2_with_one_line(world, lib, tmp_path):
    bad = tmp_path / "bad" / "broken"
    bad.mkdir(parents=True)
    (bad / "adapter_config.json").write_text("{not json")
    result = invoke("build", tmp_path / "lib2", bad, "--model", world / "model")
    assert result.exit_code == 2
    text = output(result)
    assert "adapter_config.json" in text and str(bad) in text and "Traceback" not in text

    result = invoke("remove", lib, "nonexistent")
    assert result.exit_code == 2 and "nonexistent" in output(result)
    result = invoke("info", tmp_path / "nolib")
    assert result.exit_code == 2 and f"no library at {tmp_path / 'nolib'}" in output(result)
    result = invoke("info", tmp_path)
    assert result.exit_code == 2 and "not a loralag library" in output(result)
    result = invoke("generate", "--model", world / "model", "--library", lib, "--router", "bogus", "what")
    assert result.exit_code == 2 and "unknown router 'bogus'" in output(result)
    result = invoke("generate", "--model", world / "model", "--library", lib, "--k", "0", "what")
    assert result.exit_code == 2 and "--k" in output(result)
    result = invoke("build", tmp_path / "lib3", world / "adapters", "--model", tmp_path / "nomodel")
    assert result.exit_code == 2


def test_generate_with_routing_and_heatmap(world, lib, tmp_path):
    png = tmp_path / "routing.png"
    result = invoke(
        "generate",
        "--model",
        world / "model",
        "--library",
        lib,
        "--k",
        "2",
        "--max-new-tokens",
        "4",
        "--show-routing",
        "--heatmap",
        png,
        "--no-chat",
        "what is the capital of the red moon ?",
    )
    assert result.exit_code == 0, output(result)
    text = output(result)
    assert "Routing of sequence 0" in text and "capital" in text and "entropy" in text
    assert png.read_bytes()[:8] == PNG_MAGIC

    # several prompts in one batch, plain base model when no library is given
    result = invoke(
        "generate", "--model", world / "model", "--max-new-tokens", "3", "--no-chat", "who", "what is the sun"
    )
    assert result.exit_code == 0, output(result)
    assert "[0] who" in output(result) and "[1] what is the sun" in output(result)


def test_help_is_fast_and_lists_commands():
    proc = subprocess.run([sys.executable, "-m", "loralag.cli", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0
    for cmd in ("build", "add", "remove", "compact", "info", "export", "train", "generate", "demo"):
        assert cmd in proc.stdout
    # no heavy imports for --help beyond what `import loralag` itself pulls in
    code = (
        "import sys, loralag.cli; print(sorted(m for m in ('transformers', 'matplotlib', 'peft') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert out.strip() == "[]"


def test_demo_pipeline_on_tiny_model(world, tmp_path, monkeypatch):
    # The real demo trains on the default model for minutes; here only its plumbing runs, on the tiny model.
    args = (
        "demo",
        "--model",
        world / "model",
        "--workdir",
        tmp_path / "demo",
        "--steps",
        "2",
        "--k",
        "3",
        "--heatmap",
        tmp_path / "demo.png",
    )
    spinners = _Spinners(monkeypatch)
    result = invoke(*args)
    assert result.exit_code == 0, output(result)
    from loralag.experiments.demo import SYSTEMS

    assert sum("Answering 6 questions" in m for m in spinners.messages) == len(SYSTEMS), spinners.messages
    assert any("Loading model" in m for m in spinners.messages), spinners.messages
    text = output(result)
    for col in ("question", "gold", "Oracle", "Answered right", "Timings", "train"):
        assert col in text
    assert "Velmora" in text and "Pallinor" in text
    assert (tmp_path / "demo.png").read_bytes()[:8] == PNG_MAGIC
    adapters = sorted(p.name for p in (tmp_path / "demo" / "adapters").iterdir())
    assert len(adapters) == 6 and "velmora" in adapters
    # the demo trains with the contrastive init unless told otherwise (`--init`)
    markers = [json.loads((tmp_path / "demo" / "adapters" / a / "loralag_train.json").read_text()) for a in adapters]
    assert {m["config"]["init"] for m in markers} == {"contrast"}

    from loralag.experiments.demo import run_demo

    again = run_demo(tmp_path / "demo", steps=2, k=3, model_spec=str(world / "model"), progress=False)
    assert set(again["accuracy"]) >= {"base", "lag", "lag_prefix", "lag_voted", "oracle", "lag_adapter"}
    assert len(again["rows"]) == 6 and all(r["lag_adapter"] in adapters for r in again["rows"])
    # cached: nothing is trained again
    mtimes = {
        p.name: (p / "adapter_model.safetensors").stat().st_mtime for p in (tmp_path / "demo" / "adapters").iterdir()
    }
    run_demo(tmp_path / "demo", steps=2, k=3, model_spec=str(world / "model"), progress=False)
    assert mtimes == {
        p.name: (p / "adapter_model.safetensors").stat().st_mtime for p in (tmp_path / "demo" / "adapters").iterdir()
    }


def test_index_then_generate_with_nprobe_and_sequence_routing(world, lib, tmp_path):
    import shutil

    copy = tmp_path / "lib"
    shutil.copytree(lib, copy)
    result = invoke("index", copy, "--nlist", "2")
    assert result.exit_code == 0, output(result)
    assert "arrow index" in output(result)
    args = ("generate", "--model", world / "model", "--library", copy, "--k", "2", "--max-new-tokens", "3", "--no-chat")
    exact = invoke(*args, "what is the capital of the red moon ?")
    indexed = invoke(*args, "--nprobe", "2", "what is the capital of the red moon ?")  # every cluster: exact
    assert exact.exit_code == 0 and indexed.exit_code == 0, output(indexed)
    assert output(exact) == output(indexed)
    alias = invoke(*args, "--arrow-index", "2", "what is the capital of the red moon ?")
    assert alias.exit_code == 0 and output(alias) == output(exact), output(alias)
    voted = invoke(*args, "--granularity", "sequence", "--show-routing", "what is the capital of the red moon ?")
    assert voted.exit_code == 0, output(voted)
    bad = invoke(*args, "--granularity", "paragraph", "x")
    assert bad.exit_code == 2 and "granularity" in output(bad)


def test_train_one_at_a_time_grouped_and_in_workers_write_the_same_adapters(world, tmp_path):
    from safetensors.torch import load_file

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "zarn.txt").write_text("the red moon has a capital called zarn . zarn is old .")
    (docs / "quill.txt").write_text("the blue river flows past quill . quill makes glass .")
    (docs / "pairs.jsonl").write_text(json.dumps({"prompt": "capital of the red moon ?", "answer": "zarn"}) + "\n")
    args = ("--model", world / "model", "-t", "up_proj", "--epochs", "2", "--batch-size", "2", "--lr", "5e-3")
    one = invoke("train", tmp_path / "one", docs, *args)
    grouped = invoke("train", tmp_path / "grouped", docs, *args, "--group-size", "2")
    workers = invoke("train", tmp_path / "workers", docs, *args, "--workers", "2")
    assert one.exit_code == 0 and grouped.exit_code == 0, output(one) + output(grouped)
    assert workers.exit_code == 0, output(workers)
    assert "3 adapter(s)" in output(grouped) and "3 adapter(s)" in output(workers)
    for name in ("zarn", "quill", "pairs"):
        a = load_file(tmp_path / "one" / name / "adapter_model.safetensors")
        for other in ("grouped", "workers"):
            b = load_file(tmp_path / other / name / "adapter_model.safetensors")
            assert a.keys() == b.keys() and a
            for key in a:
                gap = (a[key] - b[key]).abs().max().item()
                assert gap < 1e-5, (name, other, key, gap)
    files = sorted((tmp_path / "grouped").glob("*/adapter_model.safetensors"))
    stamps = [f.stat().st_mtime_ns for f in files]
    again = invoke("train", tmp_path / "grouped", docs, *args, "--group-size", "2")
    assert again.exit_code == 0 and "3 adapter(s)" in output(again)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # all up to date: nothing retrained


def test_train_contrast_against_the_library_gives_train_adapters_adapters(world, tmp_path):
    """--contrast-against INPUTS: each adapter's contrast init against every input's texts pooled, the adapter
    train_adapters writes with TrainConfig.contrast_against = those texts (item_texts); without it, another one."""
    import torch
    from safetensors.torch import load_file

    from loralag.models import load_model
    from loralag.training.train import TrainConfig, _read_marker, item_texts, read_training_inputs, train_adapters

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "zarn.txt").write_text("the red moon has a capital called zarn . zarn is old .")
    (docs / "pairs.jsonl").write_text(json.dumps({"prompt": "capital of the red moon ?", "answer": "zarn"}) + "\n")
    args = ("--model", world / "model", "-t", "up_proj", "--steps", "3", "--init", "contrast")
    mine = invoke("train", tmp_path / "mine", docs, *args, "--contrast-against", docs)
    plain = invoke("train", tmp_path / "plain", docs, *args)
    assert mine.exit_code == 0 and plain.exit_code == 0, output(mine) + output(plain)
    items = read_training_inputs([docs])
    texts = [t for item in items for t in item_texts(item)]
    assert texts == ["capital of the red moon ?zarn", "the red moon has a capital called zarn . zarn is old ."]
    model, tok = load_model(str(world / "model"), dtype=torch.float32)
    config = TrainConfig(target_modules=["up_proj"], steps=3, init="contrast", contrast_against=texts)
    [ref] = train_adapters(model, tok, [i for i in items if i.name == "zarn"], tmp_path / "ref", config, progress=False)
    a, b = (
        load_file(ref / "adapter_model.safetensors"),
        load_file(tmp_path / "mine" / "zarn" / "adapter_model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    c = load_file(tmp_path / "plain" / "zarn" / "adapter_model.safetensors")
    assert any(not torch.allclose(c[k], b[k], atol=1e-4) for k in c if "lora_A" in k)
    assert _read_marker(tmp_path / "mine" / "zarn")["config"]["contrast_against"].startswith("2 texts, sha256 ")


def test_train_pairs_under_a_frozen_adapter(world, tmp_path):
    docs, checks = tmp_path / "docs", tmp_path / "checks"
    docs.mkdir(), checks.mkdir()
    (docs / "zarn.txt").write_text("the red moon has a capital called zarn . zarn is old .")
    common = ("--model", world / "model", "--epochs", "1", "--batch-size", "2")
    assert invoke("train", tmp_path / "know", docs, *common, "-t", "up_proj").exit_code == 0
    line = {"prompt": "capital of the red moon ?", "answer": "zarn"}
    (checks / "check.jsonl").write_text(json.dumps({**line, "under": "../know/zarn"}) + "\n" + json.dumps(line) + "\n")
    result = invoke("train", tmp_path / "task", checks, *common, "-t", "q_proj")
    assert result.exit_code == 0, output(result)
    marker = json.loads((tmp_path / "task" / "check" / "loralag_train.json").read_text())
    (checks / "plain.jsonl").write_text(json.dumps(line) + "\n" + json.dumps(line) + "\n")
    assert invoke("train", tmp_path / "plain", checks / "plain.jsonl", *common, "-t", "q_proj").exit_code == 0
    plain = json.loads((tmp_path / "plain" / "plain" / "loralag_train.json").read_text())
    assert marker["first_loss"] != plain["first_loss"]  # the frozen adapter acted on the first pair
    (checks / "check.jsonl").write_text(json.dumps({**line, "under": "../nowhere"}) + "\n")
    bad = invoke("train", tmp_path / "task", checks / "check.jsonl", *common, "-t", "q_proj")
    assert bad.exit_code != 0 and "nowhere is not a folder" in output(bad)


def test_train_pairs_under_a_routed_library(world, tmp_path):
    docs, checks = tmp_path / "docs", tmp_path / "checks"
    docs.mkdir(), checks.mkdir()
    (docs / "zarn.txt").write_text("the red moon has a capital called zarn . zarn is old .")
    (docs / "moon.txt").write_text("the blue moon is cold . its capital is old .")
    common = ("--model", world / "model", "--epochs", "1", "--batch-size", "2")
    assert invoke("train", tmp_path / "know", docs, *common, "-t", "up_proj").exit_code == 0
    built = invoke("build", tmp_path / "lib", tmp_path / "know", "--model", world / "model")
    assert built.exit_code == 0, output(built)
    line = json.dumps({"prompt": "capital of the red moon ?", "answer": "zarn"})
    (checks / "check.jsonl").write_text(line + "\n" + line + "\n")
    result = invoke(
        "train",
        tmp_path / "task",
        checks,
        *common,
        "-t",
        "q_proj",
        "--under-library",
        tmp_path / "lib",
        "--under-k",
        "1",
    )
    assert result.exit_code == 0, output(result)
    marker = json.loads((tmp_path / "task" / "check" / "loralag_train.json").read_text())
    assert marker["library"] == {"path": str((tmp_path / "lib").resolve()), "router": "lag", "k": 1}
    assert invoke("train", tmp_path / "plain", checks, *common, "-t", "q_proj").exit_code == 0
    plain = json.loads((tmp_path / "plain" / "check" / "loralag_train.json").read_text())
    assert marker["first_loss"] != plain["first_loss"]  # the routed library acted
    bad = invoke("train", tmp_path / "t2", docs, *common, "-t", "q_proj", "--under-library", tmp_path / "lib")
    assert bad.exit_code != 0 and "prompt/answer inputs only, not documents: moon, zarn" in output(bad)
    bad = invoke(
        "train",
        tmp_path / "t2",
        checks,
        *common,
        "-t",
        "q_proj",
        "--under-library",
        tmp_path / "lib",
        "--under-router",
        "arrow-mix",
    )
    assert bad.exit_code != 0 and "arrow-mix" in output(bad)
    bad = invoke("train", tmp_path / "t2", checks, *common, "-t", "up_proj", "--under-library", tmp_path / "lib")
    assert bad.exit_code != 0 and "which the adapter being trained targets too" in output(bad)


# -- a newcomer's first hour (issue 15) ----------------------------------------------------------------------
# Bad arguments, each with the value the error must name. Run in a fresh interpreter, so that what the CLI
# imported before refusing them can be read off sys.modules.
BAD_ARGS = [
    (["generate", "--router", "lagg", "hi"], "lagg"),
    (["generate", "--router", "fixed", "hi"], "fixed"),
    (["generate", "--library", "{tmp}/nolib", "hi"], "nolib"),
    (["generate", "--library", "{tmp}", "hi"], "not a loralag library"),
    (["generate", "--model", "{tmp}/nomodel", "hi"], "nomodel"),
    (["generate", "--model", "{tmp}", "hi"], "config.json"),
    (["generate", "--granularity", "sentence", "hi"], "sentence"),
    (["generate", "--k", "0", "hi"], "--k"),
    (["serve", "--router", "lagg"], "lagg"),
    (["serve", "--router", "fixed"], "fixed"),
    (["demo", "--router", "fixed"], "fixed"),
    (["eval", "{tmp}/missing.jsonl", "-p", "x"], "missing.jsonl"),
    (["eval", "{tmp}/data.jsonl", "--model", "default", "--out", "{tmp}/o", "--router", "lagg"], "lagg"),
    (["train", "{tmp}/out", "{tmp}/nodocs"], "nodocs"),
    (["train", "{tmp}/out", "{tmp}", "--workers", "2", "--group-size", "2"], "--workers"),
    (["build", "{tmp}/lib", "{tmp}/noadapters"], "noadapters"),
    (["index", "{tmp}/nolib"], "nolib"),
    (["bench", "--size", "huge"], "huge"),
    (["bench", "--data", "{tmp}/nolama"], "nolama"),
    (["bench", "--entities", "1"], "--entities"),
    (["bench", "--methods", "lag,lagg"], "lagg"),
    (["bench", "--methods", " , "], "--methods"),
    (["train", "{tmp}/out", "{tmp}", "--init", "eva"], "eva"),
    (["train", "{tmp}/out", "{tmp}", "--contrast-against", "{tmp}"], "--init contrast or salient, not peft"),
]

CHECK_SCRIPT = """
import json, sys
from typer.testing import CliRunner
from loralag.cli import app
out = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(app, args)
    text = r.output + (getattr(r, "stderr", "") if r.stderr_bytes is not None else "")
    out.append([r.exit_code, text, sorted(m for m in ("torch", "transformers") if m in sys.modules)])
print(json.dumps(out))
"""


def test_bad_arguments_are_refused_before_torch_or_a_model_loads(tmp_path):
    (tmp_path / "data.jsonl").write_text("{}\n")
    cases = [[a.replace("{tmp}", str(tmp_path)) for a in args] for args, _ in BAD_ARGS]
    proc = subprocess.run(
        [sys.executable, "-c", CHECK_SCRIPT, json.dumps(cases)], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    for (args, bad), (code, text, heavy) in zip(BAD_ARGS, json.loads(proc.stdout)):
        assert code == 2, (args, text)
        assert bad in " ".join(text.split()), (args, text)
        assert "Traceback" not in text, (args, text)
        assert heavy == [], f"{args}: {heavy} imported before the error: {text}"


def _commands():
    import typer

    from loralag.cli import app

    group = typer.main.get_command(app)
    return {name: group.get_command(None, name) for name in group.list_commands(None)}


def test_every_option_and_argument_is_described():
    missing = [
        f"{name} {p.name}" for name, cmd in _commands().items() for p in cmd.params if not (p.help or "").strip()
    ]
    assert missing == []


def test_help_text_in_brackets_is_shown_not_taken_for_markup():
    # rich reads `[ray]` as a style tag and drops it: `pip install "loralag"` would be printed
    for name in ("build", "train", "serve", "bench", "eval"):
        text = output(invoke(name, "--help")).replace(" ", "")
        assert 'pipinstall"loralag[ray]"' in text, name
    assert "LIB/NAMEor[..]" in output(invoke("eval", "--help")).replace(" ", "")


def test_help_shows_flags_as_flags_and_readable_usage():
    for name, _cmd in _commands().items():
        if name == "lm-eval":  # forwards --help to lm-eval's own parser: its text is lm-eval's
            continue
        text = invoke(name, "--help").output
        assert "<bool>" not in text, name
        usage = next(line for line in text.splitlines() if "Usage:" in line)
        assert "{" not in usage, usage  # OUT ADAPTERS..., not {out} {adapters}...
    text = output(invoke("build", "--help"))
    assert "Usage: loralag build [OPTIONS] LIB ADAPTERS..." in text
    assert "--rank" in output(invoke("train", "--help"))


def test_a_flag_given_a_value_is_refused_and_creates_nothing(world, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("build", "--replace", "true", "mylib", world / "adapters", "--model", world / "model")
    assert result.exit_code == 2 and "--replace" in output(result)
    assert not (tmp_path / "true").exists() and not (tmp_path / "mylib").exists()
    result = invoke("info", "--adapters", "yes", "x")
    assert result.exit_code == 2 and "--adapters" in output(result)


def test_train_rank_has_a_name_and_keeps_its_alias(world, tmp_path):
    for flag in ("--rank", "--r", "-r"):  # parsed; the missing input is what fails
        result = invoke("train", tmp_path / "out", tmp_path / "nodocs", flag, "3")
        assert result.exit_code == 2 and "nodocs" in output(result), output(result)
        assert "No such option" not in output(result)


def test_router_choices_come_from_ROUTERS():
    from loralag.cli import router_names
    from loralag.routing.routers import ROUTERS

    assert router_names() == tuple(ROUTERS)
    text = output(invoke("generate", "--help"))
    for name in ROUTERS:
        assert name in text
    assert "Not 'fixed'" in text


class _Spinners:
    """Records the messages of every rich status (spinner) started while it is installed."""

    def __init__(self, monkeypatch):
        import contextlib

        from rich.console import Console

        self.messages = []
        spinners = self

        class Status:
            def update(self, message, **kw):
                spinners.messages.append(str(message))

        @contextlib.contextmanager
        def status(console, message, **kw):
            spinners.messages.append(str(message))
            yield Status()

        monkeypatch.setattr(Console, "status", status)


def test_slow_steps_show_a_spinner_with_a_message(world, lib, monkeypatch):
    spinners = _Spinners(monkeypatch)
    result = invoke(
        "generate", "--model", world / "model", "--library", lib, "--max-new-tokens", "2", "--no-chat", "who"
    )
    assert result.exit_code == 0, output(result)
    assert any("Loading model" in m for m in spinners.messages), spinners.messages
    assert any("Generating" in m for m in spinners.messages), spinners.messages


def test_demo_table_keeps_whole_answers_at_80_columns():
    from rich.console import Console

    from loralag.experiments.demo import ENTITIES, print_results

    rows = []
    for e in ENTITIES:
        q, gold, statement = e["facts"][0]
        rows.append(
            {
                "question": q,
                "gold": gold,
                "adapter": e["name"],
                "base": "I do not know.",
                "lag": statement,
                "lag_prefix": statement,
                "lag_voted": statement,
                "oracle": statement,
                "lag_adapter": e["name"],
                "lag_adapter_share": 0.61,
                "right": {"base": False, "lag": True, "lag_prefix": True, "lag_voted": True, "oracle": True},
            }
        )
    results = {
        "rows": rows,
        "config": {"router": "lag", "k": 20},
        "timings": {"load": 1.0},
        "workdir": "w",
        "accuracy": {"base": 0.0, "lag": 1.0, "lag_prefix": 1.0, "lag_voted": 1.0, "oracle": 1.0, "lag_adapter": 1.0},
    }
    for width in (80, 200):
        console = Console(width=width, record=True, file=open("/dev/null", "w"))
        print_results(results, console)
        text = console.export_text()
        assert "…" not in text, width
        words = set(output_words(text))
        for r in rows:
            assert set(output_words(r["lag"])) <= words, (width, r["lag"])


def output_words(text: str) -> list[str]:
    import re

    return re.sub(r"[\u2500-\u257f.?,]", " ", text).split()


def test_serve_takes_an_api_key_and_public_metrics(world, lib):
    """`loralag serve --api-key KEY --metrics-public` as a user starts it: /v1 needs the key, /health and /metrics
    do not; without --metrics-public /metrics needs it too."""
    import os
    import socket
    import time

    import httpx

    def start(*extra):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        env = {**os.environ, "LORALAG_API_KEY": ""}
        cmd = [sys.executable, "-m", "loralag.cli", "serve", "--model", str(world / "model"), "--library", str(lib)]
        proc = subprocess.Popen(
            [*cmd, "--port", str(port), *extra], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stderr.read()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    return proc, url
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)

    for public in (True, False):
        proc, url = start("--api-key", "k3y", *(["--metrics-public"] if public else []))
        try:
            assert httpx.get(url + "/v1/models").status_code == 401
            assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"}).status_code == 401
            assert httpx.get(url + "/v1/models", headers={"Authorization": "Bearer k3y"}).status_code == 200
            assert httpx.get(url + "/metrics").status_code == (200 if public else 401)
            assert httpx.get(url + "/metrics", headers={"Authorization": "Bearer k3y"}).status_code == 200
        finally:
            proc.terminate()
            proc.wait(30)


def test_serve_refuses_an_empty_api_key_before_loading():
    result = invoke("serve", "--api-key", " ")
    assert result.exit_code != 0 and "--api-key must be a non-empty" in output(result)


def test_bench_methods_reach_the_run_and_choose_its_methods(tmp_path, monkeypatch):
    import loralag.cli.bench as bench_cli
    import loralag.experiments.lama.run as run
    from loralag.experiments.lama.config import method_list, size_config

    seen = {}
    monkeypatch.setattr(bench_cli, "_prepare_model", lambda spec, status: None)
    monkeypatch.setattr(run, "run_bench", lambda size, **kw: seen.update(kw, size=size) or {})
    monkeypatch.setattr("loralag.experiments.lama.report.print_summary", lambda results, console: None)
    result = invoke("bench", "--data", tmp_path, "--methods", "base, lag-prefix,rag")
    assert result.exit_code == 0, output(result)
    assert seen["methods"] == ("base", "lag-prefix", "rag")
    cfg = size_config(seen["size"], methods=seen["methods"])
    assert [m.name for m in method_list(cfg, 200)] == ["base", "lag-prefix@20", "rag"]
    assert seen["know_qa"] is None  # the config's default
    result = invoke("bench", "--data", tmp_path, "--know-qa")
    assert result.exit_code == 0 and seen["know_qa"] is True, output(result)
    assert seen["task_seed"] is None
    result = invoke("bench", "--data", tmp_path, "--task-seed", "3")
    assert result.exit_code == 0 and seen["task_seed"] == 3, output(result)
    result = invoke("bench", "--data", tmp_path, "--fc-steps", "480")
    assert result.exit_code == 0 and seen["fc_steps"] == 480, output(result)
    assert invoke("bench", "--data", tmp_path, "--fc-steps", "0").exit_code != 0
    assert seen["fc_all_under"] is None  # the last call did not set it: the config's default
    result = invoke("bench", "--data", tmp_path, "--fc-all-under")
    assert result.exit_code == 0 and seen["fc_all_under"] is True, output(result)
    assert (seen["fc_false"], seen["fc_under_train"], seen["fc_train_a"]) == (None, None, None)  # the size's
    result = invoke("bench", "--data", tmp_path, "--fc-false", "3", "--fc-capped", "--fc-freeze-a")
    assert result.exit_code == 0, output(result)
    assert (seen["fc_false"], seen["fc_under_train"], seen["fc_train_a"]) == (3, False, False)
    result = invoke("bench", "--data", tmp_path, "--fc-under-train", "--fc-train-a")
    assert result.exit_code == 0 and (seen["fc_under_train"], seen["fc_train_a"]) == (True, True), output(result)
    assert invoke("bench", "--data", tmp_path, "--fc-false", "0").exit_code != 0
    assert seen["fc_a_within"] is None  # the size's
    result = invoke("bench", "--data", tmp_path, "--fc-a-within", "32")
    assert result.exit_code == 0 and seen["fc_a_within"] == 32, output(result)
    assert invoke("bench", "--data", tmp_path, "--fc-a-within", "-1").exit_code != 0
    assert seen["task_under"] is None and seen["task_contrast"] is None  # the size's
    assert seen["task_freeze_a"] is None  # the size's
    result = invoke("bench", "--data", tmp_path, "--task-freeze-a")
    assert result.exit_code == 0 and seen["task_freeze_a"] is True, output(result)
    result = invoke("bench", "--data", tmp_path, "--task-train-a")
    assert result.exit_code == 0 and seen["task_freeze_a"] is False, output(result)
    result = invoke("bench", "--data", tmp_path, "--task-under", "lag")
    assert result.exit_code == 0 and seen["task_under"] == "lag", output(result)
    result = invoke("bench", "--data", tmp_path, "--task-under", "lag-bare")
    assert result.exit_code == 0 and seen["task_under"] == "lag-bare", output(result)
    result = invoke("bench", "--data", tmp_path, "--task-under", "lag-fact")
    assert result.exit_code == 0 and seen["task_under"] == "lag-fact", output(result)
    assert invoke("bench", "--data", tmp_path, "--task-under", "mix").exit_code != 0


@pytest.mark.parametrize("args, init", [((), "contrast"), (("--init", "peft"), "peft")])
def test_demo_init_reaches_the_run(monkeypatch, tmp_path, args, init):
    import loralag.cli.demo as demo_cli
    import loralag.experiments.demo as demo

    seen = {}
    monkeypatch.setattr(demo_cli, "_prepare_model", lambda spec, status: None)
    monkeypatch.setattr(demo, "run_demo", lambda workdir, **kw: seen.update(kw) or {})
    monkeypatch.setattr(demo, "print_results", lambda results, console: None)
    result = invoke("demo", "--workdir", tmp_path, *args)
    assert result.exit_code == 0, output(result)
    assert seen["init"] == init
    assert "--init" in output(invoke("demo", "--help"))
