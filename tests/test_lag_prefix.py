"""lag-prefix against a brute-force reference: dense float64 LAG per (token, module), counted by hand."""

from collections import Counter

import pytest
import torch
from conftest import save_lora, tiny_llama
from transformers import DynamicCache

from loralag import attach, build_library, detach, read_adapter
from loralag.library.store import module_shapes
from loralag.models import cache_kwarg

KNOW = ("gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model = tiny_llama()
    model.generation_config.eos_token_id = None
    folder = tmp_path_factory.mktemp("prefix")
    paths = [
        save_lora(model, folder / "ads" / f"a{i}", seed=300 + i, r=3, alpha=6, target_modules=KNOW) for i in range(6)
    ]
    lib = build_library(
        folder / "lib", [folder / "ads"], base_model="tiny", shapes=module_shapes(model), progress=False
    )
    adapters = {p.name: read_adapter(p) for p in paths}
    return model, lib, adapters


def _kv(model, cache) -> dict:
    return {cache_kwarg(model): cache}


class Reference:
    """Swap every targeted module for one that runs LAG densely per token, keeps per-sequence Counters of LAG's
    picks (earlier calls: all modules; this call: tokens up to t, modules up to this one) and applies the most
    counted adapter, ties to the token's own pick."""

    def __init__(self, model, lib, adapters, k):
        self.model, self.names, self.k = model, lib.names, k
        self.counts = None  # per sequence: Counter over the earlier calls
        self.originals = {}
        for name in module_shapes(model):
            dense = [
                adapters[a].modules[name].scale * adapters[a].modules[name].B @ adapters[a].modules[name].A
                for a in self.names
                if name in adapters[a].modules
            ]
            if dense:
                parent, _, child = name.rpartition(".")
                self.originals[name] = getattr(model.get_submodule(parent), child)
                setattr(model.get_submodule(parent), child, _Module(self, self.originals[name], dense))

    def run(self, ids, mask, cache=None):
        B, T = ids.shape
        if self.counts is None:
            self.counts = [Counter() for _ in range(B)]
        self.call = [[Counter() for _ in range(T)] for _ in range(B)]  # picks per token over this call's modules
        self.mask = mask[:, -T:]
        with torch.no_grad():
            out = self.model(input_ids=ids, attention_mask=mask, **_kv(self.model, cache), use_cache=cache is not None)
        for b in range(B):
            for t in range(T):
                self.counts[b].update(self.call[b][t])
        return out

    def close(self):
        for name, orig in self.originals.items():
            parent, _, child = name.rpartition(".")
            setattr(self.model.get_submodule(parent), child, orig)


class _Module(torch.nn.Module):
    def __init__(self, ref, base, dense):
        super().__init__()
        self.ref, self.base, self.dense = ref, base, dense
        # the dense SVD of each s·B·A, once: its first right singular vector is the arrow, its top rows A*
        svds = [torch.linalg.svd(W.double())[2] for W in dense]
        ranks = [int(torch.linalg.matrix_rank(W.double(), rtol=1e-5)) for W in dense]
        self.vh = [Vh[:r] for Vh, r in zip(svds, ranks)]

    def lag_pick(self, x):
        xd = x.double()
        arrow = torch.stack([abs(Vh[0] @ xd) for Vh in self.vh])
        cand = arrow.topk(min(self.ref.k, len(self.vh))).indices.tolist()
        return max(cand, key=lambda i: float((self.vh[i] @ xd).norm()))

    def forward(self, x):
        ref = self.ref
        B, T, _ = x.shape
        out = self.base(x)
        for b in range(B):
            for t in range(T):
                own = self.lag_pick(x[b, t])
                if ref.mask[b, t]:
                    ref.call[b][t][own] += 1
                seen = Counter(ref.counts[b])
                for tt in range(t + 1):
                    seen.update(ref.call[b][tt])
                top = max(seen.values(), default=0)
                best = own if seen[own] == top else min(i for i, v in seen.items() if v == top)
                out[b, t] += (self.dense[best].double() @ x[b, t].double()).float()
        return out


@pytest.mark.parametrize("batch", [1, 2])  # one sequence decodes through the one-token path
def test_prefill_and_decoding_equal_the_reference(setup, batch):
    model, lib, adapters = setup
    g = torch.Generator().manual_seed(11)
    ids = torch.randint(1, 97, (2, 9), generator=g)[:batch]
    mask = torch.ones_like(ids)
    mask[1:, :3] = 0  # left padding: its tokens must not vote
    nxt = torch.randint(1, 97, (2, 1), generator=g)[:batch]
    mask2 = torch.cat([mask, torch.ones(batch, 1, dtype=torch.long)], 1)

    ref = Reference(model, lib, adapters, k=2)
    try:
        want1 = ref.run(ids, mask, DynamicCache())
        want2 = ref.run(nxt, mask2, want1.past_key_values)
    finally:
        ref.close()
    attach(model, lib, router="lag-prefix", k=2)
    try:
        with torch.no_grad():
            got1 = model(input_ids=ids, attention_mask=mask, **_kv(model, DynamicCache()), use_cache=True)
            got2 = model(input_ids=nxt, attention_mask=mask2, **_kv(model, got1.past_key_values), use_cache=True)
        plain = None
        with torch.no_grad():
            plain = model(input_ids=ids, attention_mask=mask).logits  # no cache: fresh sequences again
    finally:
        detach(model)
    real = mask.bool()
    torch.testing.assert_close(got1.logits[real], want1.logits[real], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got2.logits, want2.logits, atol=1e-4, rtol=1e-4)
    assert (
        want2.logits - model(input_ids=nxt, attention_mask=mask2, **_kv(model, _plain_cache(model, ids, mask))).logits
    ).abs().max() > 1e-3
    torch.testing.assert_close(plain[real], want1.logits[real], atol=1e-4, rtol=1e-4)  # the state was reset


@pytest.mark.parametrize("batch", [1, 2])
def test_many_decoding_steps_after_a_short_prompt_equal_the_reference(setup, batch):
    """With a 2-token prompt the decoded tokens' own votes decide: every step must count them."""
    model, lib, adapters = setup
    g = torch.Generator().manual_seed(21)
    ids = torch.randint(1, 97, (batch, 2), generator=g)
    steps = torch.randint(1, 97, (batch, 5), generator=g)
    mask = torch.ones_like(ids)

    def run(forward):
        outs, cache, m = [], DynamicCache(), mask
        out = forward(ids, m, cache)
        outs.append(out.logits[:, -1])
        for s in range(steps.shape[1]):
            m = torch.cat([m, torch.ones(batch, 1, dtype=torch.long)], 1)
            out = forward(steps[:, s : s + 1], m, out.past_key_values)
            outs.append(out.logits[:, -1])
        return torch.stack(outs)

    ref = Reference(model, lib, adapters, k=2)
    try:
        want = run(ref.run)
    finally:
        ref.close()
    attach(model, lib, router="lag-prefix", k=2)
    try:
        with torch.no_grad():
            got = run(lambda i, m, c: model(input_ids=i, attention_mask=m, **_kv(model, c), use_cache=True))
    finally:
        detach(model)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def _plain_cache(model, ids, mask):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, **_kv(model, DynamicCache()), use_cache=True).past_key_values


def test_differs_from_lag_and_counts_lag_picks(setup):
    """The router must actually move tokens off LAG's own pick, and what it applies is the running vote."""
    model, lib, _ = setup
    ids = torch.randint(1, 97, (1, 24), generator=torch.Generator().manual_seed(12))
    state = attach(model, lib, router="lag", k=2)
    try:
        with state.tracing() as lag_trace, torch.no_grad():
            model(input_ids=ids)
        state.set_router(None, "lag-prefix")
        with state.tracing() as pre_trace, torch.no_grad():
            model(input_ids=ids)
    finally:
        detach(model)
    module = lag_trace.modules(lib.name)[0]  # the first module: LAG sees the same input under both routers
    own = lag_trace.winner_matrix(module, lib.name)[0]
    got = pre_trace.winner_matrix(module, lib.name)[0]
    counts = Counter()
    for t in range(len(own)):
        counts[int(own[t])] += 1
        top = max(counts.values())
        want = int(own[t]) if counts[int(own[t])] == top else min(i for i, v in counts.items() if v == top)
        assert int(got[t]) == want
    assert not torch.equal(own, got)


def test_generate_is_repeatable_and_batch_independent(setup):
    """A second generate starts fresh (no counts carried over), and a padded batch answers as each prompt alone."""
    model, lib, _ = setup
    a = torch.randint(1, 97, (1, 9), generator=torch.Generator().manual_seed(4))
    b = torch.randint(1, 97, (1, 5), generator=torch.Generator().manual_seed(5))
    batch = torch.cat([a, torch.cat([torch.zeros(1, 4, dtype=torch.long), b], dim=1)])
    mask = (torch.arange(9) >= torch.tensor([[0], [4]])).long()
    attach(model, lib, router="lag-prefix", k=2)
    try:
        with torch.no_grad():
            kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
            out = model.generate(batch, attention_mask=mask, **kw)
            again = model.generate(batch, attention_mask=mask, **kw)
            single_a = model.generate(a, **kw)
            single_b = model.generate(b, **kw)
    finally:
        detach(model)
    assert torch.equal(out, again)
    assert torch.equal(out[0, 9:], single_a[0, 9:])
    assert torch.equal(out[1, 9:], single_b[0, 5:])
