"""Routing trace: which adapter each token chose at each module, with its score, and summaries."""

from __future__ import annotations

import math
from collections import Counter, defaultdict

import torch


def shares_and_entropy(counts) -> tuple[dict, float]:
    """{adapter: share of the routed decisions}, most used first (ties by name), and the entropy of the shares in
    nats: the one summary of a routing that generate, eval and the server all report."""
    total = sum(counts.values())
    if not total:
        return {}, 0.0
    shares = {n: v / total for n, v in sorted(((n, v) for n, v in counts.items() if v), key=lambda kv: (-kv[1], kv[0]))}
    return shares, max(0.0, -sum(p * math.log(p) for p in shares.values()))  # one adapter: 0, not -0


class RoutingTrace:
    """Collects winners per (module, library) across forward calls (prefill, then each decoding step)."""

    def __init__(self, names: dict[tuple[str, str], list[str]]):
        self.names = names  # (module, library) -> adapter names of that bank, by index
        self.winners: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)
        self.scores: dict[tuple[str, str], list[torch.Tensor]] = defaultdict(list)

    def record(self, module: str, library: str, winner: torch.Tensor, score: torch.Tensor) -> None:
        self.winners[(module, library)].append(winner.detach().cpu())
        self.scores[(module, library)].append(score.detach().float().cpu())

    @property
    def keys(self) -> list[tuple[str, str]]:
        return list(self.winners)

    def winner_matrix(self, module: str, library: str) -> torch.Tensor:
        """(batch, tokens) adapter indices over all recorded steps."""
        return torch.cat(self.winners[(module, library)], dim=1)

    def score_matrix(self, module: str, library: str) -> torch.Tensor:
        return torch.cat(self.scores[(module, library)], dim=1)

    def adapter_names(self, module: str, library: str, seq: int) -> list[str | None]:
        names = self.names[(module, library)]
        return [names[i] if i >= 0 else None for i in self.winner_matrix(module, library)[seq].tolist()]

    def libraries(self) -> list[str]:
        return sorted({lib for _, lib in self.winners})

    def modules(self, library: str) -> list[str]:
        return [m for m, lib in self.winners if lib == library]

    def counts(self, library: str, seq: int, mask: torch.Tensor | None = None) -> Counter:
        """Tokens routed to each adapter of `library` in sequence `seq`, over every module.

        `mask` (tokens,) marks the positions to count (e.g. the attention mask, to skip padding)."""
        c: Counter = Counter()
        for module in self.modules(library):
            names = self.names[(module, library)]
            w = self.winner_matrix(module, library)[seq]
            if mask is not None:
                w = w[mask[: len(w)].bool()]
            for i, n in zip(*torch.unique(w, return_counts=True)):
                if i >= 0:
                    c[names[i]] += int(n)
        return c

    def summary(self, seq: int = 0, mask: torch.Tensor | None = None) -> dict[str, dict]:
        """Per library: adapters used with their share of routed tokens, and the entropy of that share."""
        out = {}
        for lib in self.libraries():
            c = self.counts(lib, seq, mask)
            shares, entropy = shares_and_entropy(c)
            out[lib] = {"adapters": len(shares), "shares": shares, "entropy": entropy, "routed": sum(c.values())}
        return out

    def summary_lines(
        self, seq: int = 0, mask: torch.Tensor | None = None, libraries: list[str] | None = None, top: int = 5
    ) -> list[str]:
        """Per library: adapters used, routed token×module decisions and entropy; then the top adapters' shares."""
        summary = self.summary(seq, mask)
        lines = []
        for lib in libraries if libraries is not None else self.libraries():
            s = summary[lib]
            if not s["routed"]:
                lines.append(f"{lib}: no single adapter chosen ({len(self.modules(lib))} modules)")
                continue
            shares = list(s["shares"].items())
            best = " · ".join(f"{n} {v:.0%}" for n, v in shares[:top])
            more = f" · +{len(shares) - top} more" if len(shares) > top else ""
            lines.append(
                f"{lib}: {s['adapters']} adapter{'s' if s['adapters'] != 1 else ''} used, {s['routed']} token×module "
                f"decisions, entropy {s['entropy']:.2f} nats"
            )
            lines.append(f"  {best}{more}")
        return lines

    def describe(self, seq: int = 0, top: int = 5) -> str:
        """A readable summary of sequence `seq`'s routing, one block per library (what `summary` holds, formatted):

            knowledge: 2 adapters used, 1080 token×module decisions, entropy 0.35 nats
              velmora 88% · zarnovia 12%

        A trace made by `loralag.generate.generate(trace=True)` counts only real tokens (no padding)."""
        mask = getattr(self, "attention_mask", None)
        return "\n".join(self.summary_lines(seq, None if mask is None else mask[seq], top=top))
