"""The state behind the `lag-prefix` router: each sequence's LAG picks so far, per library.

`lag-prefix` routes every token at every layer, causally, like `lag`, but lets the token's choice draw on what
the sequence has already shown: at token t and module m it applies the adapter that LAG itself picked most
often over

  * every (token, module) decision of the earlier forward calls of this sequence (the prompt, once decoding),
  * the decisions of this call's tokens up to t at the modules up to m (in the order the model runs them),

the token's own LAG pick included, which also wins any tie. This is the sequence vote (`fix_by_vote`, which
serves a whole sequence with its prompt's most-voted adapter) made causal: no second pass over the prompt,
each decision uses only tokens before it, and the state is one count vector per sequence and library that
travels with the KV cache. A prompt prefilled in one call therefore routes as generation does; the same
prompt fed in several calls sees more evidence at its later chunks (all layers of the earlier ones).

Counts are of LAG's own picks, not of the adapters applied, so one early pick cannot lock a sequence in.
"""

from __future__ import annotations

import torch

TIE = 0.5  # added to the token's own LAG pick: counts are integers, so this only breaks ties in its favour


class PrefixEvidence:
    """One library's counts: `counts` (batch, n) over the earlier calls, `call` (batch, T, n) within this one."""

    def __init__(self, n: int):
        self.n = n  # adapters in the library (library index space)
        self.counts: torch.Tensor | None = None  # (batch, n) float32; None: fresh sequences
        self.call: torch.Tensor | None = None  # (batch, T, n) LAG picks of this call's tokens, summed over modules
        self.token_mask: torch.Tensor | None = None  # (batch, T) real tokens of this call (padding does not vote)

    def reset(self) -> None:
        self.counts = None
        self.call = None

    def begin(self, token_mask: torch.Tensor | None) -> None:
        """A forward call starts (token_mask: which of its (batch, T) positions are real tokens)."""
        self.call = None
        self.token_mask = token_mask

    def end(self) -> None:
        """A forward call ended: its picks join the counts the next calls see."""
        if self.call is None:
            return
        total = self.call.sum(1)
        self.counts = total if self.counts is None else self.counts + total
        self.call = None

    def pick(
        self, own: torch.Tensor, batch: int, members: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Record LAG's picks `own` (batch·T,) in library indices (-1: none) at the module being run, and return
        the adapter each token applies, the most picked over its prefix (ties to its own pick), with its count.
        members: the library indices of the module's bank, when it holds only some adapters (or another order):
        the pick is then among those, returned as an index into them."""
        T = len(own) // batch
        if batch * T == 1:
            return self._pick_one(int(own[0]), members)
        own = own.view(batch, T)
        if self.call is None or self.call.shape[:2] != (batch, T):
            self.call = torch.zeros(batch, T, self.n)
        vote = (own >= 0).to(self.call.dtype)
        mask = self._mask(batch, T)
        if mask is not None:
            vote = vote * mask
        self.call.scatter_add_(2, own.clamp(min=0).unsqueeze(-1), vote.unsqueeze(-1))
        score = self.call.cumsum(1) if T > 1 else self.call.clone()
        if self.counts is not None:
            if self.counts.shape[0] != batch:
                raise RuntimeError(
                    f"lag-prefix holds counts for {self.counts.shape[0]} sequences but the batch has "
                    f"{batch}; a new batch must start with a fresh cache (or set_rows)"
                )
            score += self.counts.unsqueeze(1)
        score.scatter_add_(2, own.clamp(min=0).unsqueeze(-1), (vote * TIE).unsqueeze(-1))
        if members is not None:
            score = score.index_select(2, members)
        count, best = score.max(-1)
        return torch.where(own >= 0, best, own).view(-1), count.view(-1)

    def _pick_one(self, own: int, members: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """pick() for one decoding token of one sequence, in numpy: a handful of torch ops per module cost more
        than the arithmetic here (about 20 µs of a decoding step's ~100 µs per module at N=1,000)."""
        if self.call is None or self.call.shape[:2] != (1, 1):
            self.call = torch.zeros(1, 1, self.n)
        row = self.call.numpy()[0, 0]
        masked = self.token_mask is not None and self.token_mask.shape == (1, 1) and not bool(self.token_mask[0, 0])
        if own < 0:
            return torch.tensor([own]), torch.zeros(1)
        if not masked:
            row[own] += 1
        score = row + self.counts.numpy()[0] if self.counts is not None else row.copy()
        if not masked:
            score[own] += TIE
        if members is not None:
            score = score[members.numpy()]
        best = int(score.argmax())
        return torch.tensor([best]), torch.tensor([float(score[best])])

    def _mask(self, batch: int, T: int) -> torch.Tensor | None:
        m = self.token_mask
        if m is None or m.shape != (batch, T):
            return None
        return m.to(torch.float32)

    # -- for engines that add and remove sequences between calls (continuous batching) --------------------------
    def rows(self) -> list[torch.Tensor | None]:
        """Each sequence's counts, to keep with its KV cache."""
        if self.counts is None:
            return []
        return list(self.counts.unbind(0))

    def set_rows(self, rows: list[torch.Tensor | None]) -> None:
        """The counts of the sequences of the next call, in batch order (None: a sequence with none yet)."""
        if not rows or all(r is None for r in rows):
            self.counts = None
            return
        self.counts = torch.stack([r if r is not None else torch.zeros(self.n) for r in rows])
