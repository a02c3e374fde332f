"""Train one standard PEFT LoRA adapter per document or per prompt/answer file.

Each adapter lands in `out_dir/<name>/` as a plain PEFT folder (adapter_config.json +
adapter_model.safetensors) plus `loralag_train.json`, a marker holding a hash of what was
trained, so a finished adapter is never trained again. The base model is shared across
items and left exactly as it was.

`train_adapters(..., group_size=G)` trains G adapters in one pass: each step runs one
forward/backward over the concatenation of every adapter's own batch, each row going
through its own adapter (stacked LoRA factors, applied per adapter block of rows). Per adapter it is the same
training as one at a time (PEFT's init for the adapter's own seed, the same batches, loss over its own
tokens, its own gradient clipping, AdamW), so the folders and cache keys are the same too.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import socket
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Union

import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import LoraLayer
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from transformers.pytorch_utils import Conv1D

from loralag.errors import LoralagError
from loralag.routing.swap import ModuleSwaps
from loralag.training import CONTRAST_INITS, INITS
from loralag.training.frozen_rows import frozen_adapters

log = logging.getLogger(__name__)

MARKER_FILE = "loralag_train.json"
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_MARKER_FORMAT = 1  # bump when a change to training should invalidate cached adapters


@dataclass
class Document:
    """A text learned whole: causal LM loss on every token of `text` and of each extra text
    (e.g. restatements of the same facts, which help the adapter recall them)."""

    name: str
    text: str
    extra_texts: list[str] = field(default_factory=list)


@dataclass
class QAPairs:
    """Prompt/answer pairs: loss only on the answer tokens, the prompt is context."""

    name: str
    pairs: list[tuple[str, str]]
    # Per pair: a trained LoRA folder applied, frozen, while this pair is learned (None: the base model alone),
    # e.g. a document's knowledge adapter under a task adapter that must learn to read what it injects.
    under: list[str | os.PathLike | None] | None = None
    # A whole library routed per token under every pair (UnderLibrary), e.g. the knowledge a routed library
    # delivers at inference, right or wrong, instead of one right document's adapter; not with `under`.
    library: UnderLibrary | None = None


@dataclass(frozen=True)
class UnderLibrary:
    """A loralag library attached, frozen, while a QAPairs item trains, routed per token as at inference by a
    router that picks one adapter per token (lag, lag-prefix, arrow, spectral); the gradient passes through the
    picked adapters to the adapter being trained upstream (routing/layer.py)."""

    path: str | os.PathLike
    router: str = "lag"
    k: int = 20
    pairs: tuple[bool, ...] | None = None  # per pair of the item, whether it trains under the library (None: all)


TrainItem = Union[Document, QAPairs]


@dataclass
class TrainConfig:
    target_modules: list[str] = field(default_factory=lambda: ["gate_proj", "up_proj", "down_proj"])
    r: int = 6
    alpha: int = 12
    dropout: float = 0.0
    steps: int = 30  # optimizer steps per adapter
    batch_size: int = 4  # examples per step; an item with fewer uses all of them each step
    lr: float = 2e-3
    max_length: int = 256  # longer documents are split into windows of this many tokens
    append_eos: bool = True  # end each answer with eos so the adapter learns to stop
    seed: int = 0  # the base seed: each adapter's own seed is adapter_seed(seed, name), see there
    shared_init: bool = False  # every adapter from the one init of `seed` (loralag 0.1's way; for comparisons)
    # A's init: "peft" (PEFT's, random from the adapter's seed), "activations" (the top-r directions of the
    # base model's inputs over the item's own tokens), "contrast" (those with the most energy relative to
    # generic text) or "salient" (contrast, each token weighted by the base model's loss on the token it
    # predicts), see training/activation_init.py; B starts at 0 either way
    init: str = "peft"
    # init="contrast"/"salient" against these texts' pooled inputs instead of the base model's own samples (e.g.
    # every task family's pairs: each adapter then aims at what tells its item from the rest of its library).
    # The same texts for every adapter of a library keep each adapter independent of training order and grouping
    contrast_against: list[str] = field(default_factory=list)
    # train B alone, A kept at its init (LoRA-FA, Zhang et al. 2023): A* rows then span the init's rows exactly.
    # For comparisons: on the bench's knowledge adapters it routes worse than training A (README, "Distinct inits")
    freeze_a: bool = False
    # with a data-aware init, A trains within the span of the init's top `a_within` directions (its rows are
    # projected back onto them after every step): A learns more than its r init rows hold, yet its A* rows,
    # which routing reads, stay on what tells the item apart from the contrast (the fact-checking adapter, bench
    # README "Fact checking off chance"). 0: A trains freely
    a_within: int = 0


def adapter_seed(base_seed: int, name: str) -> int:
    """The seed of adapter `name`: its LoRA init and batch order. Derived from the base seed and the name, so
    every adapter of a library starts from its own init (one shared init leaves the adapters' A* and arrows
    in one common subspace, which routing cannot tell apart) and still does not depend on training order or
    grouping. Written into the adapter's marker file."""
    digest = hashlib.sha256(f"{int(base_seed)}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


@dataclass
class TrainResult:
    path: Path
    skipped: bool  # True when a matching adapter was already on disk
    first_loss: float | None
    final_loss: float | None


# ---------------------------------------------------------------- reading inputs


def read_training_inputs(paths: Iterable[str | os.PathLike]) -> list[TrainItem]:
    """Read .txt files (one Document each, named by stem), .jsonl files of
    {"prompt", "answer"} lines (one QAPairs, named by stem; optional "under": an adapter folder,
    relative to the file, applied frozen while that pair is learned) or of {"name", "text"} lines
    (one Document per line; optional "extra_texts" list), and folders of such files."""
    items: list[TrainItem] = []
    sources: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = sorted(p for p in path.iterdir() if p.suffix in (".txt", ".jsonl") and p.is_file())
            if not files:
                raise LoralagError(f"folder {path} holds no .txt or .jsonl training files")
        elif path.is_file():
            files = [path]
        else:
            raise LoralagError(f"training input {path} does not exist")
        for file in files:
            for item in _read_file(file):
                if item.name in sources:
                    raise LoralagError(
                        f"adapter name {item.name!r} from {file} is already used by {sources[item.name]}"
                    )
                sources[item.name] = file
                items.append(item)
    return items


def _read_file(path: Path) -> list[TrainItem]:
    if path.suffix == ".txt":
        text = path.read_text(encoding="utf-8")
        if not text.strip():
            raise LoralagError(f"{path} is empty")
        return [Document(_check_name(path.stem, path), text)]
    if path.suffix != ".jsonl":
        raise LoralagError(f"{path}: training inputs must be .txt or .jsonl files")
    docs: list[TrainItem] = []
    pairs: list[tuple[str, str]] = []
    under: list[str | None] = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise LoralagError(f"{where}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise LoralagError(f"{where}: expected a JSON object")
        if "prompt" in row or "answer" in row:
            if docs:
                raise LoralagError(f"{where}: prompt/answer line in a file of name/text lines")
            pairs.append((_string(row, "prompt", where), _string(row, "answer", where)))
            # optional: a trained adapter folder (relative to this file) applied, frozen, under this pair
            under.append(str(path.parent / _string(row, "under", where)) if "under" in row else None)
        elif "text" in row or "name" in row:
            if pairs:
                raise LoralagError(f"{where}: name/text line in a file of prompt/answer lines")
            extra = row.get("extra_texts", [])
            if not isinstance(extra, list) or not all(isinstance(t, str) and t.strip() for t in extra):
                raise LoralagError(f"{where}: 'extra_texts' must be a list of non-empty strings")
            name = _check_name(_string(row, "name", where), where)
            docs.append(Document(name, _string(row, "text", where), extra))
        else:
            raise LoralagError(f"{where}: expected keys 'prompt'+'answer' or 'name'+'text', got {sorted(row)}")
    if pairs:
        return [QAPairs(_check_name(path.stem, path), pairs, under if any(under) else None)]
    if not docs:
        raise LoralagError(f"{path} holds no training lines")
    return docs


def _string(row: dict, key: str, where: str) -> str:
    value = row.get(key)
    if not isinstance(value, str) or not value.strip():
        raise LoralagError(f"{where}: {key!r} must be a non-empty string")
    return value


def _check_name(name: str, where) -> str:
    # The name becomes a folder under out_dir; dot-names are reserved for temp folders.
    if not name or name.startswith(".") or "/" in name or "\\" in name:
        raise LoralagError(f"{where}: {name!r} cannot be an adapter name (no '/', no leading '.')")
    return name


def item_texts(item: TrainItem) -> list[str]:
    """The texts an item trains on, each whole: a document's text and extra texts, a QAPairs item's prompt +
    answer per pair (e.g. a library's texts for TrainConfig.contrast_against)."""
    if isinstance(item, Document):
        return [item.text, *item.extra_texts]
    return [prompt + answer for prompt, answer in item.pairs]


def recall_pairs(name: str, text: str, prompts: Sequence[str]) -> QAPairs:
    """Train an adapter to reproduce `text` when asked any of `prompts`
    (e.g. "Tell me about the Zorblax treaty."); the caller writes the prompts."""
    if not prompts:
        raise LoralagError(f"recall_pairs({name!r}): give at least one prompt")
    return QAPairs(name, [(prompt, text) for prompt in prompts])


# ---------------------------------------------------------------- tokenization


def build_examples(
    tokenizer: PreTrainedTokenizerBase, item: TrainItem, config: TrainConfig
) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per training example; labels are -100 where no loss is taken."""
    examples = []
    if isinstance(item, Document):
        for text in [item.text, *item.extra_texts]:
            ids = tokenizer(text, add_special_tokens=True).input_ids
            for start in range(0, len(ids), config.max_length):
                window = ids[start : start + config.max_length]
                if len(window) > 1:  # a single token has nothing to predict
                    examples.append((window, list(window)))
    elif isinstance(item, QAPairs):
        for prompt, answer in item.pairs:
            prompt_ids = tokenizer(prompt, add_special_tokens=True).input_ids
            answer_ids = tokenizer(answer, add_special_tokens=False).input_ids
            if config.append_eos and tokenizer.eos_token_id is not None:
                answer_ids = answer_ids + [tokenizer.eos_token_id]
            # Too long: drop the start of the prompt, never the answer we learn.
            ids = (prompt_ids + answer_ids)[-config.max_length :]
            labels = ([-100] * len(prompt_ids) + answer_ids)[-config.max_length :]
            examples.append((ids, labels))
    else:
        raise LoralagError(f"cannot train on {type(item).__name__}; expected Document or QAPairs")
    if not examples:
        raise LoralagError(f"training item {item.name!r} has no tokens to learn")
    return examples


def _collate(examples, pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), -100, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, labs) in enumerate(examples):  # right padding: positions stay 0..n-1
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(labs)] = torch.tensor(labs)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def _pad_id(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0  # padded positions are masked out and carry no loss, so any id works


# ---------------------------------------------------------------- training


@torch.no_grad()
def item_loss(model, tokenizer: PreTrainedTokenizerBase, item: TrainItem, config: TrainConfig | None = None) -> float:
    """Mean loss of `model` on the item's training tokens: compare base vs adapter to see
    how well the adapter recalls the item."""
    config = config or TrainConfig()
    batch = _collate(build_examples(tokenizer, item, config), _pad_id(tokenizer))
    batch = {k: v.to(model.device) for k, v in batch.items()}
    return model(**batch).loss.item()


def train_for_epochs(
    model,
    tokenizer,
    items: list,
    out_dir: str | Path,
    config: TrainConfig,
    epochs: float | None = None,
    progress: bool = True,
    group_size: int = 1,
    train=None,
) -> list[Path]:
    """train_adapters (or `train`, a function called like it, e.g. loralag.cluster.train.train_adapters bound to
    an address), with each item's steps taken from `epochs` passes over its own examples when given (items with
    the same step count train together); the folders come back in the items' order."""
    train = train or train_adapters
    if epochs is None:
        return train(model, tokenizer, items, out_dir, config, progress, group_size)
    by_steps: dict[int, list] = {}
    for item in items:
        n = len(build_examples(tokenizer, item, config))
        by_steps.setdefault(max(1, math.ceil(epochs * n / min(n, config.batch_size))), []).append(item)
    done = {}
    for steps, bucket in by_steps.items():
        paths = train(model, tokenizer, bucket, out_dir, replace(config, steps=steps), progress, group_size)
        done.update({item.name: path for item, path in zip(bucket, paths)})
    return [done[item.name] for item in items]


def train_adapters(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[TrainItem],
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    progress: bool = True,
    group_size: int = 1,
    workers: int = 1,
) -> list[Path]:
    """Train (or find up to date on disk) one LoRA adapter per item; return their folders. (On a Ray cluster:
    loralag.cluster.train.train_adapters, the same adapters tensor for tensor.)

    workers > 1 trains that many adapters at a time in spawned processes on this machine's CPU cores, each
    with threads // workers torch threads (see loralag.training.processes); a calling script needs the usual
    `if __name__ == "__main__":` guard.

    group_size > 1 trains the items that are not up to date that many at a time in one pass
    (see `_train_group`); each adapter comes out as it would one at a time, and the cache
    treats both the same. Dropout (LoRA or the base model's) would draw different random
    numbers in a mixed batch, so then the items are trained one at a time instead.
    """
    config = config or TrainConfig()
    _check_init(config)  # before any worker starts
    for value, what in ((group_size, "group_size"), (workers, "workers")):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LoralagError(f"{what} must be a positive integer, got {value!r}")
    if group_size > 1 and workers > 1:
        raise LoralagError("group_size and workers are two ways to train several adapters at once: choose one")
    names = [item.name for item in items]
    if len(set(names)) != len(names):
        raise LoralagError(f"adapter names must be unique, got duplicates in {names}")
    for stray in sweep_strays(Path(out_dir)):
        log.info("removed %s, left by a run that was killed", stray)
    if group_size > 1:
        return _train_adapters_grouped(model, tokenizer, items, Path(out_dir), config, progress, group_size)
    if workers > 1:
        from loralag.training.processes import train_in_processes

        for item in items:
            _check_name(item.name, "training item")
        _check_targets(model, config.target_modules)
        return train_in_processes(model, tokenizer, items, Path(out_dir), config, workers, progress)
    paths = []
    bar = tqdm(total=len(items), unit="adapter", disable=not progress)
    try:
        for item in items:
            bar.set_description(item.name)
            result = train_adapter(model, tokenizer, item, out_dir, config, bar=bar)
            if result.skipped:
                log.info("skipped %s: up-to-date adapter in %s", item.name, result.path)
                bar.set_postfix_str("up to date")
            paths.append(result.path)
            bar.update(1)
    finally:
        bar.close()
    return paths


def train_adapter(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    item: TrainItem,
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    bar=None,
) -> TrainResult:
    """Train one adapter into `out_dir/<item.name>/`, unless an identical one is there."""
    config = config or TrainConfig()
    _check_name(item.name, "training item")
    _check_targets(model, config.target_modules)
    job = _job(model, tokenizer, item, Path(out_dir), config)
    done = _finished(job)
    if done is not None:
        return done
    first, final = _write_adapter(
        job,
        config,
        lambda tmp: _train_into(
            model, job.examples, config, _pad_id(tokenizer), tmp, bar, job.under, job.seed, job.library, job.reference
        ),
    )
    return TrainResult(job.target, False, first, final)


@dataclass
class _Job:
    name: str
    examples: list[tuple[list[int], list[int]]]
    target: Path
    key: str = ""
    # the key this adapter had before bundled models were named location-free (_base_name): still accepted,
    # so caches written before stay valid
    legacy_key: str = ""
    under: tuple[list, list[int]] | None = None  # (frozen LoraAdapters, per example: index into them or -1)
    seed: int = 0  # adapter_seed(config.seed, name)
    library: UnderLibrary | None = None  # routed under every example
    reference: list | None = None  # config.contrast_against as (ids, labels) examples, None when empty


def _job(model, tokenizer, item: TrainItem, out_dir: Path, config: TrainConfig) -> _Job:
    job = _Job(
        item.name,
        build_examples(tokenizer, item, config),
        out_dir / item.name,
        seed=config.seed if config.shared_init else adapter_seed(config.seed, item.name),
        reference=_reference_examples(tokenizer, config),
    )
    job.under = _read_under(item, config)
    job.library, library_key = _read_library(item, config)
    # the frozen adapters' content is part of what was trained: another knowledge adapter retrains
    checksums = None if job.under is None else [job.under[0][i].checksum if i >= 0 else None for i in job.under[1]]
    job.key = _train_key(model, job.examples, config, checksums, job.seed, library=library_key)
    raw = str(getattr(model.config, "_name_or_path", ""))
    # hashed again only where the names differ (a bundled model): elsewhere the old key is this one
    job.legacy_key = (
        job.key
        if _base_name(model) == raw
        else _train_key(model, job.examples, config, checksums, job.seed, raw, library=library_key)
    )
    return job


def _read_library(item: TrainItem, config: TrainConfig) -> tuple[UnderLibrary | None, dict | None]:
    """A QAPairs item's routed library, checked, and what of it the cache key holds: every adapter's name and
    checksum, the router and k (another library, router or k retrains)."""
    spec = getattr(item, "library", None)
    if spec is None:
        return None, None
    from loralag.library.store import open_library
    from loralag.routing.routers import SINGLE_PICK

    where = f"training item {item.name!r}"
    if getattr(item, "under", None) is not None and any(u is not None for u in item.under):
        raise LoralagError(f"{where}: give 'under' adapters or a routed library, not both")
    if spec.router not in SINGLE_PICK - {"fixed", "none"}:
        raise LoralagError(
            f"{where}: a library to train under is routed by a router that picks one adapter per token, one of "
            f"{sorted(SINGLE_PICK - {'fixed', 'none'})}; got {spec.router!r}"
        )
    if isinstance(spec.k, bool) or not isinstance(spec.k, int) or spec.k < 1:
        raise LoralagError(f"{where}: the routed library's k must be a positive integer, got {spec.k!r}")
    lib = open_library(spec.path)
    if not len(lib):
        raise LoralagError(f"{where}: the library {lib.path} to train under holds no adapter")
    clash = sorted({m.rsplit(".", 1)[-1] for m in lib.target_modules} & set(config.target_modules))
    if clash:
        raise LoralagError(
            f"{where}: the library {lib.path} targets {clash}, which the adapter being trained targets too; "
            "a module can carry only one of them"
        )
    if spec.pairs is not None and len(spec.pairs) != len(item.pairs):
        raise LoralagError(f"{where}: the library names {len(spec.pairs)} pairs to train under for {len(item.pairs)}")
    pairs = None if spec.pairs is None else tuple(bool(p) for p in spec.pairs)
    spec = replace(spec, path=str(Path(spec.path).resolve()), pairs=pairs)
    adapters = sorted([e["name"], e["checksum"]] for e in lib.adapters)
    key = {"adapters": adapters, "router": spec.router, "k": spec.k}
    if pairs is not None and not all(pairs):  # absent when every pair trains under it: the same adapter
        key["pairs"] = list(pairs)
    return spec, key


class _UnderRows:
    """Which rows of the current batch train under the routed library (None: all)."""

    use: torch.Tensor | None = None


@contextmanager
def _routed_library(model, spec: UnderLibrary):
    """The library attached (frozen, routed per token) for the block, then detached. Yields the rows object: a
    row whose `use` is False gets its layers' base output alone (the library's delta left out)."""
    from loralag.library.store import open_library
    from loralag.routing.state import attach, detach

    rows = _UnderRows()

    def base_where_unused(layer, args, output):
        if rows.use is None or bool(rows.use.all()):
            return output
        keep = rows.use.view(-1, *([1] * (output.dim() - 1)))
        return torch.where(keep, output, layer.base(args[0]))

    state = attach(model, {"under": open_library(spec.path)}, router=spec.router, k=spec.k)
    hooks = [layer.register_forward_hook(base_where_unused) for layer in state.layers.values()]
    try:
        yield rows
    finally:
        for hook in hooks:
            hook.remove()
        detach(model)


def _read_under(item: TrainItem, config: TrainConfig) -> tuple[list, list[int]] | None:
    """The frozen adapters of a QAPairs item (each folder read once) and each example's index into them."""
    under = getattr(item, "under", None)
    if under is not None and len(under) != len(item.pairs):
        raise LoralagError(
            f"training item {item.name!r}: 'under' names {len(under)} adapters for {len(item.pairs)} pairs"
        )
    if under is None or all(u is None for u in under):
        return None
    from loralag.library.adapters import read_adapter

    folders = sorted({str(u) for u in under if u is not None})
    adapters = [read_adapter(f) for f in folders]
    clash = sorted({m.rsplit(".", 1)[-1] for a in adapters for m in a.modules} & set(config.target_modules))
    if clash:
        raise LoralagError(
            f"training item {item.name!r}: its frozen adapters target {clash}, which the adapter being "
            "trained targets too; a module can carry only one of them"
        )
    position = {f: i for i, f in enumerate(folders)}
    return adapters, [position[str(u)] if u is not None else -1 for u in under]


def _finished(job: _Job) -> TrainResult | None:
    """The up-to-date result already on disk for `job`, or None when it must be trained."""
    marker = _read_marker(job.target)
    if marker.get("key") in {job.key, job.legacy_key} and all((job.target / f).is_file() for f in _ADAPTER_FILES):
        return TrainResult(job.target, True, marker.get("first_loss"), marker.get("final_loss"))
    return None


def _write_adapter(job: _Job, config: TrainConfig, fill) -> tuple[float, float]:
    """Build the adapter folder in a temp folder next to the target (`fill(tmp)` writes the
    PEFT files and returns (first, final) loss), add the marker, then move it in whole."""
    job.target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{job.name}.tmp-{_OWNER}-", dir=job.target.parent))
    try:
        first, final = fill(tmp)
        info = {
            "key": job.key,
            "name": job.name,
            "seed": job.seed,
            "first_loss": first,
            "final_loss": final,
            # the contrast texts by count and digest (a library's texts would fill every adapter's marker)
            "config": asdict(config) | {"contrast_against": _texts_digest(config.contrast_against)},
            "examples": len(job.examples),
        }
        if job.library is not None:  # what it was trained under, for whoever reads the folder
            info["library"] = {"path": str(job.library.path), "router": job.library.router, "k": job.library.k}
        (tmp / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)
        _replace_dir(tmp, job.target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return first, final


def _lora_config(model, config: TrainConfig) -> LoraConfig:
    targets = set(config.target_modules)
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        # GPT-2's transformers Conv1D stores its weight transposed: say so, as PEFT would otherwise (with a warning)
        fan_in_fan_out=any(
            isinstance(m, Conv1D) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in targets
        ),
    )


@contextmanager
def _peft_attached(model, lora: LoraConfig):
    """`get_peft_model(model, lora)` for the duration of the block, then the base model exactly
    as it was: LoRA layers removed, requires_grad flags, train/eval mode and attributes restored."""
    # get_peft_model freezes the base and callers switch to train mode: remember both to restore.
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    peft_model = get_peft_model(model, lora)
    try:
        yield peft_model
    finally:
        peft_model.unload()  # removes the LoRA layers, the base weights were never touched
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in model.__dict__:
                delattr(model, attr)
    if any("lora_" in name for name, _ in model.named_parameters()):
        raise RuntimeError("LoRA layers were left in the base model after training")  # a bug, not user error


def _learned_logits(base, model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`model`'s logits at the positions whose next token some row learns, and those next tokens (the labels
    shifted left; -100 where a row learns none). HF's causal LM loss over them is its loss over every
    position, but the LM head (a vocabulary-wide matmul and softmax per position) skips the prompts:
    a task adapter's pairs with an article in front learn a few answer tokens after a hundred of context."""
    shift = nn.functional.pad(batch["labels"], (0, 1), value=-100)[:, 1:]
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    if "logits_to_keep" not in inspect.signature(base.forward).parameters:  # a model without it: every position
        return model(**inputs).logits, shift
    keep = (shift != -100).any(dim=0).nonzero().squeeze(1)
    return model(**inputs, logits_to_keep=keep).logits, shift[:, keep]


def _batches(n_examples: int, config: TrainConfig, seed: int) -> Iterator[list[int]]:
    """Indices of the examples of each step: all of them when they fit in a batch, else
    batch_size at a time from a queue refilled with permutations seeded by the adapter's seed."""
    if n_examples <= config.batch_size:
        while True:
            yield list(range(n_examples))
    order = torch.Generator().manual_seed(seed)
    queue: list[int] = []
    while True:
        if len(queue) < config.batch_size:
            queue += torch.randperm(n_examples, generator=order).tolist()
        picked, queue = queue[: config.batch_size], queue[config.batch_size :]
        yield picked


def _train_into(
    model,
    examples,
    config: TrainConfig,
    pad_id: int,
    folder: Path,
    bar,
    under: tuple[list, list[int]] | None,
    seed: int,
    library: UnderLibrary | None = None,
    reference: list | None = None,
) -> tuple[float, float]:
    losses = []
    # Seed inside a forked RNG: deterministic LoRA init and order without touching the caller's RNG.
    with torch.random.fork_rng(), ExitStack() as stack:
        torch.manual_seed(seed)
        init = _init_rows(model, examples, config, pad_id, reference)  # of the base model alone, as at step one
        within = _within_bases(init, config)
        rows = stack.enter_context(frozen_adapters(model, under[0])) if under is not None else None
        routed = stack.enter_context(_routed_library(model, library)) if library is not None else None
        with _peft_attached(model, _lora_config(model, config)) as peft_model:
            _set_init_rows(model, init)
            peft_model.train()
            if config.freeze_a:
                for name, p in peft_model.named_parameters():
                    if ".lora_A." in name:
                        p.requires_grad_(False)
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
            batches = _batches(len(examples), config, seed)
            steps_bar = stack.enter_context(_steps_bar(bar, config.steps))
            for step in range(config.steps):
                picked = next(batches)
                if rows is not None:
                    rows.index = torch.tensor([under[1][i] for i in picked], device=model.device)
                if routed is not None and library.pairs is not None:
                    routed.use = torch.tensor([library.pairs[i] for i in picked], device=model.device)
                batch = _collate([examples[i] for i in picked], pad_id)
                batch = {k: v.to(model.device) for k, v in batch.items()}
                logits, targets = _learned_logits(model, peft_model, batch)
                loss = nn.functional.cross_entropy(
                    logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
                )
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                _project_a(model, within)
                losses.append(loss.item())
                if bar is not None:
                    bar.set_postfix(step=f"{step + 1}/{config.steps}", loss=f"{losses[-1]:.3f}")
                steps_bar.update(1)
            peft_model.save_pretrained(folder)
    return (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))


# ---------------------------------------------------------------- grouped training


def _steps_bar(bar, steps: int):
    """Under the adapters' bar (adapters/s, ETA of the run), a transient bar of the current adapter's or
    group's steps (steps/s, ETA of the adapter); nothing when the adapters' bar is off or not a tqdm."""
    if not isinstance(bar, tqdm) or bar.disable:
        return nullcontext(_NoBar())
    return tqdm(total=steps, unit="step", desc="  steps", leave=False)


class _NoBar:
    def update(self, n: int = 1) -> None:
        pass


def _train_adapters_grouped(
    model, tokenizer, items, out_dir: Path, config: TrainConfig, progress: bool, group_size: int
) -> list[Path]:
    for item in items:
        _check_name(item.name, "training item")
    _check_targets(model, config.target_modules)
    pad_id = _pad_id(tokenizer)
    jobs = [_job(model, tokenizer, item, out_dir, config) for item in items]
    bar = tqdm(total=len(items), unit="adapter", disable=not progress)
    try:
        todo = []
        for job in jobs:
            if _finished(job) is not None:
                log.info("skipped %s: up-to-date adapter in %s", job.name, job.target)
                bar.set_postfix_str("up to date")
                bar.update(1)
            else:
                todo.append(job)
        if len(todo) > 1:
            why_not = _grouping_blocker(model, config)
            if why_not is None and any(job.under is not None or job.library is not None for job in todo):
                why_not = "some items train under frozen adapters or a routed library"
            if why_not is None:
                why_not = _grouping_blocker_peft(model, config)
            if why_not is not None:
                log.warning("training %d adapters one at a time, not in groups: %s", len(todo), why_not)
                group_size = 1
        # Rows of a group are padded to its longest example: group items of similar lengths.
        # (Any grouping trains each adapter the same; this only wastes less compute.)
        todo.sort(key=lambda job: max(len(ids) for ids, _ in job.examples))
        for start in range(0, len(todo), group_size):
            group = todo[start : start + group_size]
            bar.set_description(_group_label([job.name for job in group]))
            if len(group) == 1:
                [job] = group
                _write_adapter(
                    job,
                    config,
                    lambda tmp: _train_into(
                        model, job.examples, config, pad_id, tmp, bar, job.under, job.seed, job.library, job.reference
                    ),
                )
            else:
                _train_group(
                    model,
                    group,
                    config,
                    pad_id,
                    [_lora_init(model, config, job.seed, job.examples, pad_id, job.reference) for job in group],
                    bar,
                )
            bar.update(len(group))
    finally:
        bar.close()
    return [job.target for job in jobs]


def _group_label(names: list[str], width: int = 40) -> str:
    label = "+".join(names)
    return label if len(label) <= width else f"{names[0]}+{len(names) - 1} more"


def _grouping_blocker(model, config: TrainConfig) -> str | None:
    """Why the adapters cannot be trained in a shared batch exactly as one at a time, or None.
    Dropout draws random numbers per row, so a mixed batch would draw other ones."""
    if config.dropout > 0:
        return f"LoRA dropout {config.dropout} > 0"
    if config.a_within:
        return f"a_within={config.a_within} projects each adapter's A onto its own init's directions"
    for name, module in model.named_modules():
        if isinstance(module, nn.Dropout) and module.p > 0:
            return f"the base model has dropout ({name}, p={module.p})"
    for attr in (
        "attention_dropout",
        "hidden_dropout",
        "attn_pdrop",
        "resid_pdrop",
        "embd_pdrop",
        "dropout",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "activation_dropout",
    ):
        value = getattr(model.config, attr, 0)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
            return f"the base model has dropout ({attr}={value})"
    return None


def _grouping_blocker_peft(model, config: TrainConfig) -> str | None:
    """Why PEFT's LoRA layers on this model cannot be grouped (a target that is not a plain nn.Linear), or None."""
    with torch.random.fork_rng(), _peft_attached(model, _lora_config(model, config)):
        for name, module in model.named_modules():
            if isinstance(module, LoraLayer):
                base = module.get_base_layer()
                if type(module) is not LoraLinear or type(base) is not nn.Linear or module.fan_in_fan_out:
                    return f"{name} is a {type(base).__name__}, grouped training handles nn.Linear only"
    return None


def _check_init(config: TrainConfig) -> None:
    if config.init not in INITS:
        raise LoralagError(f"init must be one of {INITS}, got {config.init!r}")
    if isinstance(config.a_within, bool) or not isinstance(config.a_within, int) or config.a_within < 0:
        raise LoralagError(f"a_within must be an integer >= 0, got {config.a_within!r}")
    if config.a_within:
        if config.init == "peft":
            raise LoralagError("a_within keeps A within a data-aware init's directions; init 'peft' has none")
        if config.freeze_a:
            raise LoralagError("a_within trains A within a subspace; freeze_a does not train A at all")
        if config.a_within < config.r:
            raise LoralagError(f"a_within ({config.a_within}) must be at least the rank r ({config.r})")
    if config.contrast_against:
        if config.init not in CONTRAST_INITS:
            inits = " or ".join(map(repr, CONTRAST_INITS))
            raise LoralagError(f"contrast_against is a reference for init {inits}, not {config.init!r}")
        for i, text in enumerate(config.contrast_against):
            if not isinstance(text, str) or not text.strip():
                raise LoralagError(f"contrast_against[{i}] must be a non-empty string, got {text!r}")


# the last contrast_against tokenized: "tokenizer" (a weak reference), "key" (max_length, digest), "examples"
_REFERENCE_TOKENS: dict = {}


def _reference_examples(tokenizer, config: TrainConfig) -> list | None:
    """config.contrast_against tokenized as documents are (windows of max_length), or None when it is empty; once
    per tokenizer and texts (every adapter of a library has the same: tokenizing them per adapter would cost
    the library's size squared)."""
    if not config.contrast_against:
        return None
    key = (config.max_length, _texts_digest(config.contrast_against))
    held = _REFERENCE_TOKENS.get("tokenizer")
    if held is None or held() is not tokenizer or _REFERENCE_TOKENS["key"] != key:
        texts = config.contrast_against
        examples = [ex for text in texts for ex in build_examples(tokenizer, Document("ref", text), config)]
        _REFERENCE_TOKENS.update(tokenizer=weakref.ref(tokenizer), key=key, examples=examples)
    return _REFERENCE_TOKENS["examples"]


def _init_rows(model, examples, config: TrainConfig, pad_id: int, reference: list | None = None) -> dict | None:
    _check_init(config)  # also for train_adapter called directly
    if config.init == "peft":
        return None
    from loralag.training import activation_init

    rows = {
        "activations": activation_init.activation_rows,
        "contrast": activation_init.contrast_rows,
        "salient": activation_init.salient_rows,
    }[config.init]
    given = {} if reference is None else {"reference": reference}  # activation_rows reads no reference
    n_rows = max(config.r, config.a_within)  # the init's first r rows start A; all of them bound it (a_within)
    return rows(model, examples, list(config.target_modules), n_rows, pad_id, config.batch_size, **given)


def _within_bases(init: dict | None, config: TrainConfig) -> dict | None:
    """{module name: (d_in, m) orthonormal basis of the init's a_within rows} (the rows are ordered by contrast,
    not orthogonal), or None when A trains freely."""
    if not config.a_within or init is None:
        return None
    bases = {}
    for name, rows in init.items():
        rows = rows[rows.norm(dim=1) > 0].double()  # a module that saw fewer tokens has zero rows after its own
        q, _ = torch.linalg.qr(rows.T)
        bases[name] = q.float()
    return bases


@torch.no_grad()
def _project_a(model, bases: dict | None) -> None:
    """A ← A Q Qᵀ for every LoRA layer: its rows back onto the span of its init's a_within rows."""
    if bases is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            A = module.lora_A["default"].weight
            q = bases[name].to(A)
            A.copy_((A @ q) @ q.T)


@torch.no_grad()
def _set_init_rows(model, init: dict | None) -> None:
    """Replace PEFT's A of every LoRA layer by the init's rows, at the mean norm of PEFT's own rows (a zero row,
    where the item had fewer tokens than the rank, keeps PEFT's: a zero row of A would never train)."""
    if init is None:
        return
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            A = module.lora_A["default"].weight
            rows = init[name][: A.shape[0]].to(A)  # a_within's extra rows bound A, they do not start it
            found = rows.norm(dim=1) > 0
            A[found] = rows[found] * A.norm(dim=1).mean()


def _lora_init(model, config: TrainConfig, seed: int, examples=None, pad_id: int = 0, reference=None) -> dict:
    """The initial LoRA factors for an adapter's seed (and, for a data-aware init, its examples and the contrast
    reference): {module name: (A, B, scale)}, taken from get_peft_model exactly as `_train_into` seeds it."""
    init = _init_rows(model, examples, config, pad_id, reference)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        with _peft_attached(model, _lora_config(model, config)):
            _set_init_rows(model, init)
            return {
                name: (
                    module.lora_A["default"].weight.detach().clone(),
                    module.lora_B["default"].weight.detach().clone(),
                    float(module.scaling["default"]),
                )
                for name, module in model.named_modules()
                if isinstance(module, LoraLayer)
            }


class _Rows:
    """How many rows of the current batch each adapter owns, in order (shared by all wrapped
    layers): adapter g's rows follow adapter g-1's."""

    sizes: list[int] | None = None


class _GroupedLoRALinear(nn.Module):
    """A target nn.Linear with G LoRA adapters side by side: the rows of adapter g get
    base(x) + scale * (x @ A[g]^T) @ B[g]^T, computed per adapter's block of rows with the
    same ops as PEFT's LoRA layer."""

    def __init__(self, base: nn.Linear, A: torch.Tensor, B: torch.Tensor, scale: float, rows: _Rows):
        super().__init__()
        self.base = base
        self.lora_A = nn.Parameter(A)  # (G, r, d_in)
        self.lora_B = nn.Parameter(B)  # (G, d_out, r)
        self.scale = scale
        self.rows = rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        sizes = self.rows.sizes
        if x.dim() < 2 or x.shape[0] != sum(sizes):
            raise RuntimeError(f"grouped LoRA expects inputs batch-first with {sum(sizes)} rows, got {tuple(x.shape)}")
        # split/unbind, not x[a:b] / A[g]: their backward is one cat/stack, not a zero-filled
        # full-size gradient per adapter.
        parts = x.to(self.lora_A.dtype).split(sizes)
        delta = torch.cat(
            [
                nn.functional.linear(nn.functional.linear(part, A), B)
                for part, A, B in zip(parts, self.lora_A.unbind(0), self.lora_B.unbind(0))
            ]
        )
        return out + (delta * self.scale).to(out.dtype)


@contextmanager
def _grouped_lora(model, inits: list[dict]):
    """Wrap every target module of the inits (one per adapter, see _lora_init) for the block; yields
    (rows, {name: wrapper}).
    Afterwards the base modules, requires_grad flags and train/eval mode are exactly as before."""
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    swaps = ModuleSwaps(model)
    rows = _Rows()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        wrappers = {}
        for name, (_, _, scale) in inits[0].items():
            A = torch.stack([init[name][0] for init in inits])
            B = torch.stack([init[name][1] for init in inits])
            wrappers[name] = swaps.swap(name, lambda base, A=A, B=B, s=scale: _GroupedLoRALinear(base, A, B, s, rows))
        yield rows, wrappers
    finally:
        swaps.restore()
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad[name])
        model.train(was_training)
    if any(isinstance(m, _GroupedLoRALinear) for m in model.modules()):
        raise RuntimeError("grouped LoRA layers were left in the base model after training")  # a bug


def _per_adapter_loss(logits, shift, owner, n_adapters: int) -> torch.Tensor:
    """(G,) mean token loss of each adapter over its own rows' target tokens (`_learned_logits`), computed as
    HF's causal LM loss does (float logits, -100 ignored)."""
    token_loss = nn.functional.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), shift.reshape(-1), ignore_index=-100, reduction="none"
    ).view(shift.shape)
    sums = token_loss.new_zeros(n_adapters).index_add(0, owner, token_loss.sum(dim=1))
    counts = token_loss.new_zeros(n_adapters).index_add(0, owner, (shift != -100).sum(dim=1).to(token_loss.dtype))
    return sums / counts


@torch.no_grad()
def _clip_per_adapter(params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
    """torch.nn.utils.clip_grad_norm_ applied to each adapter's slice (dim 0) of the stacked
    parameters on its own; returns the (G,) total norms before clipping."""
    norms = torch.stack([torch.linalg.vector_norm(p.grad.flatten(1), 2, dim=1) for p in params])  # (P, G)
    total = torch.linalg.vector_norm(norms, 2, dim=0)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef.view(-1, *[1] * (p.dim() - 1)))
    return total


def _train_group(model, group: list[_Job], config: TrainConfig, pad_id: int, inits: list[dict], bar) -> None:
    """Train len(group) adapters in one pass and write each one's folder like `train_adapter`."""
    n = len(group)
    losses = []  # per step: (G,) losses
    with (
        torch.random.fork_rng(),
        _grouped_lora(model, inits) as (rows, wrappers),
        _steps_bar(bar, config.steps) as steps_bar,
    ):
        model.train()
        if config.freeze_a:
            for w in wrappers.values():
                w.lora_A.requires_grad_(False)
        params = [p for w in wrappers.values() for p in (w.lora_A, w.lora_B) if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
        batches = [_batches(len(job.examples), config, job.seed) for job in group]
        for step in range(config.steps):
            picked = [[job.examples[i] for i in next(b)] for job, b in zip(group, batches)]
            owner = torch.tensor([g for g, rows_g in enumerate(picked) for _ in rows_g], device=model.device)
            rows.sizes = [len(rows_g) for rows_g in picked]
            batch = _collate([ex for rows_g in picked for ex in rows_g], pad_id)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            logits, targets = _learned_logits(model, model, batch)
            loss = _per_adapter_loss(logits, targets, owner, n)
            del logits
            loss.sum().backward()  # adapters share no parameter: each gets its own loss's gradient
            _clip_per_adapter(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach().cpu())
            if bar is not None:
                bar.set_postfix(step=f"{step + 1}/{config.steps}", loss=f"{losses[-1].mean().item():.3f}")
            steps_bar.update(1)
        rows.sizes = None
        trained = {name: (w.lora_A.detach().clone(), w.lora_B.detach().clone()) for name, w in wrappers.items()}
    _save_group(model, group, config, trained, losses)


def _save_group(model, group: list[_Job], config: TrainConfig, trained: dict, losses: list[torch.Tensor]) -> None:
    """Write each adapter of the group through PEFT's own save_pretrained (same files, key names
    and adapter_config.json as one at a time), each folder atomically."""
    with torch.random.fork_rng(), _peft_attached(model, _lora_config(model, config)) as peft_model:
        layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        if layers.keys() != trained.keys():
            raise RuntimeError("PEFT wrapped other modules than grouped training did")  # a bug
        for g, job in enumerate(group):
            with torch.no_grad():
                for name, (A, B) in trained.items():
                    layers[name].lora_A["default"].weight.copy_(A[g])
                    layers[name].lora_B["default"].weight.copy_(B[g])
            first, final = (losses[0][g].item(), losses[-1][g].item()) if losses else (float("nan"), float("nan"))

            def fill(tmp, first=first, final=final):
                peft_model.save_pretrained(tmp)
                return first, final

            _write_adapter(job, config, fill)


def _check_targets(model, target_modules: Sequence[str]) -> None:
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in leaf_names]
    if missing:
        raise LoralagError(
            f"target modules {missing} not found in {type(model).__name__}; it has e.g. "
            f"{sorted(n for n in leaf_names if n.endswith('proj'))[:8]}"
        )


def _base_name(model) -> str:
    """The base model's name in the cache key: a bundled model converted into loralag's cache (<cache>/models/
    <its name>, see loralag.models.BUNDLED) by its name alone, so that moving the cache or setting another
    $LORALAG_CACHE keeps its adapters; any other model by the name or path it was loaded from."""
    from loralag.models import BUNDLED

    raw = str(getattr(model.config, "_name_or_path", ""))
    path = Path(raw)
    if path.parent.name == "models" and path.name in {b.name for b in BUNDLED.values()}:
        return f"loralag:{path.name}"
    return raw


def _train_key(
    model,
    examples,
    config: TrainConfig,
    under: list[str | None] | None,
    seed: int,
    base_name: str | None = None,
    library: dict | None = None,
) -> str:
    # Hash the token ids (so a different tokenizer or text retrains), the config, the adapter's own seed,
    # the base model's identity (base_name, default _base_name) and the checksums of frozen adapters the
    # examples train under.
    base = model.config
    payload = {
        "format": _MARKER_FORMAT,
        "base": [
            _base_name(model) if base_name is None else base_name,
            base.model_type,
            base.hidden_size,
            base.num_hidden_layers,
            base.vocab_size,
        ],
        "config": _key_config(config),
        "adapter_seed": seed,
        "examples": examples,
    }
    if under is not None:  # absent otherwise, so adapters trained before `under` existed stay cached
        payload["under"] = under
    if library is not None:  # likewise
        payload["library"] = library
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _key_config(config: TrainConfig) -> dict:
    """The config as the cache key holds it: shared_init only when set, so adapters trained before it existed
    (each from its own seed already) stay cached."""
    out = asdict(config)
    if not out["shared_init"]:
        del out["shared_init"]
    if out["init"] == "peft":  # likewise for adapters trained before `init` existed
        del out["init"]
    if not out["freeze_a"]:  # and `freeze_a`
        del out["freeze_a"]
    if not out["a_within"]:  # and `a_within`
        del out["a_within"]
    if out["contrast_against"]:  # and `contrast_against`, held by its digest (a library's texts: large)
        out["contrast_against"] = _texts_digest(config.contrast_against)
    else:
        del out["contrast_against"]
    return out


def _texts_digest(texts: list[str]) -> str | None:
    """'N texts, sha256 …' for a list of texts (None when empty): what markers and cache keys hold of them."""
    if not texts:
        return None
    return f"{len(texts)} texts, sha256 {hashlib.sha256(json.dumps(list(texts)).encode()).hexdigest()}"


def _read_marker(folder: Path) -> dict:
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return {}


# Temporary folders are named after their writer (host and pid), so a later run can tell the ones a killed
# writer left (its pid gone on this host) from ones another live process (a Ray worker too) is filling.
_OWNER = f"{socket.gethostname()}.{os.getpid()}"
_STRAY = re.compile(r"^\..+\.(?:tmp|old)-(?P<host>[^.]+(?:\.[^.]+)*)\.(?P<pid>\d+)-[^/]*$")


def sweep_strays(out_dir: Path) -> list[Path]:
    """Remove the temporary folders that writers killed on this host left in `out_dir`; return them."""
    host, gone = socket.gethostname(), []
    for p in out_dir.iterdir() if out_dir.is_dir() else ():
        m = _STRAY.match(p.name)
        if m and p.is_dir() and m["host"] == host and not _alive(int(m["pid"])):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, but is another user's
        return True
    return True


def _replace_dir(src: Path, dst: Path) -> None:
    """Move finished folder `src` to `dst`; an outdated `dst` is moved aside first, so
    `dst` is always either absent or complete, never half written."""
    if dst.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-{_OWNER}-", dir=dst.parent))
        os.replace(dst, trash / dst.name)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)
