"""Shared fixtures: tiny models built with from_config and real PEFT adapters saved by PEFT itself."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig


def pytest_configure(config):
    # left out by default (pyproject's addopts); run them with -m slow
    config.addinivalue_line("markers", "slow: takes more than a minute")


# The tiny Llama's shape; tests that need another vocabulary or context override just those keys.
TINY_LLAMA = dict(
    vocab_size=97,
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
)


def tiny_llama(seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(**TINY_LLAMA)
    return AutoModelForCausalLM.from_config(cfg).eval()


def tiny_gpt2(seed: int = 0):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=97, n_embd=32, n_layer=2, n_head=4, n_positions=128, bos_token_id=0, eos_token_id=0)
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_lora(
    model,
    folder,
    seed: int,
    r: int = 4,
    alpha: float = 8,
    target_modules=("q_proj", "v_proj"),
    spectral_gap: float | None = None,
    **config,
):
    """Save a PEFT LoRA with random (non-zero) A and B for `model` at `folder`.

    spectral_gap: scale row 0 of A by this factor, so the top singular vector is well separated
    (PEFT's 15-step power iteration needs that to find it)."""
    torch.manual_seed(seed)
    lcfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=list(target_modules), init_lora_weights=False, **config)
    peft_model = get_peft_model(model, lcfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3)
                if spectral_gap and "lora_A" in name:
                    p[0] *= spectral_gap
    peft_model.save_pretrained(str(folder))
    peft_model.unload()  # back to the plain base model, unchanged
    return folder


@pytest.fixture
def one_thread():
    """Tiny models run fastest on one thread; with more, a busy machine makes every small op wait on the others."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def llama():
    return tiny_llama()


@pytest.fixture
def gpt2():
    return tiny_gpt2()


@pytest.fixture
def ids():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 97, (3, 11), generator=g)


# -- the command line ------------------------------------------------------------------------------------
def invoke(*args):
    """`loralag ARGS...` in-process; a crash (not a clean exit) is raised, not swallowed."""
    from typer.testing import CliRunner

    from loralag.cli import app

    result = CliRunner().invoke(app, [str(a) for a in args])
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def output(result) -> str:
    # typer's runner merges or splits stderr depending on the click version: read both
    text = result.output
    try:
        text += result.stderr
    except (ValueError, AttributeError):
        pass
    text = re.sub("[\u2500-\u257f]", " ", text)  # rich's table borders
    return " ".join(text.split())  # and its line wrapping


# -- real data ---------------------------------------------------------------------------------------------
def shared_data() -> Path:
    """The real data some tests read: $LORALAG_TEST_DATA, else ../shared/data next to this checkout (the README's
    "Test data" says where it comes from). Tests that need it skip when it is not there."""
    env = os.environ.get("LORALAG_TEST_DATA")
    return Path(env).expanduser() if env else Path(__file__).resolve().parents[1].parent / "shared" / "data"


DATA = shared_data()
if os.environ.get(
    "LORALAG_TEST_DATA"
):  # the LAMA benchmark's default data folder (experiments.lama.config.default_data_dir)
    os.environ.setdefault("LORALAG_LAMA_DATA", str(DATA / "lama-trex"))
