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

from conftest import invoke, output  # noqa: E402

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
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
    )
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
    # the same call as a local run, with ray= (True: the cluster this process is connected to)
    paths = train_adapters(model, tok, items, tmp_path / "ray", FAST, progress=False, ray=True)

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
