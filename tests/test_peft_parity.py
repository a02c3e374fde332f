"""Our routed layers against PEFT itself: one fixed adapter is PEFT's LoRA; arrow-mix is PEFT's Arrow."""

import pytest
import torch
from conftest import save_lora, tiny_gpt2, tiny_llama
from peft import ArrowConfig, PeftModel, create_arrow_model

from loralag import attach, build_library, detach
from loralag.library.store import module_shapes


def peft_logits(model, folder, ids):
    pm = PeftModel.from_pretrained(model, str(folder))
    with torch.no_grad():
        out = pm(ids).logits
    pm.unload()
    return out


def fixed_logits(model, lib, name, ids):
    state = attach(model, lib)
    state.fix(lib.name, [name] * len(ids))
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        detach(model)


LLAMA_CASES = {
    "plain": dict(r=4, alpha=8, target_modules=("q_proj", "v_proj", "gate_proj", "down_proj")),
    "rslora": dict(r=8, alpha=4, use_rslora=True, target_modules=("k_proj", "o_proj", "up_proj")),
    "patterns": dict(
        r=4,
        alpha=8,
        target_modules=("q_proj", "v_proj", "up_proj"),
        rank_pattern={"v_proj": 2, "layers.1.self_attn.q_proj": 6},
        alpha_pattern={"up_proj": 3},
    ),
}


@pytest.mark.parametrize("case", sorted(LLAMA_CASES))
def test_fixed_equals_peft_lora_llama(tmp_path, ids, case):
    model = tiny_llama()
    folder = save_lora(model, tmp_path / "ads" / case, seed=3, **LLAMA_CASES[case])
    lib = build_library(
        tmp_path / "lib", [folder], base_model="tiny-llama", shapes=module_shapes(model), progress=False
    )
    ref = peft_logits(model, folder, ids)
    base = model(ids).logits
    assert (ref - base).abs().max() > 1e-2
    torch.testing.assert_close(fixed_logits(model, lib, case, ids), ref, atol=1e-4, rtol=1e-4)


def test_fixed_equals_peft_lora_gpt2_conv1d(tmp_path, ids):
    model = tiny_gpt2()
    folder = save_lora(
        model,
        tmp_path / "ads" / "g",
        seed=4,
        r=4,
        alpha=16,
        target_modules=("c_attn", "c_proj", "c_fc"),
        fan_in_fan_out=True,
    )
    lib = build_library(tmp_path / "lib", [folder], base_model="tiny-gpt2", shapes=module_shapes(model), progress=False)
    ref = peft_logits(model, folder, ids)
    assert (ref - model(ids).logits).abs().max() > 1e-2
    torch.testing.assert_close(fixed_logits(model, lib, "g", ids), ref, atol=1e-4, rtol=1e-4)


def test_export_round_trip_through_peft(tmp_path, ids):
    model = tiny_llama()
    folder = save_lora(model, tmp_path / "ads" / "p", seed=5, **LLAMA_CASES["patterns"])
    lib = build_library(
        tmp_path / "lib", [folder], base_model="tiny-llama", shapes=module_shapes(model), progress=False
    )
    (exported,) = lib.export(tmp_path / "out")
    torch.testing.assert_close(peft_logits(model, exported, ids), peft_logits(model, folder, ids), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("top_k,temperature", [(1, 1.0), (3, 1.0), (3, 0.3), (5, 2.0)])
def test_arrow_mix_equals_peft_arrow(tmp_path, ids, top_k, temperature):
    model = tiny_llama()
    folders = [
        save_lora(
            model,
            tmp_path / "ads" / f"e{i}",
            seed=20 + i,
            r=4,
            alpha=8,
            target_modules=("q_proj", "v_proj", "up_proj"),
            spectral_gap=4.0,
        )
        for i in range(5)
    ]
    lib = build_library(tmp_path / "lib", folders, base_model="tiny-llama", shapes=module_shapes(model), progress=False)
    attach(model, lib, router="arrow-mix", k=top_k, temperature=temperature)
    with torch.no_grad():
        ours = model(ids).logits
    detach(model)
    base = model(ids).logits
    arrow = create_arrow_model(
        model, [str(f) for f in folders], ArrowConfig(top_k=top_k, router_temperature=temperature, rng_seed=0)
    )
    with torch.no_grad():
        ref = arrow(ids).logits
    assert (ref - base).abs().max() > 1e-2
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
