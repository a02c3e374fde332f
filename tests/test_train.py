import copy
import json
import logging
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

import loralag.training.train as lt
from loralag.errors import LoralagError
from loralag.training.train import Document, QAPairs, TrainConfig

TEXT = (
    "The Zorblax accord was signed in 2031 by seven mining guilds of Tessaly . "
    "It banned the harvest of blue ice and created a council of nine wardens ."
)
PAIRS = [
    ("Q: who signed the Zorblax accord ? A:", "seven mining guilds of Tessaly"),
    ("Q: what did it ban ? A:", "the harvest of blue ice"),
]
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
        vocab_size=len(tok),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
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

    with caplog.at_level(logging.INFO, logger="loralag.training.train"):
        assert lt.train_adapters(model, tok, [doc], tmp_path, FAST, progress=False) == [path]
    assert weights.stat().st_mtime_ns == mtime
    assert "skipped zorblax" in caplog.text
    assert lt.train_adapter(model, tok, doc, tmp_path, FAST).skipped

    # Other text or another config: retrained in place.
    changed = lt.train_adapter(model, tok, Document("zorblax", TEXT + " extra"), tmp_path, FAST)
    assert not changed.skipped and weights.stat().st_mtime_ns != mtime
    assert not lt.train_adapter(
        model, tok, Document("zorblax", TEXT + " extra"), tmp_path, TrainConfig(steps=12, lr=1e-2, r=4)
    ).skipped
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
    (tmp_path / "quiz.jsonl").write_text("\n".join(json.dumps({"prompt": p, "answer": a}) for p, a in PAIRS) + "\n\n")
    (tmp_path / "docs.jsonl").write_text(
        json.dumps({"name": "one", "text": "first doc"})
        + "\n"
        + json.dumps({"name": "two", "text": "second doc", "extra_texts": ["2nd doc"]})
        + "\n"
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
    (tmp_path / "checks.jsonl").write_text(
        json.dumps({"prompt": "p1", "answer": "a1", "under": "ads/k"})
        + "\n"
        + json.dumps({"prompt": "p2", "answer": "a2"})
        + "\n"
    )
    [checks] = lt.read_training_inputs([tmp_path / "checks.jsonl"])
    assert checks == QAPairs("checks", [("p1", "a1"), ("p2", "a2")], [str(tmp_path / "ads" / "k"), None])


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


# ---------------------------------------------------------------- grouped training

# batch 2 < 5 examples: the queue path too. Grouped rows are padded wider than alone, which changes
# float rounding in attention; Adam turns that into up to ~lr * 1e-3 on weights whose gradient is
# near 0 (|g| ~ eps), so a moderate lr keeps the comparison well inside 1e-5.
GROUP_CFG = TrainConfig(steps=8, lr=5e-3, batch_size=2)


def group_items():
    """Items of different kinds, example counts (1, 2, 5, 1, 1) and lengths."""
    return [
        Document("accord", TEXT),
        QAPairs("quiz", PAIRS),
        Document(
            "council",
            "The council of nine wardens meets in Tessaly .",
            extra_texts=[
                "nine wardens",
                "The council banned the harvest of blue ice in 2031 .",
                "It was signed by seven mining guilds .",
                "blue ice of Tessaly",
            ],
        ),
        Document("guilds", "seven mining guilds"),
        QAPairs("ban", [PAIRS[1]]),
    ]


def weights(path):
    return load_file(path / "adapter_model.safetensors")


def module_types(model):
    return [(name, type(m)) for name, m in model.named_modules()]


def test_grouped_training_equals_one_at_a_time(model, tok, tmp_path, one_thread):
    items = group_items()
    single = lt.train_adapters(model, tok, items, tmp_path / "single", GROUP_CFG, progress=False)
    grouped = lt.train_adapters(model, tok, items, tmp_path / "grouped", GROUP_CFG, progress=False, group_size=3)
    assert [p.name for p in grouped] == [item.name for item in items]
    ids = tok(TEXT, return_tensors="pt").input_ids
    for a, b in zip(single, grouped):
        assert sorted(f.name for f in a.iterdir()) == sorted(f.name for f in b.iterdir())
        assert json.loads((a / "adapter_config.json").read_text()) == json.loads(
            (b / "adapter_config.json").read_text()
        )
        wa, wb = weights(a), weights(b)
        assert wa.keys() == wb.keys() and len(wa) == 2 * 3 * 2  # A and B, 3 targets, 2 layers, PEFT's key names
        assert any(wa[k].abs().max() > 0.01 for k in wa if "lora_B" in k)  # trained, not the zero init
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0)
        ma, mb = lt._read_marker(a), lt._read_marker(b)
        assert ma["key"] == mb["key"] and ma["examples"] == mb["examples"] and ma["config"] == mb["config"]
        assert mb["final_loss"] < mb["first_loss"]
        assert mb["first_loss"] == pytest.approx(ma["first_loss"], abs=1e-5)
        assert mb["final_loss"] == pytest.approx(ma["final_loss"], abs=1e-4)
        with torch.no_grad():
            la = PeftModel.from_pretrained(copy.deepcopy(model), a).eval()(ids).logits
            lb = PeftModel.from_pretrained(copy.deepcopy(model), b).eval()(ids).logits
        torch.testing.assert_close(lb, la, atol=1e-5, rtol=0)


def test_grouped_init_is_peft_init(model, tok, one_thread):
    cfg = TrainConfig(seed=3)
    seed = lt.adapter_seed(3, "accord")
    init = lt._lora_init(model, cfg, seed)
    assert lt._grouping_blocker_peft(model, cfg) is None and len(init) == 6
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        peft_model = get_peft_model(copy.deepcopy(model), lt._lora_config(model, cfg))
    for name, (A, B, scale) in init.items():
        layer = peft_model.base_model.model.get_submodule(name)
        assert torch.equal(A, layer.lora_A["default"].weight) and not B.any()
        assert scale == layer.scaling["default"] == 12 / 6


def test_each_adapter_starts_from_its_own_init(model, tok, tmp_path):
    """Distinct inits: the seed comes from the base seed and the adapter's name, so two documents start from
    different A (0 steps: the saved adapter is PEFT's init), the same name from the same A whatever the base
    seed's other adapters, and the marker records the seed."""
    cfg = TrainConfig(steps=0)
    a, b = lt.train_adapters(
        model, tok, [Document("accord", TEXT), Document("council", TEXT)], tmp_path / "x", cfg, progress=False
    )
    wa, wb = weights(a), weights(b)
    key = next(k for k in wa if "lora_A" in k)
    assert not torch.allclose(wa[key], wb[key])  # same text, other names: other inits
    assert lt._read_marker(a)["seed"] == lt.adapter_seed(0, "accord") != lt.adapter_seed(0, "council")
    [again] = lt.train_adapters(model, tok, [Document("accord", "other text")], tmp_path / "y", cfg, progress=False)
    assert all(torch.equal(wa[k], weights(again)[k]) for k in wa)  # the init depends on the name, not the text
    [other_base] = lt.train_adapters(
        model, tok, [Document("accord", TEXT)], tmp_path / "z", TrainConfig(steps=0, seed=1), progress=False
    )
    assert not torch.allclose(wa[key], weights(other_base)[key])
    assert lt.adapter_seed(0, "accord") == lt.adapter_seed(0, "accord") and 0 <= lt.adapter_seed(7, "x") < 2**63
    shared = lt.train_adapters(
        model,
        tok,
        [Document("accord", TEXT), Document("council", TEXT)],
        tmp_path / "s",
        TrainConfig(steps=0, shared_init=True),
        progress=False,
    )
    assert torch.equal(weights(shared[0])[key], weights(shared[1])[key])  # the old way: one init for all


def test_grouped_cache_skips_finished_adapters(model, tok, tmp_path, monkeypatch, caplog, capsys, one_thread):
    items = group_items()[:4]
    done = lt.train_adapters(model, tok, items[:2], tmp_path, GROUP_CFG, progress=False)  # one at a time
    mtimes = {p.name: (p / "adapter_model.safetensors").stat().st_mtime_ns for p in done}
    trained_groups, singles = [], []
    train_group, train_into = lt._train_group, lt._train_into
    monkeypatch.setattr(
        lt,
        "_train_group",
        lambda model, group, *a: (
            trained_groups.append(sorted(job.name for job in group)),
            train_group(model, group, *a),
        )[1],
    )
    monkeypatch.setattr(lt, "_train_into", lambda *a: (singles.append(a), train_into(*a))[1])

    with caplog.at_level(logging.INFO, logger="loralag.training.train"):
        paths = lt.train_adapters(model, tok, items, tmp_path, GROUP_CFG, progress=True, group_size=3)
    assert paths == [tmp_path / item.name for item in items]
    assert trained_groups == [["council", "guilds"]] and singles == []  # only the two missing ones, as one group
    assert "skipped accord" in caplog.text and "skipped quiz" in caplog.text
    assert {n: (tmp_path / n / "adapter_model.safetensors").stat().st_mtime_ns for n in mtimes} == mtimes
    assert "4/4" in capsys.readouterr().err  # the bar reached every adapter

    # Grouped output is up to date for one-at-a-time training and for grouped training again.
    assert all(lt.train_adapter(model, tok, item, tmp_path, GROUP_CFG).skipped for item in items)
    lt.train_adapters(model, tok, items, tmp_path, GROUP_CFG, progress=False, group_size=2)
    assert trained_groups == [["council", "guilds"]] and singles == []

    # A changed item is retrained; a lone leftover goes the one-at-a-time way.
    changed = [*items[:3], Document("guilds", "seven mining guilds of Tessaly")]
    lt.train_adapters(model, tok, changed, tmp_path, GROUP_CFG, progress=False, group_size=3)
    assert trained_groups == [["council", "guilds"]] and len(singles) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(item.name for item in items)  # no temp leftovers


@pytest.mark.parametrize("fail_in", ["training", "saving"])
def test_grouped_training_leaves_base_untouched(model, tok, tmp_path, monkeypatch, one_thread, fail_in):
    before, types = snapshot(model), module_types(model)
    model.get_submodule("model.embed_tokens").weight.requires_grad_(False)  # a flag to keep as it was
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    items = group_items()[:3]

    def unchanged():
        after = model.state_dict()
        assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
        assert module_types(model) == types  # no wrapper or LoRA layer left
        assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
        assert not model.training and not hasattr(model, "peft_config")

    lt.train_adapters(model, tok, items, tmp_path / "ok", GROUP_CFG, progress=False, group_size=3)
    unchanged()

    calls = []

    def killed(*args, **kwargs):
        calls.append(1)
        if fail_in == "saving" or len(calls) == 3:
            raise KeyboardInterrupt
        return clip(*args, **kwargs)

    clip = lt._clip_per_adapter
    monkeypatch.setattr(
        *((lt, "_clip_per_adapter") if fail_in == "training" else (PeftModel, "save_pretrained")), killed
    )
    (tmp_path / "killed").mkdir()
    with pytest.raises(KeyboardInterrupt):
        lt.train_adapters(model, tok, items, tmp_path / "killed", GROUP_CFG, progress=False, group_size=3)
    unchanged()
    assert list((tmp_path / "killed").iterdir()) == []  # no adapter, no temp folder


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "2"])
def test_bad_group_size(model, tok, tmp_path, bad):
    with pytest.raises(LoralagError, match="group_size must be a positive integer"):
        lt.train_adapters(model, tok, [Document("d", TEXT)], tmp_path, FAST, progress=False, group_size=bad)
    assert list(tmp_path.iterdir()) == []


def test_dropout_falls_back_to_one_at_a_time(model, tok, tmp_path, monkeypatch, caplog, one_thread):
    monkeypatch.setattr(lt, "_train_group", lambda *a: pytest.fail("grouped training despite dropout"))
    cfg = TrainConfig(steps=2, dropout=0.1)
    with caplog.at_level(logging.WARNING, logger="loralag.training.train"):
        paths = lt.train_adapters(model, tok, group_items()[:2], tmp_path, cfg, progress=False, group_size=2)
    assert "one at a time" in caplog.text and "dropout" in caplog.text
    assert all((p / "adapter_model.safetensors").is_file() for p in paths)


# ---------------------------------------------------------------- training under frozen adapters
UNDER_CFG = TrainConfig(
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj"], r=4, alpha=8, steps=4, lr=1e-2, batch_size=2
)
KNOWLEDGE = ("gate_proj", "up_proj", "down_proj")


def merged(model, folder):
    """An independent reference: the base model with a frozen adapter merged into its weights by PEFT."""
    return PeftModel.from_pretrained(copy.deepcopy(model), folder).merge_and_unload().eval()


def trains_like_merged(model, tok, tmp_path, item, know, atol):
    """Train `item` (under `know` somehow) and the same pairs on `know` merged: the same adapter and first loss,
    and another first loss without `know` (it really acted). Returns the item's adapter and the plain one."""
    [under] = lt.train_adapters(model, tok, [item], tmp_path / "u", UNDER_CFG, progress=False)
    [ref] = lt.train_adapters(
        merged(model, know), tok, [QAPairs("task", PAIRS)], tmp_path / "r", UNDER_CFG, progress=False
    )
    wu, wr = weights(under), weights(ref)
    assert wu.keys() == wr.keys() and any(wr[k].abs().max() > 0.01 for k in wr if "lora_B" in k)
    for k in wr:
        torch.testing.assert_close(wu[k], wr[k], atol=atol, rtol=0)
    first = lt._read_marker(under)["first_loss"]
    assert first == pytest.approx(lt._read_marker(ref)["first_loss"], abs=1e-5)
    [plain] = lt.train_adapters(model, tok, [QAPairs("task", PAIRS)], tmp_path / "p", UNDER_CFG, progress=False)
    assert abs(lt._read_marker(plain)["first_loss"] - first) > 1e-3
    return under, plain


def row_loss_sum(model, tok, prompt, answer):
    """HF's loss summed (not averaged) over one QA example's answer tokens, as training builds it."""
    ids, labels = lt.build_examples(tok, QAPairs("x", [(prompt, answer)]), UNDER_CFG)[0]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, :-1]
    target = torch.tensor(labels[1:])
    keep = target != -100
    return torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item(), int(keep.sum())


def test_training_under_a_frozen_adapter_equals_training_on_it_merged(model, tok, tmp_path, one_thread):
    from conftest import save_lora

    know = save_lora(model, tmp_path / "know", seed=5, r=3, alpha=30, target_modules=KNOWLEDGE)
    before, types = snapshot(model), module_types(model)
    trains_like_merged(model, tok, tmp_path, QAPairs("task", PAIRS, under=[know, know]), know, atol=1e-5)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before) and module_types(model) == types


def test_each_row_trains_under_its_own_adapter(model, tok, tmp_path, one_thread):
    from conftest import save_lora

    k1 = save_lora(model, tmp_path / "k1", seed=1, r=3, alpha=30, target_modules=KNOWLEDGE)
    k2 = save_lora(model, tmp_path / "k2", seed=2, r=2, alpha=20, target_modules=("up_proj",))  # other rank, one module
    pairs = [*PAIRS, ("Q: when was it signed ? A:", "in 2031")]
    cfg = TrainConfig(**{**asdict(UNDER_CFG), "batch_size": 3})  # one batch holds every row: first_loss covers all
    [path] = lt.train_adapters(
        model, tok, [QAPairs("task", pairs, under=[k1, None, k2])], tmp_path / "t", cfg, progress=False
    )
    # PEFT starts B at zero, so the first loss is the frozen adapters' alone: each row's through its own merge
    rows = [row_loss_sum(m, tok, *pair) for m, pair in zip([merged(model, k1), model, merged(model, k2)], pairs)]
    expected = sum(s for s, _ in rows) / sum(n for _, n in rows)
    assert lt._read_marker(path)["first_loss"] == pytest.approx(expected, abs=1e-5)


def test_under_is_part_of_the_cache_key(model, tok, tmp_path, caplog, one_thread):
    from conftest import save_lora

    know = save_lora(model, tmp_path / "know", seed=5, r=3, target_modules=KNOWLEDGE)
    item = QAPairs("task", PAIRS, under=[know, None])
    [path] = lt.train_adapters(model, tok, [item], tmp_path / "out", UNDER_CFG, progress=False)
    assert lt.train_adapter(model, tok, item, tmp_path / "out", UNDER_CFG).skipped
    assert not lt.train_adapter(model, tok, QAPairs("task", PAIRS), tmp_path / "out", UNDER_CFG).skipped
    lt.train_adapter(model, tok, item, tmp_path / "out", UNDER_CFG)
    save_lora(model, know, seed=6, r=3, target_modules=KNOWLEDGE)  # same folder, other weights: retrain
    assert not lt.train_adapter(model, tok, item, tmp_path / "out", UNDER_CFG).skipped
    # grouped training trains items with frozen adapters one at a time
    with caplog.at_level(logging.WARNING, logger="loralag.training.train"):
        lt.train_adapters(
            model,
            tok,
            [QAPairs("a", PAIRS, under=[know, know]), QAPairs("b", PAIRS)],
            tmp_path / "g",
            UNDER_CFG,
            progress=False,
            group_size=2,
        )
    assert "frozen adapters" in caplog.text


def test_bad_under(model, tok, tmp_path):
    from conftest import save_lora

    know = save_lora(model, tmp_path / "know", seed=5, target_modules=KNOWLEDGE)
    attn = save_lora(model, tmp_path / "attn", seed=5, target_modules=("q_proj",))
    cases = [
        (QAPairs("t", PAIRS, under=[know]), "names 1 adapters for 2 pairs"),
        (QAPairs("t", PAIRS, under=[attn, None]), r"target \['q_proj'\], which the adapter being trained"),
        (QAPairs("t", PAIRS, under=[tmp_path / "missing", None]), "missing is not a folder"),
    ]
    for item, message in cases:
        with pytest.raises(LoralagError, match=message):
            lt.train_adapters(model, tok, [item], tmp_path / "out", UNDER_CFG, progress=False)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_workers_train_the_same_adapters_as_one_process(model, tok, tmp_path, one_thread):
    items = group_items()
    single = lt.train_adapters(model, tok, items, tmp_path / "single", GROUP_CFG, progress=False)
    (tmp_path / "workers").mkdir()
    lt.train_adapters(model, tok, items[:1], tmp_path / "workers", GROUP_CFG, progress=False)  # already there
    kept = (tmp_path / "workers" / items[0].name / lt.MARKER_FILE).stat().st_mtime_ns
    torch.set_num_threads(2)  # each of the 2 workers gets 1 thread, as the one-process run had
    paths = lt.train_adapters(model, tok, items, tmp_path / "workers", GROUP_CFG, progress=False, workers=2)
    assert [p.name for p in paths] == [item.name for item in items]
    assert (paths[0] / lt.MARKER_FILE).stat().st_mtime_ns == kept  # up to date: not trained again
    for a, b in zip(single, paths):
        wa, wb = weights(a), weights(b)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=0, rtol=0)
        assert lt._read_marker(a)["key"] == lt._read_marker(b)["key"]
    assert sorted(p.name for p in (tmp_path / "workers").iterdir()) == sorted(item.name for item in items)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_workers(model, tok, tmp_path, bad):
    with pytest.raises(LoralagError, match="workers must be a positive integer"):
        lt.train_adapters(model, tok, [Document("d", TEXT)], tmp_path, FAST, progress=False, workers=bad)
    with pytest.raises(LoralagError, match="choose one"):
        lt.train_adapters(model, tok, [Document("d", TEXT)], tmp_path, FAST, progress=False, workers=2, group_size=2)
    assert list(tmp_path.iterdir()) == []


def test_loss_over_the_learned_positions_is_hfs_loss(model, tok):
    # pairs learn only their answers, a document every token: the union of learned positions differs per row
    config = TrainConfig()
    examples = [ex for item in group_items() for ex in lt.build_examples(tok, item, config)]
    batch = lt._collate(examples, lt._pad_id(tok))
    logits, targets = lt._learned_logits(model, model, batch)
    assert logits.shape[1] < batch["input_ids"].shape[1]  # the LM head skipped positions nothing learns from
    ours = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )
    hf = model(**batch).loss
    torch.testing.assert_close(ours, hf, atol=1e-6, rtol=1e-6)


def _inputs_alone(model, examples, targets):
    """Reference: every target Linear's inputs, each example run alone (no padding), stacked."""
    seen: dict[str, list] = {}
    hooks = [
        m.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(a[0][0].double()))
        for name, m in model.named_modules()
        if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] in targets
    ]
    with torch.no_grad():
        for ids, _ in examples:
            model(input_ids=torch.tensor([ids]))
    for h in hooks:
        h.remove()
    return {name: torch.cat(xs).numpy() for name, xs in seen.items()}


def test_activation_rows_span_the_items_own_inputs(model, tok):
    import numpy as np

    from loralag.training.activation_init import activation_rows

    config = TrainConfig(r=3, batch_size=3)
    examples = [ex for item in group_items() for ex in lt.build_examples(tok, item, config)]
    targets = ["q_proj", "k_proj", "down_proj"]  # q and k read one tensor: kept and decomposed once
    rows = activation_rows(model, examples, targets, 3, lt._pad_id(tok), batch_size=3)  # padded
    ref = _inputs_alone(model, examples, targets)
    assert rows.keys() == ref.keys() and len(rows) == 6
    for name, x in ref.items():
        v = np.linalg.svd(x, full_matrices=False)[2][:3]
        ours = rows[name].double().numpy()
        np.testing.assert_allclose(np.abs(ours @ v.T), np.eye(3), atol=1e-4)  # the same directions, in order
        assert (ours[np.arange(3), np.abs(ours).argmax(1)] > 0).all()  # signed: largest entry positive


def test_activations_init_starts_from_the_base_model_and_trains(model, tok, tmp_path, one_thread):
    from loralag.training.activation_init import activation_rows

    config = replace(GROUP_CFG, init="activations")
    item = group_items()[0]
    examples = lt.build_examples(tok, item, config)
    init = lt._lora_init(model, config, lt.adapter_seed(0, item.name), examples, lt._pad_id(tok))
    peft_rows = lt._lora_init(model, GROUP_CFG, lt.adapter_seed(0, item.name))
    rows = activation_rows(model, examples, GROUP_CFG.target_modules, GROUP_CFG.r, lt._pad_id(tok), 4)
    for name, (A, B, _) in init.items():
        norm = peft_rows[name][0].norm(dim=1).mean()
        torch.testing.assert_close(A, rows[name] * norm)
        assert B.abs().max() == 0  # the model starts as the base model
    grouped = lt.train_adapters(model, tok, group_items(), tmp_path / "g", config, progress=False, group_size=2)
    single = lt.train_adapters(model, tok, group_items(), tmp_path / "s", config, progress=False)
    peft = lt.train_adapters(model, tok, group_items()[:1], tmp_path / "p", GROUP_CFG, progress=False)
    for a, b in zip(single, grouped):
        wa, wb = weights(a), weights(b)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0)
        assert lt._read_marker(a)["final_loss"] < lt._read_marker(a)["first_loss"]
    assert lt._read_marker(single[0])["key"] != lt._read_marker(peft[0])["key"]  # another init, another adapter
    assert lt._read_marker(single[0])["config"]["init"] == "activations"


def test_freeze_a_trains_b_alone_from_the_init(model, tok, tmp_path, one_thread):
    """freeze_a: every saved A is its init's, tensor for tensor (one at a time and grouped alike), B is trained
    and the loss falls; the key differs from the trained-A adapter's, and the default keeps earlier keys."""
    config = replace(GROUP_CFG, init="contrast", freeze_a=True)
    items = group_items()
    single = lt.train_adapters(model, tok, items, tmp_path / "s", config, progress=False)
    grouped = lt.train_adapters(model, tok, items, tmp_path / "g", config, progress=False, group_size=3)
    moved = lt.train_adapters(model, tok, items[:1], tmp_path / "m", replace(config, freeze_a=False), progress=False)
    for item, a, b in zip(items, single, grouped):
        examples = lt.build_examples(tok, item, config)
        init = lt._lora_init(model, config, lt.adapter_seed(0, item.name), examples, lt._pad_id(tok))
        wa, wb = weights(a), weights(b)
        for name, (A, _, _) in init.items():
            [key] = [k for k in wa if k.endswith(f"{name}.lora_A.weight")]
            assert torch.equal(wa[key], A) and torch.equal(wb[key], A)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0)
        assert any(wa[k].abs().max() > 0.01 for k in wa if "lora_B" in k)
        assert lt._read_marker(a)["final_loss"] < lt._read_marker(a)["first_loss"]
        assert lt._read_marker(a)["config"]["freeze_a"] is True
    wm = weights(moved[0])
    assert any(not torch.equal(wm[k], weights(single[0])[k]) for k in wm if "lora_A" in k)  # A moves by default
    assert lt._read_marker(moved[0])["key"] != lt._read_marker(single[0])["key"]
    assert "freeze_a" not in lt._key_config(GROUP_CFG)


def test_a_within_trains_a_inside_its_inits_top_directions(model, tok, tmp_path, one_thread):
    """a_within=m: the saved A starts at the init's first r rows and ends, trained, inside the span of the item's
    top-m contrast directions (computed here directly); free A leaves that span; the key changes only when set."""
    import numpy as np

    from loralag.training.activation_init import contrast_rows

    m = 9  # r is 6
    config = replace(GROUP_CFG, init="contrast", a_within=m, steps=10, lr=2e-2)
    item = group_items()[0]
    [within] = lt.train_adapters(model, tok, [item], tmp_path / "w", config, progress=False)
    [free] = lt.train_adapters(model, tok, [item], tmp_path / "f", replace(config, a_within=0), progress=False)
    examples = lt.build_examples(tok, item, config)
    top = contrast_rows(model, examples, list(config.target_modules), m, lt._pad_id(tok), config.batch_size)
    start = lt._lora_init(model, replace(config, a_within=0), lt.adapter_seed(0, item.name), examples, lt._pad_id(tok))
    ww, wf = weights(within), weights(free)
    left_span = []
    for name, rows in top.items():
        basis = np.linalg.qr(rows.double().numpy().T)[0]  # (d_in, m)
        [key] = [k for k in ww if k.endswith(f"{name}.lora_A.weight")]
        A, F, A0 = ww[key].double().numpy(), wf[key].double().numpy(), start[name][0].double().numpy()
        outside = lambda M: np.linalg.norm(M - (M @ basis) @ basis.T) / np.linalg.norm(M)  # noqa: E731
        assert outside(A) < 1e-5, name
        assert np.abs(A - A0).max() > 1e-3, name  # A trained
        left_span.append(outside(F))
    assert min(left_span) > 1e-2  # the free A leaves it: the check can fail
    assert lt._read_marker(within)["config"]["a_within"] == m
    assert lt._read_marker(within)["key"] != lt._read_marker(free)["key"]
    assert "a_within" not in lt._key_config(GROUP_CFG)


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(a_within=4), "init 'peft' has none"),
        (dict(init="contrast", a_within=4, freeze_a=True), "freeze_a does not train A"),
        (dict(init="contrast", a_within=2), r"a_within \(2\) must be at least the rank r \(4\)"),
        (dict(init="contrast", a_within=-1), "a_within must be an integer >= 0"),
        (dict(init="contrast", a_within=True), "a_within must be an integer >= 0"),
    ],
)
def test_bad_a_within(model, tok, tmp_path, changes, message):
    config = replace(GROUP_CFG, r=4, **changes)
    with pytest.raises(LoralagError, match=message):
        lt.train_adapters(model, tok, group_items()[:1], tmp_path, config, progress=False)


def test_the_default_init_keeps_earlier_cache_keys(model, tok):
    item = group_items()[0]
    key = lt._job(model, tok, item, Path("x"), GROUP_CFG).key
    old = lt._key_config(GROUP_CFG)
    assert "init" not in old  # a key without the field, as before `init` existed
    assert key == lt._job(model, tok, item, Path("x"), replace(GROUP_CFG, init="peft")).key
    with pytest.raises(LoralagError, match="init must be one of"):
        lt.train_adapters(model, tok, [item], Path("x"), replace(GROUP_CFG, init="eva"), progress=False)


@pytest.mark.filterwarnings("error:fan_in_fan_out")  # GPT-2's Conv1D is declared, not left to PEFT to correct
def test_activations_init_on_gpt2_conv1d_and_an_item_shorter_than_the_rank(tok):
    from transformers import GPT2Config

    torch.manual_seed(0)
    gpt2 = AutoModelForCausalLM.from_config(
        GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64)
    ).eval()
    config = TrainConfig(target_modules=["c_attn"], r=4, init="activations")
    short = [([3, 4], [3, 4])]  # two tokens: two directions for a rank of 4
    init = lt._lora_init(gpt2, config, 7, short, lt._pad_id(tok))
    peft_rows = lt._lora_init(gpt2, replace(config, init="peft"), 7)
    assert len(init) == 2  # GPT-2's fused qkv is a transformers Conv1D, read like a Linear
    for name, (A, _, _) in init.items():
        assert torch.linalg.matrix_rank(A[:2]) == 2
        torch.testing.assert_close(A[2:], peft_rows[name][0][2:])  # no direction: PEFT's rows, which train


def test_contrast_rows_are_the_items_directions_against_generic_text(model, tok):
    from loralag.training import activation_init as ai

    config = TrainConfig(r=3, batch_size=3)
    examples = [ex for item in group_items() for ex in lt.build_examples(tok, item, config)]
    targets = ["q_proj", "down_proj"]
    reference = ai.reference_examples(model)
    assert reference == ai.reference_examples(model)  # the base model's own samples under a fixed seed
    assert [len(ids) for ids, _ in reference] == [ai.REFERENCE_LENGTH] * ai.REFERENCE_SEQUENCES
    ref = _inputs_alone(model, reference, targets)
    for subset in (examples, [([5, 6, 7, 8, 9], [5, 6, 7, 8, 9])]):  # more tokens than d_in (XᵀX), fewer (rows)
        _check_contrast(model, tok, subset, targets, ref)
    mine = ai._reference_whitening(model, tuple(targets), 3, ai.CONTRAST_SHRINK)
    torch.manual_seed(1)
    other = AutoModelForCausalLM.from_config(model.config).eval()  # another model: its own reference
    theirs = ai._reference_whitening(other, tuple(targets), 3, ai.CONTRAST_SHRINK)
    assert not torch.equal(mine["model.layers.0.self_attn.q_proj"], theirs["model.layers.0.self_attn.q_proj"])
    init = lt._lora_init(model, replace(GROUP_CFG, init="contrast"), 5, examples[:2], lt._pad_id(tok))
    assert all(B.abs().max() == 0 for _, B, _ in init.values())  # starts as the base model


def _check_contrast(model, tok, examples, targets, ref, reference=None):
    import numpy as np

    from loralag.training import activation_init as ai

    rows = ai.contrast_rows(model, examples, targets, 3, lt._pad_id(tok), batch_size=3, reference=reference)
    item = _inputs_alone(model, examples, targets)
    assert rows.keys() == item.keys() and len(rows) == 4
    for name, x in item.items():
        sigma, sigma_ref = x.T @ x / len(x), ref[name].T @ ref[name] / len(ref[name])
        d = len(sigma)
        sigma_ref = sigma_ref + ai.CONTRAST_SHRINK * np.trace(sigma_ref) / d * np.eye(d)
        values, vectors = np.linalg.eig(np.linalg.solve(sigma_ref, sigma))  # Σ_ref⁻¹ Σ v = λ v, brute force
        top = vectors[:, np.argsort(-values.real)[:3]].real.T
        top /= np.linalg.norm(top, axis=1, keepdims=True)
        ours = rows[name].double().numpy()
        np.testing.assert_allclose(np.abs((ours * top).sum(1)), 1, atol=1e-4)  # the same directions, in order
        ratio = lambda v: (v @ sigma @ v) / (v @ sigma_ref @ v)  # noqa: E731
        assert ratio(ours[0]) > ratio(np.linalg.svd(x, full_matrices=False)[2][0])  # beats the plain top direction


def test_contrast_against_a_librarys_texts_whitens_by_their_inputs(model, tok, tmp_path, one_thread):
    """contrast_against: the generalised eigenvectors against the given texts' inputs (brute force, each text run
    alone) instead of the base model's samples; through _lora_init as the adapter's A; the same adapters one at a
    time and grouped; the texts held in the key and marker by their digest; refused with another init."""
    from loralag.training import activation_init as ai

    texts = ["The council banned the harvest of blue ice in 2031 .", PAIRS[0][0] + " " + PAIRS[0][1], TEXT]
    config = replace(GROUP_CFG, init="contrast", contrast_against=texts)
    reference = lt._reference_examples(tok, config)
    assert reference == [ex for t in texts for ex in lt.build_examples(tok, Document("d", t), config)]
    assert lt._reference_examples(tok, replace(config)) is reference  # tokenized once for the library's adapters
    fewer = lt._reference_examples(tok, replace(config, contrast_against=texts[:2]))
    assert fewer == reference[: len(fewer)] and len(fewer) < len(reference)
    reference = lt._reference_examples(tok, config)
    targets = ["q_proj", "down_proj"]
    examples = [ex for item in group_items() for ex in lt.build_examples(tok, item, config)]
    _check_contrast(model, tok, examples, targets, _inputs_alone(model, reference, targets), reference)
    generic = ai.contrast_rows(model, examples, targets, 3, lt._pad_id(tok), batch_size=3)
    theirs = ai.contrast_rows(model, examples, targets, 3, lt._pad_id(tok), batch_size=3, reference=reference)
    assert not torch.allclose(generic["model.layers.0.mlp.down_proj"], theirs["model.layers.0.mlp.down_proj"])
    # the adapter's A: the rows against the texts, at PEFT's row norm
    item = group_items()[1]
    mine = lt.build_examples(tok, item, config)
    init = lt._lora_init(model, config, 5, mine, lt._pad_id(tok), reference)
    rows = ai.contrast_rows(model, mine, config.target_modules, config.r, lt._pad_id(tok), 2, reference=reference)
    peft_rows = lt._lora_init(model, GROUP_CFG, 5)
    for name, (A, B, _) in init.items():
        torch.testing.assert_close(A, rows[name] * peft_rows[name][0].norm(dim=1).mean())
        assert B.abs().max() == 0
    single = lt.train_adapters(model, tok, group_items(), tmp_path / "s", config, progress=False)
    grouped = lt.train_adapters(model, tok, group_items()[::-1], tmp_path / "g", config, progress=False, group_size=2)
    for a, b in zip(single, grouped[::-1]):
        wa, wb = weights(a), weights(b)
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], atol=1e-5, rtol=0)
    marker = lt._read_marker(single[1])
    assert marker["config"]["contrast_against"] == lt._texts_digest(texts) and TEXT not in json.dumps(marker)
    assert lt._texts_digest(texts).startswith("3 texts, sha256 ")
    # another text, or none (generic text, whose keys stay as before the field): another adapter
    keys = {
        lt._job(model, tok, item, tmp_path, c).key
        for c in (config, replace(config, contrast_against=texts[:2]), replace(config, contrast_against=[]))
    }
    assert len(keys) == 3 and "contrast_against" not in lt._key_config(replace(config, contrast_against=[]))
    for bad, match in (
        (replace(GROUP_CFG, contrast_against=texts), "not 'peft'"),
        (replace(config, contrast_against=[" "]), r"contrast_against\[0\]"),
    ):
        with pytest.raises(LoralagError, match=match):
            lt.train_adapters(model, tok, [item], tmp_path / "x", bad, progress=False)


def test_salient_rows_weigh_each_input_by_the_loss_on_the_token_it_predicts(model, tok):
    """salient: contrast's generalised eigenvectors with Σ_item weighted per token by the base model's NLL of the
    next token where it is a label (0 elsewhere: a QA pair's prompt, the last token), against a brute force that
    runs each example alone and weighs its inputs by hand."""
    import numpy as np

    from loralag.training import activation_init as ai

    config = TrainConfig(r=3, batch_size=3)
    examples = [ex for item in group_items() for ex in lt.build_examples(tok, item, config)]
    targets = ["q_proj", "down_proj"]
    rows = ai.salient_rows(model, examples, targets, 3, lt._pad_id(tok), batch_size=3)  # padded batches
    ref = _inputs_alone(model, ai.reference_examples(model), targets)
    item = _inputs_alone(model, examples, targets)
    weights = []
    with torch.no_grad():
        for ids, labels in examples:
            logp = model(input_ids=torch.tensor([ids])).logits[0].double().log_softmax(-1)
            w = [-float(logp[t, labels[t + 1]]) if labels[t + 1] != -100 else 0.0 for t in range(len(ids) - 1)]
            weights += w + [0.0]
    w = np.array(weights)
    assert (w == 0).sum() > len(examples)  # the QA prompts and last tokens weigh nothing
    for name, x in item.items():
        sigma = (x * w[:, None]).T @ x / w.sum()
        sigma_ref = ref[name].T @ ref[name] / len(ref[name])
        d = len(sigma)
        sigma_ref = sigma_ref + ai.CONTRAST_SHRINK * np.trace(sigma_ref) / d * np.eye(d)
        values, vectors = np.linalg.eig(np.linalg.solve(sigma_ref, sigma))
        top = vectors[:, np.argsort(-values.real)[:3]].real.T
        top /= np.linalg.norm(top, axis=1, keepdims=True)
        ours = rows[name].double().numpy()
        np.testing.assert_allclose(np.abs((ours * top).sum(1)), 1, atol=1e-4)
    unweighted = ai.contrast_rows(model, examples, targets, 3, lt._pad_id(tok), batch_size=3)
    assert not torch.allclose(rows["model.layers.0.self_attn.q_proj"], unweighted["model.layers.0.self_attn.q_proj"])


def test_a_bundled_models_adapters_survive_another_cache_root(model, tok, tmp_path):
    from loralag.models import BUNDLED

    doc = Document("zorblax", TEXT)
    name = BUNDLED["default"].name
    model.config._name_or_path = str(tmp_path / "cache-a" / "models" / name)  # as load_model("default") sets it
    [path] = lt.train_adapters(model, tok, [doc], tmp_path / "out", FAST, progress=False)
    model.config._name_or_path = str(tmp_path / "cache-b" / "models" / name)  # $LORALAG_CACHE elsewhere
    assert lt.train_adapter(model, tok, doc, tmp_path / "out", FAST).skipped
    # an adapter written before (its key held the converted folder's path) is still found there
    marker = lt._read_marker(path)
    job = lt._job(model, tok, doc, tmp_path / "out", FAST)
    marker["key"] = lt._train_key(model, job.examples, FAST, None, job.seed, model.config._name_or_path)
    (path / lt.MARKER_FILE).write_text(json.dumps(marker))
    assert lt.train_adapter(model, tok, doc, tmp_path / "out", FAST).skipped
    # a model of one's own is still known by its path: another folder is another model
    model.config._name_or_path = str(tmp_path / "mine" / "models" / "my-model")
    assert not lt.train_adapter(model, tok, doc, tmp_path / "out", FAST).skipped


def one_library(model, tmp_path, folders, name="under"):
    from loralag.library.store import build_library, module_shapes

    return build_library(tmp_path / name, folders, base_model="tiny", shapes=module_shapes(model), progress=False)


def test_training_under_a_one_adapter_library_equals_training_on_it_merged(model, tok, tmp_path, one_thread):
    """A library of one adapter routed by LAG picks it on every token: training under it must equal training on
    the adapter merged into the base weights by PEFT (forward and gradients through the routed layer)."""
    from conftest import save_lora

    from loralag.routing.state import state_of

    know = save_lora(model, tmp_path / "ads" / "know", seed=5, r=3, alpha=30, target_modules=KNOWLEDGE)
    lib = one_library(model, tmp_path, [tmp_path / "ads"])
    before, types = snapshot(model), module_types(model)
    item = QAPairs("task", PAIRS, library=lt.UnderLibrary(lib.path))
    routed, plain = trains_like_merged(model, tok, tmp_path, item, know, atol=1e-4)  # the SVD form: float rounding
    after = model.state_dict()  # the library was detached: the model is what it was
    assert all(torch.equal(before[k], after[k]) for k in before) and module_types(model) == types
    assert state_of(model) is None and lt._read_marker(routed)["key"] != lt._read_marker(plain)["key"]
    assert lt._read_marker(routed)["library"] == {"path": str(lib.path.resolve()), "router": "lag", "k": 20}
    assert "library" not in lt._read_marker(plain)


def test_training_under_a_routed_library_sees_each_tokens_pick(model, tok, tmp_path, one_thread):
    """With several adapters, the first loss (B starts at 0) is the routed library's own loss on the pairs:
    the model with the library attached (LAG, the same k) scored without training anything."""
    from conftest import save_lora

    for i in range(4):
        save_lora(model, tmp_path / "ads" / f"k{i}", seed=10 + i, r=3, alpha=30, target_modules=KNOWLEDGE)
    lib = one_library(model, tmp_path, [tmp_path / "ads"])
    cfg = TrainConfig(**{**asdict(UNDER_CFG), "batch_size": 2})  # one batch holds both pairs
    [path] = lt.train_adapters(
        model,
        tok,
        [QAPairs("task", PAIRS, library=lt.UnderLibrary(lib.path, k=2))],
        tmp_path / "t",
        cfg,
        progress=False,
    )
    from loralag import attach, detach

    state = attach(model, [lib], router="lag", k=2)
    try:
        with state.tracing() as trace:
            rows = [row_loss_sum(model, tok, *pair) for pair in PAIRS]
    finally:
        detach(model)
    picked = {w for m in lib.target_modules for w in trace.winner_matrix(m, lib.name).reshape(-1).tolist()}
    assert len(picked) > 1  # the tokens do not all take one adapter
    expected = sum(s for s, _ in rows) / sum(n for _, n in rows)
    assert lt._read_marker(path)["first_loss"] == pytest.approx(expected, abs=1e-5)


def test_the_routed_library_is_part_of_the_cache_key(model, tok, tmp_path, caplog, one_thread):
    from conftest import save_lora

    for i in range(3):
        save_lora(model, tmp_path / "ads" / f"k{i}", seed=20 + i, r=3, target_modules=KNOWLEDGE)
    lib = one_library(model, tmp_path, [tmp_path / "ads"])
    item = QAPairs("task", PAIRS, library=lt.UnderLibrary(lib.path, k=2))
    out = tmp_path / "out"
    lt.train_adapters(model, tok, [item], out, UNDER_CFG, progress=False)
    assert lt.train_adapter(model, tok, item, out, UNDER_CFG).skipped
    for other in (replace(item.library, k=1), replace(item.library, router="spectral")):
        assert not lt.train_adapter(model, tok, replace(item, library=other), tmp_path / "o", UNDER_CFG).skipped
    assert not lt.train_adapter(model, tok, QAPairs("task", PAIRS), out, UNDER_CFG).skipped
    lt.train_adapter(model, tok, item, out, UNDER_CFG)
    lib.remove(["k2"])  # another library content: retrain
    assert not lt.train_adapter(model, tok, item, out, UNDER_CFG).skipped
    with caplog.at_level(logging.WARNING, logger="loralag.training.train"):
        lt.train_adapters(
            model, tok, [item, QAPairs("b", PAIRS)], tmp_path / "g", UNDER_CFG, progress=False, group_size=2
        )
    assert "routed library" in caplog.text


def test_bad_routed_library(model, tok, tmp_path):
    from conftest import save_lora

    know = save_lora(model, tmp_path / "ads" / "know", seed=5, target_modules=KNOWLEDGE)
    save_lora(model, tmp_path / "attn" / "a", seed=5, target_modules=("q_proj",))
    lib = one_library(model, tmp_path, [tmp_path / "ads"])
    attn = one_library(model, tmp_path, [tmp_path / "attn"], name="attnlib")
    cases = [
        (QAPairs("t", PAIRS, library=lt.UnderLibrary(lib.path, router="arrow-mix")), "picks one adapter per token"),
        (QAPairs("t", PAIRS, library=lt.UnderLibrary(lib.path, k=0)), "k must be a positive integer"),
        (QAPairs("t", PAIRS, under=[know, None], library=lt.UnderLibrary(lib.path)), "not both"),
        (QAPairs("t", PAIRS, library=lt.UnderLibrary(attn.path)), r"targets \['q_proj'\], which the adapter"),
        (QAPairs("t", PAIRS, library=lt.UnderLibrary(tmp_path / "nolib")), "nolib"),
    ]
    for item, message in cases:
        with pytest.raises(LoralagError, match=message):
            lt.train_adapters(model, tok, [item], tmp_path / "out", UNDER_CFG, progress=False)
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


def test_only_the_chosen_pairs_train_under_the_routed_library(model, tok, tmp_path, one_thread):
    """UnderLibrary.pairs: a one-adapter library under the first pair only trains exactly like that adapter frozen
    under the first pair only (the per-row frozen adapters, themselves checked against PEFT's merge above)."""
    from conftest import save_lora

    know = save_lora(model, tmp_path / "ads" / "know", seed=5, r=3, alpha=30, target_modules=KNOWLEDGE)
    lib = one_library(model, tmp_path, [tmp_path / "ads"])
    cfg = TrainConfig(**{**asdict(UNDER_CFG), "batch_size": 1})  # batches of one row: rows with and without
    item = QAPairs("task", PAIRS, library=lt.UnderLibrary(lib.path, pairs=(True, False)))
    [routed] = lt.train_adapters(model, tok, [item], tmp_path / "u", cfg, progress=False)
    [ref] = lt.train_adapters(
        model, tok, [QAPairs("task", PAIRS, under=[know, None])], tmp_path / "r", cfg, progress=False
    )
    wu, wr = weights(routed), weights(ref)
    assert wu.keys() == wr.keys()
    for k in wr:
        torch.testing.assert_close(wu[k], wr[k], atol=1e-4, rtol=0)
    cfg2 = TrainConfig(**{**asdict(UNDER_CFG), "batch_size": 2})  # both rows in one batch: the same rule per row
    [both] = lt.train_adapters(model, tok, [item], tmp_path / "b", cfg2, progress=False)
    [ref2] = lt.train_adapters(
        model, tok, [QAPairs("task", PAIRS, under=[know, None])], tmp_path / "r2", cfg2, progress=False
    )
    assert lt._read_marker(both)["first_loss"] == pytest.approx(lt._read_marker(ref2)["first_loss"], abs=1e-5)
    # every pair chosen is the plain library (the same key); another choice is another adapter
    full = QAPairs("task", PAIRS, library=lt.UnderLibrary(lib.path))
    assert lt._job(model, tok, replace(full, library=replace(full.library, pairs=(1, 1))), tmp_path, cfg).key == (
        lt._job(model, tok, full, tmp_path, cfg).key
    )
    assert lt._job(model, tok, item, tmp_path, cfg).key != lt._job(model, tok, full, tmp_path, cfg).key
    with pytest.raises(LoralagError, match="names 3 pairs to train under for 2"):
        lt.train_adapters(
            model,
            tok,
            [replace(full, library=replace(full.library, pairs=(True,) * 3))],
            tmp_path / "x",
            cfg,
            progress=False,
        )
