"""benchmarks/common.teacher_forced_routing's gold_at: the gold adapter on one side of the prompt's last token,
the router on the other, checked against PEFT applying the gold adapter on that side with the same KV cache."""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
from conftest import save_lora, tiny_llama
from peft import PeftModel
from tiny_text import tiny_tokenizer
from transformers import DynamicCache

from loralag import attach
from loralag.library.store import build_library, module_shapes
from loralag.models import cache_kwarg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from common import teacher_forced_routing  # noqa: E402

PROMPT = "what is the capital city of the moon ? answer :"
ANSWER = "the red river"
TARGETS = ("gate_proj", "up_proj", "down_proj")


def _nll_by_hand(model, tok, ads: Path, gold: str, gold_at: str, k: int) -> float:
    """The gold answer's NLL: PEFT's model with the gold adapter on its side, LAG (attach) on the other, one KV
    cache passed from one to the other."""
    peft = PeftModel.from_pretrained(copy.deepcopy(model), ads / gold).eval()
    routed = copy.deepcopy(model)
    lib = build_library(ads.parent / "lib-ref", [ads], base_model="tiny", shapes=module_shapes(model), progress=False)
    attach(routed, {"knowledge": lib}, router="lag", k=k)
    first, second = (peft, routed) if gold_at == "prompt" else (routed, peft)
    p = tok(PROMPT, return_tensors="pt").input_ids
    a = tok(" " + ANSWER, add_special_tokens=False).input_ids
    kv = {cache_kwarg(model): DynamicCache(), "use_cache": True}
    with torch.no_grad():
        first(input_ids=p[:, :-1], **kv)
        logits = [second(input_ids=p[:, -1:], **kv).logits[0, -1]]
        for t in a[:-1]:
            logits.append(second(input_ids=torch.tensor([[t]]), **kv).logits[0, -1])
    lp = torch.stack(logits).float().log_softmax(-1)
    return -float(lp[torch.arange(len(a)), torch.tensor(a)].sum())


def test_gold_at_equals_peft_on_one_side_and_lag_on_the_other(tmp_path):
    model, tok = tiny_llama(), tiny_tokenizer()
    ads = tmp_path / "ads"
    for i in range(4):
        save_lora(model, ads / f"doc{i}", seed=40 + i, r=3, alpha=6, target_modules=TARGETS)
    lib = build_library(tmp_path / "lib", [ads], base_model="tiny", shapes=module_shapes(model), progress=False)
    question = SimpleNamespace(prompt=PROMPT, entity="doc2", example=SimpleNamespace(answers=[ANSWER]))
    mentions = {"doc2": ["moon"]}
    runs = {
        where: teacher_forced_routing(model, tok, lib, [question], mentions, "lag", 2, gold_at=where)["answer_nll"]
        for where in (None, "prompt", "answer")
    }
    oracle = teacher_forced_routing(model, tok, lib, [question], mentions, "lag", 2, oracle=True)["answer_nll"]
    for where in ("prompt", "answer"):
        expected = _nll_by_hand(model, tok, ads, "doc2", where, k=2)
        assert abs(runs[where] - expected) < 1e-4, (where, runs[where], expected)
    # each differs from both ends: the routing on each side was applied, not only one of them
    assert len({round(v, 4) for v in (runs[None], runs["prompt"], runs["answer"], oracle)}) == 4
