"""The `loralag` model of lm-evaluation-harness, offline: local YAML tasks over slices of NQ-open (generation) and FEVER
(multiple choice), run through `lm_eval.simple_evaluate` and through `loralag lm-eval`, on a tiny Llama with a
byte-level tokenizer. References: loralag's own forward pass and generation with the same libraries attached, and
lm-eval's own `hf` model on the same folder."""

from __future__ import annotations

import glob
import json
from pathlib import Path

import pytest
import torch
from conftest import DATA, TINY_LLAMA, invoke, output, save_lora
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, PreTrainedTokenizerFast

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

import loralag.evaluation.lm_eval as lle  # noqa: E402  (registers the `loralag` model)
from loralag import attach, build_library, detach  # noqa: E402
from loralag.errors import LoralagError  # noqa: E402
from loralag.library.store import module_shapes  # noqa: E402

NQ = DATA / "nq-open" / "NQ-open.dev.jsonl"
FEVER = DATA / "fever" / "paper_dev.jsonl"
pytestmark = pytest.mark.skipif(
    not (NQ.is_file() and FEVER.is_file()), reason=f"needs nq-open and fever under {DATA} (README: Test data)"
)
N_DOCS = 6
MAX_GEN = 12
LABELS = ["SUPPORTS", "REFUTES", "NOT ENOUGH INFO"]


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """A real tokenizer made offline: one token per byte (GPT-2's byte alphabet, no merges), so any text round-trips."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {t: i for i, t in enumerate(["<pad>", "<s>", "</s>", *alphabet])}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("lm_eval")
    tok = byte_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(
        **{**TINY_LLAMA, "vocab_size": len(tok), "max_position_embeddings": 512},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(cfg).eval()
    model.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    libs = {}
    for lib, targets in (("task", ("q_proj", "v_proj")), ("know", ("up_proj", "down_proj"))):
        folders = [
            save_lora(
                model, root / "ads" / f"{lib}{i}", seed=10 * len(lib) + i, target_modules=targets, spectral_gap=3.0
            )
            for i in range(4)
        ]
        libs[lib] = build_library(
            root / lib, folders, base_model=str(root / "model"), shapes=module_shapes(model), progress=False
        )
    tasks = root / "tasks"
    tasks.mkdir()
    for name, src in (("nq", NQ), ("fever", FEVER)):
        lines = src.read_text(encoding="utf-8").splitlines()[:N_DOCS]
        (tasks / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    choices = ", ".join(f'"{c}"' for c in LABELS)
    index = ", ".join(f"'{c}': {i}" for i, c in enumerate(LABELS))
    (tasks / "fever.yaml").write_text(
        f"""task: loralag_test_fever
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / "fever.jsonl"}
test_split: test
output_type: multiple_choice
doc_to_text: "Claim: {{{{claim}}}}\\nLabel:"
doc_to_choice: [{choices}]
doc_to_target: "{{{{ {{{index}}}[label] }}}}"
metric_list:
  - metric: acc
""",
        encoding="utf-8",
    )
    return dict(root=root, model_dir=root / "model", libs=libs, tasks=tasks)


def write_nq_task(tasks: Path, until: list[str]) -> None:
    (tasks / "nq.yaml").write_text(
        f"""task: loralag_test_nq
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tasks / "nq.jsonl"}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}?\\nA:"
doc_to_target: "{{{{answer[0]}}}}"
generation_kwargs:
  until: {json.dumps(until)}
  max_gen_toks: {MAX_GEN}
  do_sample: false
metric_list:
  - metric: exact_match
""",
        encoding="utf-8",
    )


# -- loralag's own computation, the reference --------------------------------------------------------------------
class Reference:
    """The tiny model loaded with transformers, libraries attached with loralag's attach: loglikelihoods summed from
    log-softmax over the continuation's tokens, greedy generation with model.generate, one request at a time."""

    def __init__(self, model_dir, libs: dict, router="lag", k=2):
        self.tok = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        if libs:
            attach(self.model, libs, router=router, k=k)

    def close(self):
        detach(self.model)

    @torch.no_grad()
    def loglikelihood(self, context: str, continuation: str) -> float:
        ctx = self.tok(context).input_ids
        whole = self.tok(context + continuation).input_ids
        n = len(whole) - len(ctx)
        assert n > 0 and whole[: len(ctx)] == ctx
        logp = torch.log_softmax(self.model(torch.tensor([whole[:-1]])).logits[0].double(), -1)
        target = torch.tensor(whole[1:])
        return logp[torch.arange(len(target)), target][-n:].sum().item()

    @torch.no_grad()
    def rolling(self, text: str) -> float:
        ids = [self.tok.bos_token_id] + self.tok(text).input_ids  # lm-eval predicts every token after its prefix
        logp = torch.log_softmax(self.model(torch.tensor([ids[:-1]])).logits[0].double(), -1)
        return logp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].sum().item()

    @torch.no_grad()
    def generate(self, context: str) -> str:
        ids = torch.tensor([self.tok(context).input_ids])
        out = self.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=MAX_GEN,
            do_sample=False,
            eos_token_id=self.tok.eos_token_id,
            pad_token_id=self.tok.pad_token_id,
        )
        return self.tok.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def cut(text: str, until: list[str]) -> str:
    for stop in until:
        text = text.split(stop)[0]
    return text


def pick_until(ref: Reference, contexts: list[str]) -> tuple[list[str], list[str]]:
    """The uncut greedy answers, and two printable ASCII stop strings they contain past their first character (a random
    model writes no newline or full stop, so the task's `until` is taken from what it does write)."""
    from collections import Counter

    free = [ref.generate(c) for c in contexts]
    counts = Counter(ch for text in free for ch in set(text[1:]) if ch.isascii() and ch.isprintable() and ch != " ")
    return free, [ch for ch, _ in counts.most_common(2)]


def nq_contexts() -> list[str]:
    docs = [json.loads(line) for line in NQ.read_text(encoding="utf-8").splitlines()[:N_DOCS]]
    return [f"Q: {d['question']}?\nA:" for d in docs]


def arguments(sample: dict) -> list[tuple]:
    """A sample's requests: tuples in memory, {"gen_args_0": {"arg_0": ..., "arg_1": ...}, ...} in lm-eval's files."""
    args = sample["arguments"]
    if isinstance(args, dict):
        args = [args[f"gen_args_{i}"] for i in range(len(args))]
    return [tuple(a[f"arg_{j}"] for j in range(len(a))) if isinstance(a, dict) else tuple(a) for a in args]


def loglikelihoods(samples: list[dict]) -> dict[tuple[str, str], float]:
    out = {}
    for s in samples:
        for (ctx, cont), resp in zip(arguments(s), s["resps"]):
            out[(ctx, cont)] = float(resp[0][0])
    return out


def generations(samples: list[dict]) -> dict[str, str]:
    return {arguments(s)[0][0]: s["resps"][0][0] for s in samples}


def evaluate(setup, model: str, model_args: str, batch_size: int, tasks=("loralag_test_fever", "loralag_test_nq")):
    return lm_eval.simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=list(tasks),
        task_manager=TaskManager(include_path=str(setup["tasks"])),
        batch_size=batch_size,
        device="cpu",
        log_samples=True,
        bootstrap_iters=0,
    )


def check_against_reference(ref: Reference, samples: dict, free: list[str], until: list[str]) -> None:
    fever = loglikelihoods(samples["loralag_test_fever"])
    assert len(fever) == N_DOCS * len(LABELS)
    for (ctx, cont), ll in fever.items():
        assert ll == pytest.approx(ref.loglikelihood(ctx, cont), abs=1e-4), (ctx, cont)
    answers = generations(samples["loralag_test_nq"])
    expected = {c: cut(f, until) for c, f in zip(nq_contexts(), free)}
    assert answers == expected
    assert all(not any(u in a for u in until) for a in answers.values())
    assert sum(e != f for e, f in zip(expected.values(), free)) >= N_DOCS // 2  # the stops did cut most answers


# -- tests ---------------------------------------------------------------------------------------------------------
def test_simple_evaluate_routed_equals_loralag(setup):
    """(a) through simple_evaluate: the routed model's loglikelihoods (batched, 4 requests a forward) and its
    generations equal loralag's own, one request at a time; (c) generation stops at the task's `until` strings."""
    libs = {"know": setup["libs"]["know"]}
    ref = Reference(setup["model_dir"], libs, router="lag", k=2)
    try:
        free, until = pick_until(ref, nq_contexts())
        write_nq_task(setup["tasks"], until)
        res = evaluate(
            setup, "loralag", f"pretrained={setup['model_dir']},libraries=know:{libs['know'].path},router=lag,k=2", 4
        )
        check_against_reference(ref, res["samples"], free, until)
        base = Reference(setup["model_dir"], {})
        fever = loglikelihoods(res["samples"]["loralag_test_fever"])
        moved = max(abs(ll - base.loglikelihood(c, x)) for (c, x), ll in fever.items())
        assert moved > 1e-2  # the library does change the scores: the comparison above is not the base model's
        assert res["config"]["loralag"]["know"]["router"] == "lag"
    finally:
        ref.close()


def test_rolling_loglikelihood_equals_loralag(setup):
    libs = setup["libs"]
    lm = lle.LoralagLM(
        pretrained=str(setup["model_dir"]),
        libraries=f"task:{libs['task'].path};know:{libs['know'].path}",
        router="lag",
        k="task:3;know:2",
        batch_size=2,
        device="cpu",
    )
    ref = Reference(setup["model_dir"], libs, router="lag", k={"task": 3, "know": 2})
    try:
        texts = [json.loads(line)["claim"] for line in FEVER.read_text(encoding="utf-8").splitlines()[:3]]
        got = lm.loglikelihood_rolling(
            [Instance("loglikelihood_rolling", {}, (t,), i) for i, t in enumerate(texts)], disable_tqdm=True
        )
        for text, ll in zip(texts, got):
            assert ll == pytest.approx(ref.rolling(text), abs=1e-4)
        assert lm.routing.specs["task"].k == 3 and lm.routing.specs["know"].k == 2
    finally:
        ref.close()
        detach(lm.model)


def test_no_library_equals_lm_eval_hf(setup):
    """(b) with no library, `loralag` scores and generates exactly as lm-eval's own `hf` model on the same folder."""
    write_nq_task(setup["tasks"], ["e", "o"])
    folder = setup["model_dir"]
    ours = evaluate(setup, "loralag", f"pretrained={folder}", 3)["samples"]
    theirs = evaluate(setup, "hf", f"pretrained={folder},dtype=float32", 3)["samples"]
    assert loglikelihoods(ours["loralag_test_fever"]) == loglikelihoods(theirs["loralag_test_fever"])
    assert generations(ours["loralag_test_nq"]) == generations(theirs["loralag_test_nq"])
    ref = Reference(folder, {})
    for (ctx, cont), ll in loglikelihoods(ours["loralag_test_fever"]).items():
        assert ll == pytest.approx(ref.loglikelihood(ctx, cont), abs=1e-4)


def test_cli_two_libraries_equals_loralag(setup, tmp_path):
    """(a) and (c) through `loralag lm-eval` (lm-eval's own command line, `--model loralag` added), two libraries."""
    libs = setup["libs"]
    ref = Reference(setup["model_dir"], libs, router={"task": "lag", "know": "lag"}, k=2)
    try:
        free, until = pick_until(ref, nq_contexts())
        write_nq_task(setup["tasks"], until)
        result = invoke(
            "lm-eval",
            "--model_args",
            f"pretrained={setup['model_dir']},libraries=task:{libs['task'].path};know:{libs['know'].path},"
            "router=task:lag;know:lag,k=2",
            "--tasks",
            "loralag_test_fever,loralag_test_nq",
            "--include_path",
            setup["tasks"],
            "--batch_size",
            "4",
            "--device",
            "cpu",
            "--output_path",
            tmp_path / "out",
            "--log_samples",
        )
        assert result.exit_code == 0, output(result)
        samples = {}
        for task in ("loralag_test_fever", "loralag_test_nq"):
            (path,) = glob.glob(str(tmp_path / "out" / "**" / f"samples_{task}_*.jsonl"), recursive=True)
            samples[task] = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
        check_against_reference(ref, samples, free, until)
    finally:
        ref.close()


def test_fixed_adapter_equals_loralag(setup):
    know = setup["libs"]["know"]
    name = know.names[1]
    lm = lle.LoralagLM(
        pretrained=str(setup["model_dir"]),
        libraries=f"know:{know.path}",
        fixed=f"know:{name}",
        batch_size=3,
        device="cpu",
    )
    ref = Reference(setup["model_dir"], {"know": know})
    ref_state = ref.model._loralag_state
    try:
        requests = [("Claim: the moon\nLabel:", f" {c}") for c in LABELS] + [("Q: who?\nA:", " one")]
        got = lm.loglikelihood([Instance("loglikelihood", {}, r, i) for i, r in enumerate(requests)], disable_tqdm=True)
        ref_state.fix("know", [name])
        for (ctx, cont), (ll, _) in zip(requests, got):
            assert ll == pytest.approx(ref.loglikelihood(ctx, cont), abs=1e-4)
    finally:
        ref.close()
        detach(lm.model)


@pytest.mark.parametrize(
    "args,message",
    [
        ("libraries=/no/such/lib", "model_args libraries: no library at /no/such/lib"),
        ("libraries=know:{know},router=lagg", "model_args router: unknown router 'lagg'"),
        ("libraries=know:{know},k=0", "model_args k: must be a positive integer"),
        ("libraries=know:{know},k=other:3", "model_args k: unknown libraries ['other']"),
        ("libraries=know:{know},fixed=nope", "model_args fixed: name the library"),
    ],
)
def test_bad_model_args_are_refused_in_one_line(setup, args, message):
    from lm_eval.utils import simple_parse_args_string

    kwargs = simple_parse_args_string(args.format(know=setup["libs"]["know"].path))
    with pytest.raises(LoralagError) as e:
        lle.LoralagLM(pretrained=str(setup["model_dir"]), device="cpu", **kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_libraries_keep_the_model_on_the_cpu_where_a_gpu_is_present(setup, monkeypatch):
    """lm-eval's HFLM picks CUDA when there is one; the libraries route on the CPU, so with libraries the model
    stays there, and an explicit GPU device is refused before the model loads."""
    know = str(setup["libs"]["know"].path)
    with pytest.raises(LoralagError) as e:
        lle.LoralagLM(pretrained=str(setup["model_dir"]), libraries=f"know:{know}", device="cuda:0")
    assert "device cuda:0" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    lm = lle.LoralagLM(pretrained=str(setup["model_dir"]), libraries=f"know:{know}")
    try:
        assert {p.device.type for p in lm.model.parameters()} == {"cpu"}
    finally:
        detach(lm.model)


def test_cli_help_is_lm_evals(setup):
    result = invoke("lm-eval", "-h")
    assert "--model_args" in output(result) and "--include_path" in output(result)


# -- the server: prompt scoring for lm-eval's local-completions ------------------------------------------------------
@pytest.fixture(scope="module")
def served(setup):
    from test_serve import Server

    from loralag.serve.app import create_app

    tok = AutoTokenizer.from_pretrained(setup["model_dir"])
    model = AutoModelForCausalLM.from_pretrained(setup["model_dir"], dtype=torch.float32).eval()
    server = Server(create_app(model, tok, setup["libs"], router="lag", k=2, model_name="tiny"))
    yield server
    server.stop()


def test_the_server_scores_prompts_as_the_routed_model(setup, served):
    """echo + logprobs on /v1/completions: every prompt token's log probability, its top alternatives and the
    greedy next token equal the routed model's own forward pass (the Reference attaches the same libraries)."""
    ref = Reference(setup["model_dir"], setup["libs"])
    try:
        prompts = [ref.tok("Claim: the sky is green\nLabel:").input_ids, ref.tok("who wrote it").input_ids]
        body = {"model": "tiny", "prompt": prompts, "echo": True, "logprobs": 2, "max_tokens": 1, "temperature": 0}
        r = served.http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        for ids, choice in zip(prompts, r.json()["choices"]):
            with torch.no_grad():
                lp = torch.log_softmax(ref.model(torch.tensor([ids])).logits[0].double(), -1)
            got = choice["logprobs"]
            nxt = int(lp[-1].argmax())
            assert got["token_logprobs"][0] is None and len(got["token_logprobs"]) == len(ids) + 1
            want = [float(lp[i - 1, ids[i]]) for i in range(1, len(ids))] + [float(lp[-1, nxt])]
            assert got["token_logprobs"][1:] == pytest.approx(want, abs=1e-5)
            assert got["tokens"] == [ref.tok.decode([t]) for t in [*ids, nxt]]
            for i, top in enumerate(got["top_logprobs"][1:]):
                values, index = lp[i].topk(2)
                want_top = {}
                for j, v in zip(index.tolist(), values.tolist()):  # keyed by text, as OpenAI's
                    want_top.setdefault(ref.tok.decode([j]), v)
                assert top.keys() == want_top.keys() and list(top.values()) == pytest.approx(list(want_top.values()))
            assert choice["text"] == ref.tok.decode([*ids, nxt])
    finally:
        ref.close()


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"echo": True}, "echo"),
        ({"logprobs": 1}, "logprobs"),
        ({"echo": True, "logprobs": 1, "max_tokens": 2}, "max_tokens"),
        ({"echo": True, "logprobs": 1, "max_tokens": 1, "temperature": 0.7}, "temperature"),
        ({"echo": True, "logprobs": 9, "max_tokens": 0}, "logprobs"),
        ({"echo": True, "logprobs": 1, "max_tokens": 0, "stream": True}, "stream"),
    ],
)
def test_scoring_options_are_checked(served, extra, param):
    r = served.http.post("/v1/completions", json={"model": "tiny", "prompt": "hi", **extra})
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_lm_eval_local_completions_on_the_server_equals_loralag(setup, served):
    """lm-eval's own `local-completions` model pointed at `loralag serve`: its loglikelihoods on the multiple-choice
    task equal the routed model's (lm-eval reads them from echo + logprobs)."""
    args = (
        f"model=tiny,base_url={served.url}/v1/completions,tokenizer={setup['model_dir']},"
        "tokenizer_backend=huggingface,num_concurrent=1,max_retries=1"
    )
    samples = evaluate(setup, "local-completions", args, 1, tasks=("loralag_test_fever",))["samples"]
    fever = loglikelihoods(samples["loralag_test_fever"])
    assert len(fever) == N_DOCS * len(LABELS)
    ref = Reference(setup["model_dir"], setup["libs"])
    try:
        for (ctx, cont), ll in fever.items():
            assert ll == pytest.approx(ref.loglikelihood(ctx, cont), abs=1e-4), (ctx, cont)
    finally:
        ref.close()
