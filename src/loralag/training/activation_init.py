"""A data-aware LoRA init: `TrainConfig(init="activations")`.

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
"""

from __future__ import annotations

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


@torch.no_grad()
def activation_rows(
    model, examples, targets: list[str], r: int, pad_id: int, batch_size: int
) -> dict[str, torch.Tensor]:
    """{module name: (r, d_in) float32}: per target nn.Linear of `model`, the top-r right singular vectors of
    its inputs at every real token of `examples` ((ids, labels) pairs), rows of unit norm, each signed so its
    largest entry is positive. A module that saw fewer than r tokens gets zero rows after those (PEFT's own
    rows stay there, see train._set_init_rows).

    The right singular vectors of the inputs X are the eigenvectors of XᵀX, which is summed batch by batch
    in float64: memory d_in² per distinct input, whatever the item's length (keeping X would take tokens ×
    d_in per module and layer: gigabytes for a long document)."""
    from loralag.training.train import _collate

    gram: dict[str, torch.Tensor] = {}  # per reading module: the sum of xᵀx over real tokens, float64
    tokens: dict[str, int] = {}
    reads: dict[str, str] = {}  # module -> the module whose Gram matrix it shares (q/k/v, gate/up: one input)
    real: dict[str, torch.Tensor] = {}  # the batch's real (not padding) tokens
    # this forward's inputs by identity, each held with its tensor so that no other tensor takes its id
    seen: dict[int, tuple[torch.Tensor, str]] = {}

    def keeper(name):
        def keep(module, args):
            x = args[0]
            if id(x) not in seen:
                seen[id(x)] = (x, name)
                rows = x[real["mask"]].double().cpu()
                gram[name] = gram.get(name, 0) + rows.T @ rows
                tokens[name] = tokens.get(name, 0) + len(rows)
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
        for start in range(0, len(examples), batch_size):
            batch = _collate(examples[start : start + batch_size], pad_id)
            real["mask"] = batch["attention_mask"].bool().to(model.device)
            model(input_ids=batch["input_ids"].to(model.device), attention_mask=real["mask"].long(), use_cache=False)
            seen.clear()
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    done: dict[str, torch.Tensor] = {}
    for owner, g in gram.items():
        v = torch.linalg.eigh(g).eigenvectors.flip(1).T[: min(r, tokens[owner])]  # largest eigenvalues first
        sign = torch.sign(v.gather(1, v.abs().argmax(dim=1, keepdim=True)))
        out = torch.zeros(r, g.shape[0], dtype=torch.float64)
        out[: len(v)] = v * sign
        done[owner] = out.float()
    return {name: done[owner] for name, owner in reads.items()}
