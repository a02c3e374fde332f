"""loralag on a real local Ray cluster (a head and a second node, one CPU each): every distributed path gives what
the same call gives locally, and a worker killed mid-run loses nothing."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

ray = pytest.importorskip("ray")

from conftest import TINY_LLAMA, invoke, output  # noqa: E402
from test_lama_bench import lama_dir, routed  # noqa: E402, F401  (fixtures)

from loralag.cluster.train import train_on_ray  # noqa: E402
from loralag.training.train import Document, QAPairs, TrainConfig, train_adapters  # noqa: E402

WORDS = [f"w{i}" for i in range(40)]
FAST = TrainConfig(steps=2)


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    torch.set_num_threads(1)  # the local reference runs as the workers do
    node = {"num_cpus": 1, "object_store_memory": 80 * 2**20}
    c = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    c.add_node(**node)
    ray.init(address=c.address)
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


@pytest.fixture(scope="module")
def tok():
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[EOS]"] + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    config = LlamaConfig(**{**TINY_LLAMA, "vocab_size": len(tok)})
    return AutoModelForCausalLM.from_config(config).eval()


def documents(n: int, length: int = 20) -> list:
    return [Document(f"doc{i}", " ".join(WORDS[(i * 7 + j * (i + 1)) % 40] for j in range(length))) for i in range(n)]


def assert_same_adapters(got, want, names) -> None:
    for name in names:
        a = load_file(got / name / "adapter_model.safetensors")
        b = load_file(want / name / "adapter_model.safetensors")
        assert a.keys() == b.keys() and a, name
        for key in a:
            assert torch.equal(a[key], b[key]), f"{name}: {key} differs from the local run"
        assert adapter_config(got / name) == adapter_config(want / name)


def adapter_config(folder) -> dict:
    config = json.loads((folder / "adapter_config.json").read_text())
    config["target_modules"] = sorted(config["target_modules"])  # PEFT writes a set: its order is per process
    return config


def worker_processes(cls: str) -> list[int]:
    """Ids of this machine's Ray actor processes of class `cls` (Ray titles them `ray::CLASS...`)."""
    import psutil

    pids = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith(f"ray::{cls}"):
            pids.append(proc.pid)
    assert pids, f"no Ray {cls} process found"
    return sorted(pids)


def folder_state(folder):
    return {f.name: f.stat().st_mtime_ns for f in sorted(folder.iterdir())}


# -- training ------------------------------------------------------------------------------------------------------
def test_training_on_the_cluster_matches_a_local_run_and_resumes(cluster, model, tok, tmp_path):
    items = documents(5) + [QAPairs("qa", [("w1 w2 w3", "w4 w5"), ("w6 w7", "w8 w9 w10")])]
    names = [item.name for item in items]
    local = train_adapters(model, tok, items, tmp_path / "local", FAST, progress=False)

    # a first run finishes three of them; the second finds those and trains only the rest
    first = train_on_ray(model, tok, items[:3], tmp_path / "ray", FAST, progress=False)
    assert (first.trained, first.cached, first.workers) == (3, 0, 2)
    before = {name: folder_state(tmp_path / "ray" / name) for name in names[:3]}
    (tmp_path / "ray" / ".doc4.tmp-killed").mkdir()  # what a killed write leaves: ignored
    # the same call as a local run, on the cluster (address True: the one this process is connected to)
    from loralag.cluster.train import train_adapters as train_on_cluster

    paths = train_on_cluster(model, tok, items, tmp_path / "ray", FAST, progress=False, address=True)

    assert [p.name for p in paths] == [p.name for p in local] == names
    assert {name: folder_state(tmp_path / "ray" / name) for name in names[:3]} == before  # never trained again
    assert_same_adapters(tmp_path / "ray", tmp_path / "local", names)
    again = train_on_ray(model, tok, items, tmp_path / "ray", FAST, progress=False)
    assert (again.trained, again.cached) == (0, len(items))


def test_grouped_training_on_the_cluster_matches_a_local_run(cluster, model, tok, tmp_path):
    items = documents(4)
    train_adapters(model, tok, items, tmp_path / "local", FAST, progress=False)
    run = train_on_ray(model, tok, items, tmp_path / "ray", FAST, progress=False, group_size=2)
    assert run.trained == 4
    assert_same_adapters(tmp_path / "ray", tmp_path / "local", [item.name for item in items])


def test_a_worker_killed_mid_run_loses_nothing(cluster, model, tok, tmp_path):
    items = documents(8, length=60)
    config = TrainConfig(steps=20)
    out = tmp_path / "ray"
    result, error = {}, []

    def drive():
        try:
            result["run"] = train_on_ray(model, tok, items, out, config, progress=False)
        except BaseException as exc:  # noqa: BLE001 - reported by the test below
            error.append(exc)

    driver = threading.Thread(target=drive)
    driver.start()
    deadline = time.monotonic() + 240
    while not (out.is_dir() and any(not p.name.startswith(".") for p in out.iterdir())):
        assert driver.is_alive() and time.monotonic() < deadline, error or "no adapter was written"
        time.sleep(0.02)
    finished_at_kill = sum(1 for p in out.iterdir() if not p.name.startswith("."))
    victim = worker_processes("TrainWorker")[0]  # as an operator would find it: Ray names its processes
    os.kill(victim, signal.SIGKILL)
    driver.join(timeout=300)
    assert not driver.is_alive() and not error, error
    run = result["run"]

    assert finished_at_kill < len(items)  # the kill came mid-run
    assert run.trained == len(items) and run.cached == 0
    # the killed worker's tasks ran again: on it, restarted (a new process), or on the other worker
    assert len(run.pids - {victim}) >= 2 or run.moved > 0
    train_adapters(model, tok, items, tmp_path / "local", config, progress=False)
    assert_same_adapters(out, tmp_path / "local", [item.name for item in items])


# -- the command line ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(model, tok, tmp_path_factory):
    """The tiny model as a folder `--model` loads."""
    folder = tmp_path_factory.mktemp("tiny-model")
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_cli_train_with_ray_matches_the_local_cli(cluster, model_dir, tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for item in documents(3):
        (docs / f"{item.name}.txt").write_text(item.text)
    local = invoke("train", tmp_path / "local", docs, "--model", model_dir, "--steps", 2)
    assert local.exit_code == 0, output(local)
    on_ray = invoke("train", tmp_path / "ray", docs, "--model", model_dir, "--steps", 2, "--ray")
    assert on_ray.exit_code == 0, output(on_ray)
    assert_same_adapters(tmp_path / "ray", tmp_path / "local", ["doc0", "doc1", "doc2"])


def test_ray_options_without_ray_say_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` fails as it does where Ray is not installed
    (tmp_path / "a.txt").write_text("w1 w2 w3")
    result = invoke("train", tmp_path / "out", tmp_path / "a.txt", "--ray")
    assert result.exit_code == 2
    assert 'pip install "loralag[ray]"' in output(result) and "Traceback" not in output(result)


def test_a_wrong_address_is_refused_in_one_line():
    from loralag.cluster.connect import _reachable
    from loralag.errors import LoralagError

    with pytest.raises(LoralagError, match="cannot connect to the Ray cluster at 127.0.0.1:1"):
        _reachable("127.0.0.1:1")
    with pytest.raises(LoralagError, match="not HOST:PORT"):
        _reachable("no-port")


# -- building a library --------------------------------------------------------------------------------------------
def test_build_with_ray_writes_the_library_a_local_build_writes(cluster, model_dir, tmp_path):
    from conftest import save_lora, tiny_llama

    from loralag.library.store import open_library

    base = tiny_llama()
    for i in range(7):  # mixed ranks and modules: pieces of a chunk meet modules in another order
        modules = ("q_proj", "v_proj") if i % 2 else ("q_proj", "o_proj")
        save_lora(base, tmp_path / "adapters" / f"a{i}", seed=i, r=2 + i % 3, target_modules=modules)
    local = invoke("build", tmp_path / "local", tmp_path / "adapters", "--model", model_dir, "--chunk-size", 3)
    assert local.exit_code == 0, output(local)
    on_ray = invoke("build", tmp_path / "ray", tmp_path / "adapters", "--model", model_dir, "--chunk-size", 3, "--ray")
    assert on_ray.exit_code == 0, output(on_ray)

    want, got = open_library(tmp_path / "local"), open_library(tmp_path / "ray")
    assert got.names == want.names and len(got) == 7
    strip = [{k: v for k, v in a.items() if k != "segment"} for a in want.adapters]
    assert [{k: v for k, v in a.items() if k != "segment"} for a in got.adapters] == strip
    assert len({a["segment"] for a in got.adapters}) == 3  # one segment per chunk, as locally
    for name in want.names:
        a, b = got.adapter_factors(name), want.adapter_factors(name)
        assert a.keys() == b.keys()
        for module in a:
            assert torch.equal(a[module][0], b[module][0]) and torch.equal(a[module][1], b[module][1]), name
    for module in want.target_modules:
        assert torch.equal(got.bank(module).arrows, want.bank(module).arrows)


# -- evaluation ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def eval_world(tmp_path_factory):
    """A tiny model folder with a word tokenizer, a library of three adapters, and an NQ file of nine questions."""
    from conftest import save_lora, tiny_llama
    from test_eval import kilt_rec, write_jsonl
    from tiny_text import WORDS as TEXT_WORDS
    from tiny_text import tiny_tokenizer

    from loralag.library.store import build_library, module_shapes

    tmp = tmp_path_factory.mktemp("eval-world")
    base = tiny_llama()
    base.save_pretrained(tmp / "model")
    tiny_tokenizer().save_pretrained(tmp / "model")
    for i in range(3):
        save_lora(base, tmp / "adapters" / f"a{i}", seed=i, target_modules=("q_proj", "v_proj", "up_proj"))
    build_library(tmp / "lib", [tmp / "adapters"], base_model="tiny", shapes=module_shapes(base), progress=False)
    questions = [" ".join(TEXT_WORDS[(3 * i + j) % len(TEXT_WORDS)] for j in range(2 + i % 4)) for i in range(9)]
    write_jsonl(tmp / "nq-dev-kilt.jsonl", [kilt_rec(f"q{i}", q, ["x"]) for i, q in enumerate(questions)])
    return tmp


def test_eval_with_ray_gives_the_local_predictions(cluster, eval_world, tmp_path):
    w = eval_world
    common = ("--model", w / "model", "--library", w / "lib", "--k", "2", "--batch-size", "2", "--no-chat")
    common += ("--max-new-tokens", "4")
    local = invoke("eval", w / "nq-dev-kilt.jsonl", *common, "--out", tmp_path / "local")
    assert local.exit_code == 0, output(local)
    on_ray = invoke("eval", w / "nq-dev-kilt.jsonl", *common, "--out", tmp_path / "ray", "--ray")
    assert on_ray.exit_code == 0, output(on_ray)
    want = (tmp_path / "local" / "nq-dev-kilt.jsonl").read_text()
    assert (tmp_path / "ray" / "nq-dev-kilt.jsonl").read_text() == want
    assert len({json.loads(line)["output"][0]["answer"] for line in want.splitlines()}) > 1  # not one answer for all
    assert (
        json.loads((tmp_path / "ray" / "scores.json").read_text())["scores"]
        == json.loads((tmp_path / "local" / "scores.json").read_text())["scores"]
    )


def test_answerer_spreads_one_dataset_over_the_workers(cluster, eval_world):
    """Spans of single batches, every worker used, the same answers as generate_predictions here."""
    from loralag.cluster.evaluate import RayAnswerer
    from loralag.evaluation import evaluate as ev
    from loralag.library.store import open_library
    from loralag.models import load_model
    from loralag.routing.state import attach, detach

    model, tokenizer = load_model(str(eval_world / "model"))
    [ds] = ev.load_datasets([eval_world / "nq-dev-kilt.jsonl"])
    libs = {"lib": open_library(eval_world / "lib")}
    options = dict(batch_size=2, max_new_tokens=4, chat=False)
    with RayAnswerer(model, tokenizer, libs, "lag", 2, address=True, workers=2, batches_per_task=1) as answerer:
        on_ray = answerer.generate_predictions(ds, **options)
        pids = set(ray.get([actor.pid.remote() for actor in answerer.pool.actors]))
    attach(model, libs, router="lag", k=2)
    try:
        local = ev.generate_predictions(model, tokenizer, ds, **options)
    finally:
        detach(model)
    assert on_ray == local and len(pids) == 2


def test_bench_shares_on_ray_answer_as_one_process(cluster, routed, lama_dir):  # noqa: F811
    """The LAMA bench's answer shares (every other batch of every method) as Ray tasks give exactly the answers,
    routing counts, served adapters and memo reuse of one in-process pass."""
    from test_lama_bench import assert_same_shares, share_job
    from tiny_text import tiny_tokenizer

    from loralag.experiments.lama.answering import answer_questions, bench_shares

    job, tok = share_job(routed, lama_dir), tiny_tokenizer()
    one = answer_questions(job, routed[0], tok, workers=1)
    two = answer_questions(job, routed[0], tok, workers=2, runner=bench_shares(True))
    assert_same_shares(one, two)


# -- serving -------------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_two_ray_serve_replicas_answer_as_the_local_server(cluster, eval_world):
    import socket

    import httpx
    from fastapi.testclient import TestClient
    from ray import serve

    from loralag.cluster import serve as ray_serve
    from loralag.library.store import open_library
    from loralag.models import load_model
    from loralag.serve.app import create_app

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    lib = eval_world / "lib"
    ray_serve.start(str(eval_world / "model"), [lib], 2, port=port, router="lag", k=2)
    try:
        status = serve.status().applications[ray_serve.DEPLOYMENT].deployments[ray_serve.DEPLOYMENT]
        assert status.replica_states.get("RUNNING") == 2
        prompts = ["the moon is", "who is the sun", "capital city of the red river", "tell me about the blue moon"]
        body = {"max_tokens": 4, "temperature": 0}
        got = [
            httpx.post(
                f"http://127.0.0.1:{port}/v1/completions",
                json={**body, "prompt": p, "model": str(eval_world / "model")},  # the spec: an alias of the model
                timeout=120,
            ).json()
            for p in prompts
        ]
        model, tok = load_model(str(eval_world / "model"))
        with TestClient(create_app(model, tok, [open_library(lib)], router="lag", k=2)) as local:
            name = local.get("/v1/models").json()["data"][0]["id"]
            want = [local.post("/v1/completions", json={**body, "prompt": p, "model": name}).json() for p in prompts]
        assert all("choices" in r for r in got + want), (got, want)
        assert [r["choices"][0]["text"] for r in got] == [r["choices"][0]["text"] for r in want]
        assert len({r["choices"][0]["text"] for r in want}) > 1
    finally:
        ray_serve.stop()
