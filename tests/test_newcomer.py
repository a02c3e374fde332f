"""What a newcomer meets first (issue 15): the README's two commands and .ci/run, its Python snippet, the test
data's location, and sequence votes with the chat template on, on the demo's questions."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import save_lora, shared_data, tiny_llama
from tiny_text import tiny_tokenizer

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def block(lang: str) -> str:
    """The README's first fenced block of `lang`."""
    return re.search(rf"^```{lang}\n(.*?)^```$", README, re.S | re.M).group(1)


def test_the_first_readme_command_installs_what_the_second_needs():
    first, second = block("bash").strip().splitlines()
    assert second == "python -m pytest -q"
    extras = re.search(r'pip install -e "?\.\[([\w,-]+)\]"?', first)
    assert extras, first
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    optional = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed = [dep for extra in extras.group(1).split(",") for dep in optional[extra]]
    assert any(dep.startswith("pytest") for dep in installed)
    assert first.startswith("pip install torch==2.13.0 && ") and first.endswith(" && loralag demo")


def test_ci_runs_the_readmes_own_commands():
    script = ROOT / ".ci" / "run"
    assert "--print" in script.read_text()  # else the call below would install and run the suite, not print
    proc = subprocess.run(["bash", str(script), "--print"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    first, second = block("bash").strip().splitlines()
    assert proc.stdout.splitlines() == [first.removesuffix(" && loralag demo"), second]


def test_the_readme_snippet_prints_answers_and_a_readable_summary(tmp_path, monkeypatch, capsys, one_thread):
    """The snippet as written, on a tiny model and a tiny library standing in for SmolLM2 and the demo's."""
    import loralag.experiments.demo
    import loralag.models
    from loralag import build_library
    from loralag.library.store import module_shapes

    model, tok = tiny_llama(), tiny_tokenizer()
    names = [e["name"] for e in loralag.experiments.demo.ENTITIES]
    for i, name in enumerate(names):
        save_lora(model, tmp_path / "adapters" / name, seed=i, target_modules=("gate_proj", "up_proj", "down_proj"))
    build_library(
        tmp_path / "demo" / "library",
        [tmp_path / "adapters"],
        base_model="tiny",
        shapes=module_shapes(model),
        progress=False,
    )
    monkeypatch.setattr(loralag.models, "load_model", lambda spec="default", **kw: (model, tok))
    monkeypatch.setattr(loralag.experiments.demo, "default_workdir", lambda: tmp_path / "demo")
    exec(compile(block("python"), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "{" not in out and "tensor" not in out  # decoded text and formatted lines, no raw dict or tensor
    assert re.search(r"knowledge: \d+ adapters? used, \d+ token×module decisions, entropy \d\.\d\d nats", out), out
    assert re.search(r"  \w+ \d+%", out), out  # the adapters' shares


def test_tests_find_real_data_through_an_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("LORALAG_TEST_DATA", str(tmp_path))
    assert shared_data() == tmp_path
    monkeypatch.delenv("LORALAG_TEST_DATA")
    assert shared_data() == ROOT.parent / "shared" / "data"
    assert "LORALAG_TEST_DATA" in README


def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from loralag.errors import LoralagError
    from loralag.models import default_model_dir

    try:
        return AutoTokenizer.from_pretrained(default_model_dir())
    except (LoralagError, OSError) as e:
        pytest.skip(f"default model unavailable: {e}")


def test_sequence_vote_follows_the_question_not_the_chat_template(tmp_path, one_thread):
    """SmolLM2's chat template wraps a demo question (about 8 tokens) in about 30 of its own (a system prompt,
    role markers). On a tiny model with that tokenizer, one adapter wins every template token and another every
    token of the question's own words: the vote must pick the question's adapter."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    from loralag import attach, build_library, detach
    from loralag.experiments.demo import ENTITIES
    from loralag.generate import encode_prompts, generate, majority_adapter
    from loralag.library.store import module_shapes

    tok = smollm2_tokenizer()
    questions = [e["facts"][0][0] for e in ENTITIES]
    enc = encode_prompts(tok, questions, chat=True, content_mask=True)
    real, content = enc["attention_mask"].bool(), enc["content_mask"]
    assert (content.sum(1) * 2 < real.sum(1)).all()  # the template's tokens outnumber the question's
    words = set(enc["input_ids"][content].tolist()) - set(enc["input_ids"][real & ~content].tolist())

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    template_dir, words_dir = torch.eye(32)[0], torch.eye(32)[1]
    with torch.no_grad():  # the template's tokens point one way, the question's own words another
        emb = model.get_input_embeddings().weight
        emb[:] = template_dir
        emb[sorted(words)] = words_dir
    for name, direction in (("template", template_dir), ("question", words_dir)):  # rank-1 adapters reading them
        peft = get_peft_model(model, LoraConfig(r=1, lora_alpha=1, target_modules=["q_proj"], init_lora_weights=False))
        with torch.no_grad():
            for key, p in peft.named_parameters():
                if "lora_A" in key:
                    p.copy_(direction[None])
        peft.save_pretrained(str(tmp_path / "adapters" / name))
        model = peft.unload()
    lib = build_library(
        tmp_path / "lib", [tmp_path / "adapters"], base_model="tiny", shapes=module_shapes(model), progress=False
    )

    state = attach(model, [lib], router="lag", k=2)
    try:
        counted_all = state.vote(enc["input_ids"], enc["attention_mask"])["lib"]
        assert counted_all == ["template"] * len(questions)  # what counting every token would choose
        assert state.vote(enc["input_ids"], enc["attention_mask"], count_mask=content)["lib"] == ["question"] * len(
            questions
        )
        _, trace = generate(model, tok, questions, chat=True, granularity="sequence", max_new_tokens=1, trace=True)
    finally:
        detach(model)
    served = [majority_adapter(trace, "lib", seq=i) for i in range(len(questions))]
    assert served == [("question", 1.0)] * len(questions)
