"""Where the routers sent the subject's tokens and the answer's positions: routing to the gold adapter per
method, library and layer, from the runs' traces.
"""

from __future__ import annotations

import copy
import re

# libraries up to this many adapters (the task library) also get, at the answer positions, where each gold
# adapter's decisions went (a confusion table); a knowledge library's would be N × N
CONFUSION_MAX = 16


# -- routing statistics ----------------------------------------------------------------------------------------
def layer_of(module: str) -> int:
    for part in module.split("."):
        if part.isdigit():
            return int(part)
    return -1


def subject_mask(tokenizer, prompts: list[str], mentions: list[list[str]], width: int, lengths=None):
    """(batch, width) bool: prompt tokens that overlap a mention of the subject, for left-padded prompts.

    lengths: the real tokens of each prompt in the batch that was run (checked against this tokenization)."""
    import torch

    mask = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, (prompt, names) in enumerate(zip(prompts, mentions)):
        enc = tokenizer(prompt, add_special_tokens=True, return_offsets_mapping=True)
        n = len(enc["input_ids"])
        if lengths is not None and int(lengths[i]) != n:
            raise RuntimeError(f"prompt {i} has {int(lengths[i])} tokens in the batch but {n} alone")
        pad = width - n
        spans = []
        for name in sorted(set(names), key=len, reverse=True):
            for m in re.finditer(re.escape(name), prompt):
                spans.append((m.start(), m.end()))
        for t, (a, b) in enumerate(enc["offset_mapping"]):
            if b > a and any(a < e and b > s for s, e in spans):
                mask[i, pad + t] = True
    return mask


def answer_mask(trace):
    """(batch, decisions) bool: the routing decisions that produced a real answer token. The decision at column c
    (the last prompt token, then each generated token fed back) yields token c + 1, so it counts where that
    token is real (generate's mask: up to and including the first end token)."""
    import torch

    width = trace.winner_matrix(*trace.keys[0]).shape[1]
    full = trace.attention_mask.bool()
    mask = torch.zeros(full.shape[0], width, dtype=torch.bool)
    start = trace.prompt_length - 1
    stop = min(width, full.shape[1] - 1)
    mask[:, start:stop] = full[:, start + 1 : stop + 1]
    return mask


def votes_from_trace(trace, library: str, prompt_mask) -> list[str | None]:
    """RoutingState.vote's rule on an existing trace: per sequence, the adapter that won most (token, module)
    decisions over the real prompt tokens; ties to the name that sorts first."""
    import torch

    width = trace.winner_matrix(trace.modules(library)[0], library).shape[1]
    out = []
    for seq in range(prompt_mask.shape[0]):
        mask = torch.zeros(width, dtype=torch.bool)
        mask[: prompt_mask.shape[1]] = prompt_mask[seq].bool()
        counts = trace.counts(library, seq, mask)
        out.append(min(counts.items(), key=lambda kv: (-kv[1], kv[0]))[0] if counts else None)
    return out


class RoutingStats:
    """Per method and library: per layer, decisions routed to the gold adapter among subject tokens, prompt tokens
    and answer positions (the decisions that produced an answer token); and, over every module, how the answer
    positions' decisions spread over the adapters, beside how the gold adapters of the same decisions spread (a
    few "hub" adapters drawing many questions' answers is what routing accuracy alone does not show); for a small
    library (≤ CONFUSION_MAX adapters), where each gold adapter's answer-position decisions went."""

    def __init__(self, data: dict | None = None):
        self.data: dict = data if data is not None else {}

    def merge(self, other: dict) -> None:
        """Add another share's counts (same questions never counted twice: shares split the batches)."""
        for method, libs in other.items():
            for lib, d in libs.items():
                mine = self.data.setdefault(method, {}).setdefault(lib, None)
                if mine is None:
                    self.data[method][lib] = copy.deepcopy(d)
                    continue
                for key, v in d.items():
                    if isinstance(v, dict):  # answer_wins, answer_gold, answer_confusion: tallies
                        mine[key] = _added(mine.get(key, {}), v)
                    elif isinstance(v, list):
                        mine[key] = [a + b for a, b in zip(mine[key], v)]
                    else:
                        mine[key] = mine[key] + v

    def _slot(self, method: str, lib: str, layers: int) -> dict:
        d = self.data.setdefault(method, {}).setdefault(lib, {})
        if not d:
            d.update(
                subject_hits=[0] * layers,
                subject_total=[0] * layers,
                prompt_hits=[0] * layers,
                prompt_total=[0] * layers,
                answer_hits=[0] * layers,
                answer_total=[0] * layers,
                answer_wins={},
                answer_gold={},
                answer_confusion={},
                vote_hits=0,
                vote_total=0,
            )
        return d

    def add_trace(
        self, method: str, lib: str, trace, gold: list[str], prompt_mask, subj_mask, layers: int, answer=None
    ) -> None:
        import torch

        d = self._slot(method, lib, layers)
        width = prompt_mask.shape[1]
        for module in trace.modules(lib):
            names = trace.names[(module, lib)]
            index = {n: i for i, n in enumerate(names)}
            g = torch.tensor([index.get(x, -2) for x in gold]).unsqueeze(1)
            full = trace.winner_matrix(module, lib)
            w = full[:, :width]
            hit = w == g
            if answer is not None:
                d["answer_hits"][layer_of(module)] += int(((full == g) & answer).sum())
                d["answer_total"][layer_of(module)] += int(answer.sum())
                _tally(d["answer_wins"], names, full[answer])
                _tally(d["answer_gold"], names, g.expand_as(full)[answer])
                if len(names) <= CONFUSION_MAX:
                    for gi in g.unique().tolist():
                        if gi >= 0:
                            row = d["answer_confusion"].setdefault(names[gi], {})
                            _tally(row, names, full[answer & (g == gi)])
            L = layer_of(module)
            pm, sm = prompt_mask.bool(), subj_mask.bool() & prompt_mask.bool()
            d["prompt_hits"][L] += int((hit & pm).sum())
            d["prompt_total"][L] += int(pm.sum())
            d["subject_hits"][L] += int((hit & sm).sum())
            d["subject_total"][L] += int(sm.sum())

    def add_votes(self, method: str, lib: str, votes: list, gold: list[str], layers: int) -> None:
        d = self._slot(method, lib, layers)
        d["vote_hits"] += sum(v == g for v, g in zip(votes, gold))
        d["vote_total"] += len(gold)

    def summary(self) -> dict:
        out = {}
        for method, libs in self.data.items():
            for lib, d in libs.items():

                def share(h, t):
                    return [hh / tt if tt else None for hh, tt in zip(h, t)]

                sh, th = sum(d["subject_hits"]), sum(d["subject_total"])
                ph, pt = sum(d["prompt_hits"]), sum(d["prompt_total"])
                ah, at = sum(d.get("answer_hits", [0])), sum(d.get("answer_total", [0]))
                out.setdefault(method, {})[lib] = {
                    "subject_by_layer": share(d["subject_hits"], d["subject_total"]),
                    "prompt_by_layer": share(d["prompt_hits"], d["prompt_total"]),
                    "answer_by_layer": share(d.get("answer_hits", []), d.get("answer_total", [])),
                    "subject": sh / th if th else None,
                    "prompt": ph / pt if pt else None,
                    "answer": ah / at if at else None,
                    "subject_tokens": th,
                    **hubs(d.get("answer_wins", {}), d.get("answer_gold", {})),
                    "answer_confusion": confusion(d.get("answer_confusion", {})),
                    "vote": d["vote_hits"] / d["vote_total"] if d["vote_total"] else None,
                    "vote_hits": d["vote_hits"],
                    "vote_total": d["vote_total"],
                }
        return out


def _tally(counts: dict, names: list[str], picks) -> None:
    """Add each adapter index in `picks` (a gold missing from the bank is -2, no pick -1: not counted) to counts."""
    import torch

    for i, n in zip(*torch.unique(picks, return_counts=True)):
        if i >= 0:
            counts[names[int(i)]] = counts.get(names[int(i)], 0) + int(n)


def _added(a: dict, b: dict) -> dict:
    """Two tallies (adapter -> decisions, or gold adapter -> such a tally) summed key by key."""
    return {
        k: _added(a.get(k, {}), b.get(k, {})) if isinstance(a.get(k, b.get(k)), dict) else a.get(k, 0) + b.get(k, 0)
        for k in a.keys() | b.keys()
    }


def confusion(tally: dict) -> dict:
    """{gold adapter: {chosen adapter: share of that gold adapter's decisions}}, rows by name, each row's shares
    ranked as hubs() ranks them; rows without a decision left out."""
    from loralag.routing.trace import shares_and_entropy  # imports torch: kept out of module import

    rows = {g: shares_and_entropy(row)[0] for g, row in sorted(tally.items())}
    return {g: row for g, row in rows.items() if row}


def hubs(wins: dict, gold: dict) -> dict:
    """The answer positions' decisions over the adapters: the most-chosen adapter and its share, the ten most
    chosen's share, how many adapters won any; and the same two shares had every decision gone to its gold adapter
    (the questions' own spread, the reference). Ranked as generate's and the server's routing summaries rank."""
    from loralag.routing.trace import shares_and_entropy  # imports torch: kept out of module import

    won, _ = shares_and_entropy(wins)
    golds, _ = shares_and_entropy(gold)

    def first_and_top(shares):
        ranked = list(shares.values())
        return (ranked[0], sum(ranked[:10])) if ranked else (None, None)

    first, first_top = first_and_top(won)
    gold_first, gold_top = first_and_top(golds)
    return {
        "answer_hub": next(iter(won), None),
        "answer_hub_share": first,
        "answer_top10_share": first_top,
        "answer_adapters": len(won),
        "answer_gold_hub_share": gold_first,
        "answer_gold_top10_share": gold_top,
    }
