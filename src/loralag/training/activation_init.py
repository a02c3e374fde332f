"""Data-aware LoRA inits: `TrainConfig(init="activations")`, `init="contrast"` and `init="salient"`.

PEFT's default init draws each adapter's A at random (B = 0). After a few dozen steps A has barely moved, so an
adapter's A* rows, which LAG's routers read (the arrow `|a·x|`, SpectR's `‖A*x‖`), are mostly the random
draw's directions: they say little about what the adapter learned. Here A's rows start as the top-r right
singular vectors of the base model's own inputs to that module over the item's training tokens (the
directions its text occupies most), at the norm PEFT gives A's rows; B stays 0, so training starts from the
base model exactly as with PEFT's init. The directions depend only on the base model and the item, never on
the other adapters or the training order. (PEFT's EVA init is the same idea for one fine-tuning run: it
centres the inputs and redistributes ranks across layers, and fits them by incremental PCA over a stream of
batches; an adapter's own few examples are decomposed here exactly, in one pass, uncentred: a text's mean
direction is part of what tells it apart.)

init="contrast" keeps the idea but reads the directions where the item's inputs have the most energy
*relative to generic text* (the base model's own samples): the top directions of a text's inputs are mostly
those every text shares, so "activations" makes all adapters' arrows alike; "contrast" aims at what is the
item's own. Against a library's own texts instead (`TrainConfig.contrast_against`, e.g. every task family's
pairs), it aims at what tells the item from the rest of its library rather than from any text.
"""

from __future__ import annotations

import hashlib
import json
import weakref

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

# contrast_rows' reference: the base model's own samples, and how much of Σ_ref's mean eigenvalue is added to it
REFERENCE_SEQUENCES, REFERENCE_LENGTH = 8, 256
CONTRAST_SHRINK = 0.1


@torch.no_grad()
def activation_rows(
    model, examples, targets: list[str], r: int, pad_id: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """{module name: (r, d_in) float32}: per target nn.Linear of `model`, the top-r right singular vectors of
    its inputs at every real token of `examples` ((ids, labels) pairs), rows of unit norm, each signed so its
    largest entry is positive. A module that saw fewer than r tokens gets zero rows after those (PEFT's own
    rows stay there, see train._set_init_rows)."""
    moments, reads = input_moments(model, examples, targets, pad_id, batch_size)
    done = {owner: _signed_rows(m.top(r), r) for owner, m in moments.items()}
    return {name: done[owner] for name, owner in reads.items()}


@torch.no_grad()
def contrast_rows(
    model,
    examples,
    targets: list[str],
    r: int,
    pad_id: int,
    batch_size: int,
    shrink: float = CONTRAST_SHRINK,
    reference=None,
) -> dict[str, torch.Tensor]:
    """{module name: (r, d_in) float32}: per target module, the r directions v where the item's inputs have
    the most energy relative to generic text's, max vᵀΣ_item v / vᵀ(Σ_ref + δI) v (the top generalised
    eigenvectors; Σ: second moments per token, Σ_ref over `reference` ((ids, labels) examples; None:
    reference_examples(model)), δ = shrink × the mean eigenvalue of Σ_ref), rows of unit norm, signed as
    activation_rows'. What the item shares with any text (the model's large common directions) scores low;
    what is its own scores high."""
    return _contrast(model, examples, targets, r, pad_id, batch_size, shrink, False, reference)


@torch.no_grad()
def salient_rows(
    model,
    examples,
    targets: list[str],
    r: int,
    pad_id: int,
    batch_size: int,
    shrink: float = CONTRAST_SHRINK,
    reference=None,
) -> dict[str, torch.Tensor]:
    """contrast_rows with each token's inputs weighted by the base model's loss on the token it predicts (its
    label's negative log-likelihood; 0 where it predicts none): Σ_item = Σ_t w_t x_t x_tᵀ / Σ_t w_t. The inputs
    where the item says what the base model does not know (a fact's object after its subject and relation) are
    those B's first gradients come from, and those the model is in when it must recall the item's knowledge."""
    return _contrast(model, examples, targets, r, pad_id, batch_size, shrink, True, reference)


def _contrast(model, examples, targets, r, pad_id, batch_size, shrink, weighted: bool, reference):
    weights = _label_losses(model, examples, pad_id, batch_size) if weighted else None
    moments, reads = input_moments(model, examples, targets, pad_id, batch_size, weights)
    whiten = _reference_whitening(model, tuple(targets), batch_size, shrink, reference, pad_id)
    done = {owner: _signed_rows(m.top(r, whiten[owner]), r) for owner, m in moments.items()}
    return {name: done[owner] for name, owner in reads.items()}


@torch.no_grad()
def _label_losses(model, examples, pad_id: int, batch_size: int) -> list[torch.Tensor]:
    """Per batch of `examples` (as input_moments reads them): (batch, T) float64, at each position the base
    model's NLL of the next token where that token is a label, else 0."""
    from loralag.training.train import _collate

    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(examples), batch_size):
            batch = _collate(examples[start : start + batch_size], pad_id)
            logits = model(
                input_ids=batch["input_ids"].to(model.device),
                attention_mask=batch["attention_mask"].to(model.device),
                use_cache=False,
            ).logits.float()
            labels = batch["labels"][:, 1:].to(logits.device)
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels.clamp(min=0), reduction="none"
            ).masked_fill(labels < 0, 0.0)
            out.append(torch.nn.functional.pad(nll, (0, 1)).double().cpu())  # the last position predicts nothing
    finally:
        model.train(was_training)
    return out


class _Moments:
    """One module's inputs over an item, for their top directions: kept as rows while there are no more than
    d_in of them (the SVD of those rows is then the cheaper route), else summed as XᵀX in float64, whose
    eigenvectors are the same directions (memory d_in², whatever the item's length: keeping every row would
    take tokens × d_in per module and layer, gigabytes for a long document)."""

    def __init__(self):
        self.rows: list[torch.Tensor] = []
        self.gram: torch.Tensor | None = None
        self.tokens = 0
        self.total = 0.0  # the rows' total weight: the second moment's denominator

    def add(self, x: torch.Tensor, weight: float | None = None) -> None:
        """x: rows of inputs (each scaled by √w when weighted); weight: their total weight (None: one per row)."""
        self.tokens += len(x)
        self.total += len(x) if weight is None else weight
        if self.gram is not None:
            self.gram += x.T @ x
            return
        self.rows.append(x)
        if self.tokens > x.shape[1]:
            X = torch.cat(self.rows)
            self.gram, self.rows = X.T @ X, []

    def second_moment(self) -> torch.Tensor:
        """Σ = XᵀX / total weight (tokens, unweighted)."""
        if self.gram is not None:
            return self.gram / self.total
        X = torch.cat(self.rows)
        return X.T @ X / self.total

    def top(self, r: int, whiten: torch.Tensor | None = None) -> torch.Tensor:
        """The top min(r, tokens) directions of XᵀX, largest first; whiten (a lower-triangular L): those of
        L⁻¹XᵀXL⁻ᵀ mapped back as v = L⁻ᵀu, i.e. the top generalised eigenvectors of (XᵀX, LLᵀ), unit norm."""
        solve = torch.linalg.solve_triangular
        if self.gram is None:
            X = torch.cat(self.rows)
            if whiten is not None:
                X = solve(whiten, X.T, upper=False).T  # rows L⁻¹x
            v = torch.linalg.svd(X, full_matrices=False).Vh
        else:
            G = self.gram
            if whiten is not None:
                G = solve(whiten, solve(whiten, G, upper=False).T, upper=False)
                G = (G + G.T) / 2
            v = torch.linalg.eigh(G).eigenvectors.flip(1).T  # largest eigenvalues first
        v = v[: min(r, self.tokens)]
        if whiten is not None:
            v = solve(whiten.T, v.T, upper=True).T
            v = v / v.norm(dim=1, keepdim=True)
        return v


def _signed_rows(v: torch.Tensor, r: int) -> torch.Tensor:
    """v's rows, each signed so its largest entry is positive, padded with zero rows to r; float32."""
    sign = torch.sign(v.gather(1, v.abs().argmax(dim=1, keepdim=True)))
    out = torch.zeros(r, v.shape[1], dtype=torch.float64)
    out[: len(v)] = v * sign
    return out.float()


def reference_examples(model, sequences: int = REFERENCE_SEQUENCES, length: int = REFERENCE_LENGTH):
    """Generic text for contrast_rows: the base model's own samples from its BOS token (plain sampling at
    temperature 1 under a fixed seed), as (ids, labels) examples; they depend on the base model alone."""
    config = model.config
    start = next((t for t in (config.bos_token_id, config.eos_token_id) if t is not None), 0)
    start = start[0] if isinstance(start, (list, tuple)) else start
    ids = torch.full((sequences, 1), int(start), dtype=torch.long, device=model.device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                do_sample=True,
                temperature=1.0,
                top_k=0,
                top_p=1.0,
                repetition_penalty=1.0,
                max_new_tokens=length - 1,
                min_new_tokens=length - 1,  # a fixed length: no padding, every token counts
                pad_token_id=int(start),
            )
    finally:
        model.train(was_training)
    return [(row.tolist(), row.tolist()) for row in out.cpu()]


# "model": a weak reference, "key": (targets, shrink, the reference's digest), "factors": {module: L}; one model
_REFERENCE: dict = {}


def _reference_whitening(
    model, targets: tuple, batch_size: int, shrink: float, reference=None, pad_id: int = 0
) -> dict[str, torch.Tensor]:
    """{reading module: L}, the Cholesky factor of Σ_ref + δI over `reference` (None: reference_examples(model)),
    once per model and reference (the model held by a weak reference: another model at a freed one's address
    is not taken for it)."""
    held = _REFERENCE.get("model")
    digest = None if reference is None else hashlib.sha256(json.dumps(reference).encode()).hexdigest()
    if held is None or held() is not model or _REFERENCE["key"] != (targets, shrink, digest):
        examples = reference_examples(model) if reference is None else reference
        moments, _ = input_moments(model, examples, list(targets), pad_id, batch_size)
        factors = {}
        for owner, m in moments.items():
            sigma = m.second_moment()
            d = len(sigma)
            factors[owner] = torch.linalg.cholesky(sigma + shrink * sigma.trace() / d * torch.eye(d, dtype=sigma.dtype))
        _REFERENCE.update(model=weakref.ref(model), key=(targets, shrink, digest), factors=factors)
    return _REFERENCE["factors"]


@torch.no_grad()
def input_moments(model, examples, targets: list[str], pad_id: int, batch_size: int, weights=None):
    """Per target nn.Linear (or GPT-2's Conv1D) of `model`, its inputs at every real token of `examples` as
    _Moments, keyed by the first module that reads each input (q/k/v, gate/up read one tensor: kept once).
    weights: per batch a (batch, T) tensor of token weights (see _label_losses): each input row is scaled by
    √w, so the second moment is the w-weighted one. Returns (moments, {module: the module whose moments it reads})."""
    from loralag.training.train import _collate

    moments: dict[str, _Moments] = {}
    reads: dict[str, str] = {}
    real: dict[str, torch.Tensor] = {}  # the batch's real (not padding) tokens
    # this forward's inputs by identity, each held with its tensor so that no other tensor takes its id
    seen: dict[int, tuple[torch.Tensor, str]] = {}

    def keeper(name):
        def keep(module, args):
            x = args[0]
            if id(x) not in seen:
                seen[id(x)] = (x, name)
                rows = x[real["mask"]].double().cpu()
                if "weight" in real:
                    rows = rows * real["weight"].unsqueeze(1)
                moments.setdefault(name, _Moments()).add(rows, real.get("total"))
            reads[name] = seen[id(x)][1]

        return keep

    hooks = [
        module.register_forward_pre_hook(keeper(name))
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, Conv1D)) and name.rsplit(".", 1)[-1] in targets  # Conv1D: GPT-2's
    ]
    was_training = model.training
    model.eval()
    try:
        for i, start in enumerate(range(0, len(examples), batch_size)):
            batch = _collate(examples[start : start + batch_size], pad_id)
            real["mask"] = batch["attention_mask"].bool().to(model.device)
            if weights is not None:
                w = weights[i][batch["attention_mask"].bool()]
                real["weight"], real["total"] = w.sqrt(), float(w.sum())
            model(input_ids=batch["input_ids"].to(model.device), attention_mask=real["mask"].long(), use_cache=False)
            seen.clear()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    return moments, reads
