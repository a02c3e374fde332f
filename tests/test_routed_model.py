"""Routed models in use: generate with the KV cache, padded batches, bf16, several libraries, detach."""

import pytest
import torch
from conftest import save_lora, tiny_gpt2, tiny_llama

from loralag import attach, build_library, detach
from loralag.errors import LibraryError
from loralag.library.store import module_shapes
from loralag.routing.routers import RouteSpec


def make_library(model, path, n, seed, targets, r=4):
    ads = path / "ads"
    for i in range(n):
        save_lora(model, ads / f"{path.name}{i}", seed=seed + i, r=r, alpha=2 * r, target_modules=targets)
    name = path.name.rstrip("0123456789")  # tmp folders "task0", "know0" -> libraries "task", "know"
    return build_library(path / name, [ads], base_model="tiny", shapes=module_shapes(model), progress=False)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_llama()
    model.generation_config.eos_token_id = None  # random weights: never stop early
    task = make_library(model, tmp_path_factory.mktemp("task"), 3, 100, ("q_proj", "k_proj", "v_proj", "o_proj"))
    know = make_library(model, tmp_path_factory.mktemp("know"), 6, 200, ("gate_proj", "up_proj", "down_proj"), r=3)
    return model, task, know


@pytest.mark.parametrize("router", ["lag", "arrow", "spectral", "arrow-mix"])
def test_greedy_generate_equals_stepwise_recomputation(setup, router):
    model, task, know = setup
    ids = torch.randint(0, 97, (2, 7), generator=torch.Generator().manual_seed(3))
    attach(model, [task, know], router=router, k=2)
    try:
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
            seq = ids
            for _ in range(8):  # no KV cache: the whole sequence through the routed model each step
                nxt = model(seq, use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
                seq = torch.cat([seq, nxt], dim=1)
    finally:
        detach(model)
    assert torch.equal(out, seq)


def test_padded_batch_matches_single_sequences(setup):
    model, task, know = setup
    a = torch.randint(1, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    b = torch.randint(1, 97, (1, 5), generator=torch.Generator().manual_seed(5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])  # left padding
    mask = (torch.arange(9) >= torch.tensor([[0], [4]])).long()
    attach(model, [task, know], router="lag", k=2)
    try:
        with torch.no_grad():
            out = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
            single_a = model.generate(a, max_new_tokens=6, do_sample=False, pad_token_id=0)
            single_b = model.generate(b, max_new_tokens=6, do_sample=False, pad_token_id=0)
    finally:
        detach(model)
    assert torch.equal(out[0, 9:], single_a[0, 9:])
    assert torch.equal(out[1, 9:], single_b[0, 5:])


def test_two_libraries_are_routed_separately_and_summed(setup):
    model, task, know = setup
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(6))
    base = model(ids).logits
    state = attach(model, {"task": task, "know": know}, router={"task": "fixed", "know": "fixed"})
    state.fix("task", [task.names[0], task.names[1]])
    state.fix("know", [know.names[2], None])
    with torch.no_grad():
        both = model(ids).logits
    state.set_router("know", "none")
    with torch.no_grad():
        task_only = model(ids).logits
    state.set_router("task", "none")
    state.fix("know", [know.names[2], None])
    with torch.no_grad():
        know_only = model(ids).logits
    detach(model)
    # In one module only one library adapts here, so the effects must be visible and the second sequence
    # gets no knowledge adapter at all.
    assert (both - task_only).abs().max() > 1e-3 and (know_only - base).abs().max() > 1e-3
    torch.testing.assert_close(know_only[1], base[1], atol=0, rtol=0)
    torch.testing.assert_close(both[1], task_only[1], atol=0, rtol=0)


def test_bfloat16_model_as_close_to_float32_as_peft(setup):
    """A bf16 model routes and adapts, with an error against fp32 of the order of PEFT's own in bf16."""
    from peft import PeftModel

    model, task, _ = setup
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(7))
    name = task.names[0]

    def ours(dtype):
        model.to(dtype)
        attach(model, task, router="fixed").fix(task.name, [name] * 2)
        try:
            with torch.no_grad():
                return model(ids).logits.float()
        finally:
            detach(model)
            model.to(torch.float32)

    def peft(dtype):
        pm = PeftModel.from_pretrained(model, task.entry(name)["source"]).to(dtype)
        with torch.no_grad():
            out = pm(ids).logits.float()
        pm.unload().to(torch.float32)
        return out

    assert ours(torch.bfloat16).dtype == torch.float32  # .float() above; the model ran in bf16
    our_err = (ours(torch.bfloat16) - ours(torch.float32)).abs().max()
    peft_err = (peft(torch.bfloat16) - peft(torch.float32)).abs().max()
    torch.testing.assert_close(ours(torch.float32), peft(torch.float32), atol=1e-4, rtol=1e-4)
    assert our_err < 2 * peft_err


def test_detach_restores_bit_for_bit(setup):
    model, task, know = setup
    ids = torch.randint(0, 97, (2, 6), generator=torch.Generator().manual_seed(8))
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before_modules = dict(model.named_modules())
    before = model(ids).logits
    attach(model, [task, know], router="lag")
    assert (model(ids).logits - before).abs().max() > 1e-3
    detach(model)
    assert torch.equal(model(ids).logits, before)
    assert dict(model.named_modules()).keys() == before_modules.keys()
    assert all(model.get_submodule(n) is m for n, m in before_modules.items() if n)
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())


def test_attach_wraps_exactly_the_targeted_modules(setup):
    model, task, know = setup
    state = attach(model, [task, know])
    try:
        wrapped = {n for n, m in model.named_modules() if type(m).__name__ == "RoutedLinear"}
    finally:
        detach(model)
    assert wrapped == set(task.target_modules) | set(know.target_modules)
    assert len(state.layers) == len(wrapped)


def test_attach_refuses_a_library_of_another_model(setup):
    _, task, _ = setup
    with pytest.raises(LibraryError, match="self_attn.*no such module"):
        attach(tiny_gpt2(), task)


def test_attach_refuses_a_model_off_the_cpu_in_one_line(setup):
    """The banks are CPU tensors: a model on another device is refused at attach (naming the device), not at its
    first forward deep inside a router, and is left as it was."""
    from loralag.errors import ModelError
    from loralag.routing.state import state_of

    _, task, _ = setup
    elsewhere = tiny_llama().to("meta")  # any device but the CPU; a CUDA model takes the same path
    before = {name: type(m) for name, m in elsewhere.named_modules()}
    with pytest.raises(ModelError) as e:
        attach(elsewhere, task)
    assert "meta" in str(e.value) and "\n" not in str(e.value)
    assert state_of(elsewhere) is None and {name: type(m) for name, m in elsewhere.named_modules()} == before
    # moved after attach: its first forward says so in one line
    moved = tiny_llama()
    attach(moved, task)
    try:
        moved.to("meta")
        with pytest.raises(ModelError) as e:
            moved(torch.zeros(1, 3, dtype=torch.long, device="meta"))
        assert "q_proj" in str(e.value) and "meta" in str(e.value) and "\n" not in str(e.value)
    finally:
        detach(moved)


def test_fixed_refuses_unknown_adapter(setup):
    model, task, _ = setup
    state = attach(model, task)
    try:
        with pytest.raises(LibraryError, match="no adapter named 'nope'"):
            state.fix(task.name, ["nope"])
    finally:
        detach(model)


def test_trace_records_prefill_and_decoding(setup):
    model, task, know = setup
    ids = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(9))
    state = attach(model, {"task": task, "know": know}, router="lag", k=2)
    with state.tracing() as trace, torch.no_grad():
        model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    detach(model)
    module = know.target_modules[0]
    w = trace.winner_matrix(module, "know")
    assert w.shape == (2, 5 + 3)  # the last generated token is never fed back
    assert ((w >= 0) & (w < len(know))).all()
    s = trace.summary(0)
    assert set(s) == {"task", "know"}
    assert abs(sum(s["know"]["shares"].values()) - 1) < 1e-6
    assert s["know"]["routed"] == 8 * len(know.target_modules)


def test_sequence_vote_picks_the_majority_adapter(setup):
    """The vote equals a hand count over the trace of the same per-token pass, then routes by `fixed`."""
    from collections import Counter

    model, task, know = setup
    ids = torch.randint(1, 97, (2, 8), generator=torch.Generator().manual_seed(10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second sequence must not vote
    state = attach(model, {"task": task, "know": know}, router="lag", k=2)
    with state.tracing() as trace, torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    expected = {}
    for lib in ("task", "know"):
        expected[lib] = []
        for seq in range(2):
            c = Counter()
            for module in trace.modules(lib):
                for pos, name in enumerate(trace.adapter_names(module, lib, seq)):
                    if mask[seq, pos]:
                        c[name] += 1
            top = max(c.values())
            expected[lib].append(sorted(n for n, v in c.items() if v == top)[0])
    votes = state.fix_by_vote(ids, mask)
    assert votes == expected
    assert state.specs["know"].router == "fixed" and state.specs["know"].fixed == tuple(expected["know"])
    with torch.no_grad():
        voted = model(input_ids=ids, attention_mask=mask).logits
    detach(model)
    fixed = attach(model, {"task": task, "know": know}, router="fixed")
    fixed.fix("task", expected["task"])
    fixed.fix("know", expected["know"])
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).logits
    detach(model)
    torch.testing.assert_close(voted, ref, atol=0, rtol=0)


def test_routing_settings_are_values_changed_through_the_state(setup):
    """RouteSpecs cannot be edited in place, the state's mapping is read-only, and a router other than `fixed`
    drops the adapters named for it."""
    model, task, _ = setup
    state = attach(model, task, router="lag", k=2)
    try:
        spec = state.specs[task.name]
        with pytest.raises(AttributeError):
            spec.k = 3
        with pytest.raises(TypeError):
            state.specs[task.name] = RouteSpec("arrow")
        state.fix(task.name, [task.names[1], None])
        assert state.specs[task.name].fixed == (task.names[1], None)
        state.set_router(task.name, "lag", k=3)
        assert state.specs[task.name] == RouteSpec("lag", k=3)
    finally:
        detach(model)


def test_configure_routes_the_block_then_restores_even_after_an_error(setup):
    """Inside configure() the model computes what a model attached with those settings computes; afterwards (also
    when the block raised) it computes what it did before."""
    model, task, know = setup
    ids = torch.randint(0, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))

    def logits():
        with torch.no_grad():
            return model(input_ids=ids).logits

    reference = {}
    for router in ("lag", "arrow"):
        attach(model, {"task": task, "know": know}, router=router, k=2)
        reference[router] = logits()
        detach(model)
    state = attach(model, {"task": task, "know": know}, router="lag", k=2)
    try:
        before = dict(state.specs)
        torch.testing.assert_close(logits(), reference["lag"], rtol=0, atol=0)
        with state.configure(router="arrow"):
            torch.testing.assert_close(logits(), reference["arrow"], rtol=0, atol=0)
        assert dict(state.specs) == before
        with pytest.raises(RuntimeError, match="inside"):
            with state.configure({"task": RouteSpec("arrow", k=2), "know": RouteSpec("arrow", k=2)}):
                torch.testing.assert_close(logits(), reference["arrow"], rtol=0, atol=0)
                raise RuntimeError("inside")
        assert dict(state.specs) == before
        torch.testing.assert_close(logits(), reference["lag"], rtol=0, atol=0)
        with pytest.raises(LibraryError, match="no library named 'nope'"):
            with state.configure({"nope": RouteSpec("arrow")}):
                pass
        with pytest.raises(LibraryError, match="no adapter named 'zzz'"):
            with state.configure(library="task", router="fixed", fixed=["zzz", None]):
                pass
        assert dict(state.specs) == before
    finally:
        detach(model)


@pytest.mark.parametrize("router", ["lag", "lag-prefix", "spectral", "arrow"])
def test_gradient_through_routed_picks_equals_brute_force(setup, router):
    """Training upstream of a routed library: the loss and its gradient to the inputs equal a brute force that
    applies each token's picked adapter from its raw PEFT factors (s·B·A, not the library's SVD form) with
    plain autograd, the picks being those the router made (its trace)."""
    from loralag.library.adapters import read_adapter

    model, _, know = setup
    torch.manual_seed(7)
    embeds = torch.randn(2, 6, 32)
    weight = torch.randn(2, 6, 97)

    def loss_and_grad(run):
        x = embeds.clone().requires_grad_(True)
        loss = (run(x) * weight).sum()
        loss.backward()
        return loss.detach(), x.grad

    state = attach(model, [know], router=router, k=2)
    try:
        with state.tracing() as trace:
            routed = loss_and_grad(lambda x: model(inputs_embeds=x).logits)
    finally:
        detach(model)
    factors = {name: read_adapter(know.path.parent / "ads" / name).modules for name in know.names}

    def brute(module_name, base):
        picks = trace.winner_matrix(module_name, know.name).reshape(-1).tolist()
        names = trace.names[(module_name, know.name)]

        def forward(x):
            X = x.reshape(-1, x.shape[-1])
            rows = []
            for t, w in enumerate(picks):
                lora = factors[names[w]][module_name]
                rows.append(lora.scale * (lora.B @ (lora.A @ X[t])))
            return base(x) + torch.stack(rows).view(*x.shape[:-1], -1)

        return forward

    originals = {}
    for name, module in model.named_modules():
        if name in know.target_modules:
            originals[name] = module.forward
            module.forward = brute(name, module.forward)
    try:
        ref = loss_and_grad(lambda x: model(inputs_embeds=x).logits)
    finally:
        for name, module in model.named_modules():
            if name in originals:
                module.forward = originals[name]
    assert len({w for m in know.target_modules for w in trace.winner_matrix(m, know.name).reshape(-1).tolist()}) > 1
    torch.testing.assert_close(routed[0], ref[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(routed[1], ref[1], rtol=1e-4, atol=1e-5)
    assert ref[1].abs().max() > 0


def test_a_mixing_router_refuses_to_pass_gradients(setup):
    from loralag.errors import LoralagError

    model, _, know = setup
    attach(model, [know], router="arrow-mix", k=2)
    try:
        x = torch.randn(1, 4, 32, requires_grad=True)
        with pytest.raises(LoralagError, match="router 'arrow-mix' mixes adapters and passes no gradient"):
            model(inputs_embeds=x)
        with torch.no_grad():  # inference is unchanged
            model(inputs_embeds=x)
    finally:
        detach(model)
