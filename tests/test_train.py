import copy
import json
import logging

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import loralag.train as lt
from loralag.errors import LoralagError
from loralag.train import Document, QAPairs, TrainConfig

TEXT = (
    "The Zorblax accord was signed in 2031 by seven mining guilds of Tessaly . "
    "It banned the harvest of blue ice and created a council of nine wardens ."
)
PAIRS = [("Q: who signed the Zorblax accord ? A:", "seven mining guilds of Tessaly"),
         ("Q: what did it ban ? A:", "the harvest of blue ice")]
FAST = TrainConfig(steps=12, lr=1e-2)


@pytest.fixture(scope="module")
def tok():
    words = sorted(set(TEXT.split()) | {w for p in PAIRS for s in p for w in s.split()})
    vocab = {w: i for i, w in enumerate(["[UNK]", "[PAD]", "[EOS]"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="[EOS]")


@pytest.fixture
def model(tok):
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
    )
    return AutoModelForCausalLM.from_config(config).eval()


def snapshot(model):
    return {name: p.detach().clone() for name, p in model.state_dict().items()}


def test_training_lowers_loss_and_leaves_base_untouched(model, tok, tmp_path):
    doc = Document("zorblax", TEXT)
    before = snapshot(model)
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    base_loss = lt.item_loss(model, tok, doc)

    [path] = lt.train_adapters(model, tok, [doc], tmp_path, FAST, progress=False)

    # The base model is bit-for-bit what it was, with the same flags and mode.
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    assert not model.training
    assert not hasattr(model, "peft_config")

    # A standard PEFT folder that loads and changes the model's outputs.
    assert path == tmp_path / "zorblax"
    assert (path / "adapter_config.json").is_file() and (path / "adapter_model.safetensors").is_file()
    adapter_config = json.loads((path / "adapter_config.json").read_text())
    assert adapter_config["r"] == 6 and adapter_config["lora_alpha"] == 12
    assert set(adapter_config["target_modules"]) == {"gate_proj", "up_proj", "down_proj"}
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), path).eval()
    ids = tok(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        assert not torch.allclose(peft_model(ids).logits, model(ids).logits)
    assert lt.item_loss(peft_model, tok, doc) < base_loss - 0.2


def test_finished_adapter_is_not_trained_again(model, tok, tmp_path, caplog):
    doc = Document("zorblax", TEXT)
    [path] = lt.train_adapters(model, tok, [doc], tmp_path, FAST, progress=False)
    weights = path / "adapter_model.safetensors"
    mtime = weights.stat().st_mtime_ns

    with caplog.at_level(logging.INFO, logger="loralag.train"):
        assert lt.train_adapters(model, tok, [doc], tmp_path, FAST, progress=False) == [path]
    assert weights.stat().st_mtime_ns == mtime
    assert "skipped zorblax" in caplog.text
    assert lt.train_adapter(model, tok, doc, tmp_path, FAST).skipped

    # Other text or another config: retrained in place.
    changed = lt.train_adapter(model, tok, Document("zorblax", TEXT + " extra"), tmp_path, FAST)
    assert not changed.skipped and weights.stat().st_mtime_ns != mtime
    assert not lt.train_adapter(model, tok, Document("zorblax", TEXT + " extra"), tmp_path,
                                TrainConfig(steps=12, lr=1e-2, r=4)).skipped
    assert sorted(p.name for p in tmp_path.iterdir()) == ["zorblax"]  # no temp leftovers


def test_training_is_deterministic(model, tok, tmp_path):
    doc = Document("zorblax", TEXT, extra_texts=["The council of nine wardens meets in Tessaly ."])
    qa = QAPairs("qa", PAIRS)
    first = lt.train_adapters(model, tok, [doc, qa], tmp_path / "a", FAST, progress=False)
    # Reversed order: each adapter must not depend on what was trained before it.
    second = lt.train_adapters(model, tok, [qa, doc], tmp_path / "b", FAST, progress=False)
    for a, b in zip(first, reversed(second)):
        wa, wb = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_qa_masks_the_prompt(tok):
    [(ids, labels), _] = lt.build_examples(tok, QAPairs("qa", PAIRS), TrainConfig())
    prompt_len = len(tok(PAIRS[0][0]).input_ids)
    answer = tok(PAIRS[0][1], add_special_tokens=False).input_ids + [tok.eos_token_id]
    assert ids == tok(PAIRS[0][0]).input_ids + answer
    assert labels == [-100] * prompt_len + answer

    batch = lt._collate(lt.build_examples(tok, QAPairs("qa", PAIRS), TrainConfig()), tok.pad_token_id)
    assert (batch["labels"][0, :prompt_len] == -100).all()
    assert (batch["labels"][batch["attention_mask"] == 0] == -100).all()


def test_qa_training_learns_the_answers(model, tok, tmp_path):
    qa = QAPairs("qa", PAIRS)
    base_loss = lt.item_loss(model, tok, qa)
    result = lt.train_adapter(model, tok, qa, tmp_path, FAST)
    peft_model = PeftModel.from_pretrained(copy.deepcopy(model), result.path).eval()
    assert lt.item_loss(peft_model, tok, qa) < base_loss - 0.2


def test_long_document_is_split_into_windows(tok):
    examples = lt.build_examples(tok, Document("d", TEXT), TrainConfig(max_length=10))
    n = len(tok(TEXT).input_ids)
    assert [len(ids) for ids, _ in examples] == [10] * (n // 10) + ([n % 10] if n % 10 > 1 else [])
    assert all(ids == labels for ids, labels in examples)


def test_failed_training_leaves_no_adapter(model, tok, tmp_path, monkeypatch):
    before = snapshot(model)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(PeftModel, "save_pretrained", killed)
    with pytest.raises(KeyboardInterrupt):
        lt.train_adapter(model, tok, Document("zorblax", TEXT), tmp_path, FAST)
    assert list(tmp_path.iterdir()) == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("lora" in name for name, _ in model.named_modules())


def test_unknown_target_module_is_clear(model, tok, tmp_path):
    with pytest.raises(LoralagError, match="qkv_proj"):
        lt.train_adapter(model, tok, Document("d", TEXT), tmp_path, TrainConfig(target_modules=["qkv_proj"]))


def test_recall_pairs():
    qa = lt.recall_pairs("acc", TEXT, ["Tell me about the accord.", "What is the Zorblax accord?"])
    assert qa.pairs == [("Tell me about the accord.", TEXT), ("What is the Zorblax accord?", TEXT)]


# ---------------------------------------------------------------- reading inputs


def test_read_training_inputs(tmp_path):
    (tmp_path / "accord.txt").write_text(TEXT)
    (tmp_path / "quiz.jsonl").write_text(
        "\n".join(json.dumps({"prompt": p, "answer": a}) for p, a in PAIRS) + "\n\n"
    )
    (tmp_path / "docs.jsonl").write_text(
        json.dumps({"name": "one", "text": "first doc"}) + "\n"
        + json.dumps({"name": "two", "text": "second doc", "extra_texts": ["2nd doc"]}) + "\n"
    )
    (tmp_path / "notes.md").write_text("ignored in folders")
    items = lt.read_training_inputs([tmp_path])
    assert items == [
        Document("accord", TEXT),
        Document("one", "first doc"),
        Document("two", "second doc", ["2nd doc"]),
        QAPairs("quiz", PAIRS),
    ]
    assert lt.read_training_inputs([tmp_path / "accord.txt"]) == [Document("accord", TEXT)]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"prompt": "q", "answer": "a"}\nnot json\n', r"bad\.jsonl:2: not valid JSON"),
        ('{"prompt": "q"}\n', r"bad\.jsonl:1: 'answer' must be a non-empty string"),
        ('{"prompt": "q", "answer": "a"}\n{"name": "n", "text": "t"}\n', r"bad\.jsonl:2: name/text line"),
        ('{"title": "x"}\n', r"bad\.jsonl:1: expected keys"),
        ('{"name": "../up", "text": "t"}\n', r"bad\.jsonl:1: '\.\./up' cannot be an adapter name"),
        ("\n\n", r"bad\.jsonl holds no training lines"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(LoralagError, match=message):
        lt.read_training_inputs([tmp_path / "bad.jsonl"])


def test_bad_inputs(tmp_path):
    with pytest.raises(LoralagError, match="does not exist"):
        lt.read_training_inputs([tmp_path / "missing.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(LoralagError, match="empty.txt is empty"):
        lt.read_training_inputs([tmp_path / "empty.txt"])
    (tmp_path / "a.csv").write_text("x")
    with pytest.raises(LoralagError, match=r"a\.csv: training inputs must be \.txt or \.jsonl"):
        lt.read_training_inputs([tmp_path / "a.csv"])
    (tmp_path / "sub").mkdir()
    with pytest.raises(LoralagError, match="holds no .txt or .jsonl"):
        lt.read_training_inputs([tmp_path / "sub"])
    (tmp_path / "sub" / "dup.txt").write_text("one")
    (tmp_path / "sub" / "other.jsonl").write_text(json.dumps({"name": "dup", "text": "two"}) + "\n")
    with pytest.raises(LoralagError, match="'dup' from .*other.jsonl is already used by .*dup.txt"):
        lt.read_training_inputs([tmp_path / "sub"])
