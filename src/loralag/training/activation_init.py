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
    rows stay there, see train._set_init_rows)."""
    from loralag.training.train import _collate

    inputs: dict[str, list[torch.Tensor]] = {}
    real: dict[str, torch.Tensor] = {}  # the batch's real (not padding) tokens, which the hooks keep
    # this forward's inputs by identity (q/k/v, gate/up read one tensor: kept and decomposed once), each held
    # with its tensor so that no other tensor can take its id during the forward
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def keeper(name):
        def keep(module, args):
            x = args[0]
            if id(x) not in seen:
                seen[id(x)] = (x, x[real["mask"]].float().cpu())
            inputs.setdefault(name, []).append(seen[id(x)][1])

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
    rows, done = {}, {}
    for name, chunks in inputs.items():
        key = tuple(map(id, chunks))
        if key not in done:
            x = torch.cat(chunks).double()
            v = torch.linalg.svd(x, full_matrices=False).Vh[:r]
            sign = torch.sign(v.gather(1, v.abs().argmax(dim=1, keepdim=True)))
            out = torch.zeros(r, x.shape[1], dtype=torch.float64)
            out[: len(v)] = v * sign
            done[key] = out.float()
        rows[name] = done[key]
    return rows
