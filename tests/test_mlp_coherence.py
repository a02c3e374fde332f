"""benchmarks/mlp_coherence.py's probe: one knowledge pick per MLP (the gate projection's LAG pick applied at up and
down too) against a brute-force per-token reference of LAG's equations, and its agreement count by hand."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from conftest import save_lora, tiny_llama
from test_routers import dense_deltas, logits_with, reference_delta

from loralag import attach, build_library, detach, read_adapter
from loralag.library.store import module_shapes
from loralag.routing.trace import RoutingTrace

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from mlp_coherence import PROJECTIONS, Agreement, one_pick_per_mlp  # noqa: E402


class _OnePickReference(torch.nn.Module):
    """The gate projection picks per token by LAG's equations (float64, dense SVDs); up and down apply its pick."""

    def __init__(self, base, dense, picks: dict, mlp: str, decides: bool, k: int):
        super().__init__()
        self.base, self.dense, self.picks, self.mlp, self.decides, self.k = base, dense, picks, mlp, decides, k

    def forward(self, x):
        flat = x.reshape(-1, x.shape[-1])
        if self.decides:
            self.picks[self.mlp] = [reference_delta("lag", self.dense, t, self.k)[1] for t in flat]
        delta = torch.stack([(self.dense[j].double() @ t.double()).float() for j, t in zip(self.picks[self.mlp], flat)])
        return self.base(x) + delta.view(*x.shape[:-1], -1)


def _reference_logits(model, adapters, k, ids):
    picks = {}  # per MLP: the gate projection's picks for the tokens of the current call

    def wrap(name, base):
        mlp, _, projection = name.rpartition(".")
        if projection not in PROJECTIONS:
            return None
        return _OnePickReference(base, dense_deltas(adapters, name), picks, mlp, projection == "gate_proj", k)

    return logits_with(model, wrap, ids)


def test_one_pick_per_mlp_applies_the_gate_pick_at_up_and_down(tmp_path, ids):
    model = tiny_llama()
    for i in range(6):
        save_lora(model, tmp_path / "ads" / f"a{i}", seed=30 + i, r=2 + i % 3, alpha=4 + i, target_modules=PROJECTIONS)
    lib = build_library(
        tmp_path / "lib", [tmp_path / "ads"], base_model="tiny", shapes=module_shapes(model), progress=False
    )
    adapters = [read_adapter(tmp_path / "ads" / f"a{i}") for i in range(6)]
    state = attach(model, {"knowledge": lib}, router="lag", k=3)
    try:
        with torch.no_grad():
            per_module = model(ids).logits
            with one_pick_per_mlp(), state.tracing() as trace:
                coherent = model(ids).logits
        after = model(ids).logits  # the context restored per-module routing
    finally:
        detach(model)
    reference = _reference_logits(model, adapters, 3, ids)
    torch.testing.assert_close(coherent, reference, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(after, per_module)
    assert (coherent - per_module).abs().max() > 1e-3  # per-module LAG picks differently somewhere: not a no-op
    for module in trace.modules("knowledge"):
        mlp = module.rsplit(".", 1)[0]
        gate = trace.winner_matrix(f"{mlp}.gate_proj", "knowledge")
        assert torch.equal(trace.winner_matrix(module, "knowledge"), gate), module


def test_agreement_counts_by_hand():
    trace = RoutingTrace({})
    picks = {  # one sequence, a prompt of 3 tokens then 2 answer tokens: answer positions are tokens 2, 3, 4
        "layers.0.mlp": ([9, 9, 1, 2, 3], [9, 9, 1, 2, 4], [9, 9, 1, 5, 3]),
        "layers.1.mlp": ([0, 0, 7, 7, 7], [0, 0, 7, 3, 7], [0, 0, 3, 3, 7]),
    }
    for mlp, per in picks.items():
        for projection, winners in zip(PROJECTIONS, per):
            trace.record(f"{mlp}.{projection}", "knowledge", torch.tensor([winners]), torch.zeros(1, 5))
    agree = Agreement()
    agree(trace, prompt_length=3, gold=3)
    # (layer, token) at tokens 2..4: layer 0 (1,1,1) (2,2,5) (3,4,3); layer 1 (7,7,3) (7,3,3) (7,7,7)
    assert agree.shares() == {"decisions": 6, "all_three_same": 2 / 6, "gate_up_same": 4 / 6, "gold_in_any": 3 / 6}
