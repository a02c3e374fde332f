"""Train one standard PEFT LoRA adapter per document or per prompt/answer file.

Each adapter lands in `out_dir/<name>/` as a plain PEFT folder (adapter_config.json +
adapter_model.safetensors) plus `loralag_train.json`, a marker holding a hash of what was
trained, so a finished adapter is never trained again. The base model is shared across
items and left exactly as it was.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Union

import torch
from peft import LoraConfig, get_peft_model
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from loralag.errors import LoralagError

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
    seed: int = 0  # the same for every item, so an adapter does not depend on training order


@dataclass
class TrainResult:
    path: Path
    skipped: bool  # True when a matching adapter was already on disk
    first_loss: float | None
    final_loss: float | None


# ---------------------------------------------------------------- reading inputs


def read_training_inputs(paths: Iterable[str | os.PathLike]) -> list[TrainItem]:
    """Read .txt files (one Document each, named by stem), .jsonl files of
    {"prompt", "answer"} lines (one QAPairs, named by stem) or of {"name", "text"} lines
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
        return [QAPairs(_check_name(path.stem, path), pairs)]
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


def train_adapters(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    items: Sequence[TrainItem],
    out_dir: str | os.PathLike,
    config: TrainConfig | None = None,
    progress: bool = True,
) -> list[Path]:
    """Train (or find up to date on disk) one LoRA adapter per item; return their folders."""
    config = config or TrainConfig()
    names = [item.name for item in items]
    if len(set(names)) != len(names):
        raise LoralagError(f"adapter names must be unique, got duplicates in {names}")
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
    out_dir = Path(out_dir)
    target = out_dir / item.name
    examples = build_examples(tokenizer, item, config)
    key = _train_key(model, examples, config)
    marker = _read_marker(target)
    if marker.get("key") == key and all((target / f).is_file() for f in _ADAPTER_FILES):
        return TrainResult(target, True, marker.get("first_loss"), marker.get("final_loss"))

    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{item.name}.tmp-", dir=out_dir))
    try:
        first, final = _train_into(model, examples, config, _pad_id(tokenizer), tmp, bar)
        info = {"key": key, "name": item.name, "first_loss": first, "final_loss": final,
                "config": asdict(config), "examples": len(examples)}
        (tmp / MARKER_FILE).write_text(json.dumps(info, indent=2) + "\n")
        tmp.chmod(0o755)
        _replace_dir(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return TrainResult(target, False, first, final)


def _train_into(model, examples, config: TrainConfig, pad_id: int, folder: Path, bar) -> tuple[float, float]:
    lora = LoraConfig(
        task_type="CAUSAL_LM",
        r=config.r,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
    )
    # get_peft_model freezes the base and we switch to train mode: remember both to restore.
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    losses = []
    # Seed inside a forked RNG: deterministic LoRA init and order without touching the caller's RNG.
    with torch.random.fork_rng():
        torch.manual_seed(config.seed)
        peft_model = get_peft_model(model, lora)
        try:
            peft_model.train()
            params = [p for p in peft_model.parameters() if p.requires_grad]
            optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
            order = torch.Generator().manual_seed(config.seed)
            queue: list[int] = []
            for step in range(config.steps):
                if len(examples) <= config.batch_size:
                    picked = list(range(len(examples)))
                else:
                    if len(queue) < config.batch_size:
                        queue += torch.randperm(len(examples), generator=order).tolist()
                    picked, queue = queue[: config.batch_size], queue[config.batch_size :]
                batch = _collate([examples[i] for i in picked], pad_id)
                batch = {k: v.to(model.device) for k, v in batch.items()}
                loss = peft_model(**batch).loss
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(loss.item())
                if bar is not None:
                    bar.set_postfix(step=f"{step + 1}/{config.steps}", loss=f"{losses[-1]:.3f}")
            peft_model.save_pretrained(folder)
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
    return (losses[0], losses[-1]) if losses else (float("nan"), float("nan"))


def _check_targets(model, target_modules: Sequence[str]) -> None:
    leaf_names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    missing = [t for t in target_modules if t not in leaf_names]
    if missing:
        raise LoralagError(
            f"target modules {missing} not found in {type(model).__name__}; it has e.g. "
            f"{sorted(n for n in leaf_names if n.endswith('proj'))[:8]}"
        )


def _train_key(model, examples, config: TrainConfig) -> str:
    # Hash the token ids (so a different tokenizer or text retrains), the config and the
    # base model's identity.
    base = model.config
    payload = {
        "format": _MARKER_FORMAT,
        "base": [getattr(base, "_name_or_path", ""), base.model_type, base.hidden_size,
                 base.num_hidden_layers, base.vocab_size],
        "config": asdict(config),
        "examples": examples,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _read_marker(folder: Path) -> dict:
    try:
        return json.loads((folder / MARKER_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _replace_dir(src: Path, dst: Path) -> None:
    """Move finished folder `src` to `dst`; an outdated `dst` is moved aside first, so
    `dst` is always either absent or complete, never half written."""
    if dst.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, trash / dst.name)
        os.replace(src, dst)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, dst)
