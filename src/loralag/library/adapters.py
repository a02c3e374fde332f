"""Reading PEFT LoRA adapter folders into plain factors, with errors that name the file at fault.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors` (or a legacy
`adapter_model.bin`). PEFT saves the factors under keys such as
`base_model.model.model.layers.0.mlp.up_proj.lora_A.weight`; the module name is the part between
the `base_model.model.` prefix and `.lora_A.weight`, i.e. the name in `base_model.named_modules()`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from loralag.errors import AdapterError

CONFIG_FILE = "adapter_config.json"
SAFETENSORS_FILE = "adapter_model.safetensors"
BIN_FILE = "adapter_model.bin"

log = logging.getLogger("loralag")
MAX_NAME = 255  # a file name's limit on common file systems: export writes a folder of each adapter's name

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.(?P<adapter>[^.]+))?\.weight$")


@dataclass
class LoraModule:
    """The factors of one adapted module: delta(x) = scale * B @ (A @ x)."""

    A: torch.Tensor  # (r, d_in)
    B: torch.Tensor  # (d_out, r)
    scale: float
    alpha: float

    @property
    def rank(self) -> int:
        return self.A.shape[0]


@dataclass
class LoraAdapter:
    name: str
    source: str
    modules: dict[str, LoraModule]
    config: dict = field(default_factory=dict)
    checksum: str = ""

    @property
    def target_modules(self) -> list[str]:
        return sorted(self.modules)

    @property
    def rank(self) -> int:
        return max(m.rank for m in self.modules.values())


def name_problem(name) -> str | None:
    """Why `name` cannot name an adapter (None if it can): adapter names become folder names (export) and
    manifest keys, so they must be non-empty printable text without path separators, and not '.' or '..'."""
    if not isinstance(name, str) or not name:
        return "an adapter name must be a non-empty string"
    if len(name) > MAX_NAME:
        return f"an adapter name holds at most {MAX_NAME} characters"
    if name in (".", "..") or "/" in name or "\\" in name:
        return "an adapter name must not be '.' or '..' or hold a path separator"
    if not name.isprintable() or name != name.strip():
        return "an adapter name must be printable, without surrounding spaces"
    return None


def check_name(name, where: str) -> str:
    """`name` if it can name an adapter, else AdapterError naming `where` it came from."""
    problem = name_problem(name)
    if problem:
        raise AdapterError(f"{where}: {problem}, got {name!r}")
    return name


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a pattern key matches a module name when it matches a dotted suffix of it."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def adapter_checksum(folder: Path) -> str:
    """Content checksum of an adapter folder: its config and weights bytes."""
    h = hashlib.sha256()
    for fname in (CONFIG_FILE, SAFETENSORS_FILE, BIN_FILE):
        p = folder / fname
        if p.is_file():
            h.update(fname.encode())
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()


def _read_config(folder: Path, name: str) -> dict:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise AdapterError(f"adapter '{name}': missing {path}")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"adapter '{name}': {path} is not valid JSON ({e})") from e
    if not isinstance(config, dict):
        raise AdapterError(f"adapter '{name}': {path} must hold a JSON object")
    peft_type = str(config.get("peft_type", "LORA")).upper()
    if peft_type != "LORA":
        raise AdapterError(f"adapter '{name}': {path} has peft_type {peft_type}; only plain LoRA is supported")
    for flag, what in (("use_dora", "DoRA"), ("lora_bias", "a LoRA bias"), ("use_qalora", "QALoRA")):
        if config.get(flag):
            raise AdapterError(f"adapter '{name}': {path} sets {flag} ({what}); only plain LoRA is supported")
    if config.get("modules_to_save"):
        raise AdapterError(
            f"adapter '{name}': {path} has modules_to_save {config['modules_to_save']}; "
            "fully trained modules cannot be routed, only LoRA factors"
        )
    for key in ("r", "lora_alpha"):
        value = config.get(key)
        if not _positive_number(value):
            raise AdapterError(f"adapter '{name}': {path} field '{key}' must be a positive number, got {value!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        patterns = config.get(key) or {}
        if not isinstance(patterns, dict) or not all(_positive_number(v) for v in patterns.values()):
            raise AdapterError(
                f"adapter '{name}': {path} field '{key}' must map module patterns to positive numbers, got {patterns!r}"
            )
    return config


def _read_tensors(folder: Path, name: str) -> tuple[dict[str, torch.Tensor], Path]:
    st, bin_ = folder / SAFETENSORS_FILE, folder / BIN_FILE
    try:
        if st.is_file():
            from safetensors.torch import load_file

            return load_file(str(st)), st
        if bin_.is_file():
            # Legacy pickles are only read with weights_only=True: no arbitrary code runs.
            return torch.load(bin_, map_location="cpu", weights_only=True), bin_
    except Exception as e:  # a truncated or foreign file: say which
        bad = st if st.is_file() else bin_
        raise AdapterError(f"adapter '{name}': cannot read weights {bad}: {e}") from e
    raise AdapterError(f"adapter '{name}': no {SAFETENSORS_FILE} or {BIN_FILE} in {folder}")


def read_adapter(folder: str | Path, name: str | None = None) -> LoraAdapter:
    """Read one PEFT LoRA folder into per-module factors with PEFT's scaling rules applied."""
    folder = Path(folder)
    name = name or folder.name
    check_name(name, f"adapter folder {folder}")
    if not folder.is_dir():
        raise AdapterError(f"adapter '{name}': {folder} is not a folder")
    config = _read_config(folder, name)
    tensors, wfile = _read_tensors(folder, name)

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        m = _KEY.match(key)
        if not m:
            what = "DoRA magnitude" if "lora_magnitude" in key else "unexpected"
            raise AdapterError(
                f"adapter '{name}': {wfile} holds {what} tensor '{key}'; only lora_A/lora_B weights are supported"
            )
        pairs.setdefault(m["module"], {})[m["ab"]] = tensor
    if not pairs:
        raise AdapterError(f"adapter '{name}': {wfile} holds no LoRA tensors")

    modules = {}
    for module, ab in sorted(pairs.items()):
        for part in "AB":
            if part not in ab:
                raise AdapterError(f"adapter '{name}': {wfile} has no lora_{part} tensor for module '{module}'")
        A, B = ab["A"].float(), ab["B"].float()
        if A.ndim != 2 or B.ndim != 2 or A.shape[0] != B.shape[1]:
            raise AdapterError(
                f"adapter '{name}': module '{module}' in {wfile} has lora_A {tuple(A.shape)} and lora_B "
                f"{tuple(B.shape)}; expected (r, d_in) and (d_out, r)"
            )
        r = _pattern_value(config.get("rank_pattern"), module, config["r"])
        if A.shape[0] != r:
            raise AdapterError(
                f"adapter '{name}': module '{module}' has rank {A.shape[0]} in {wfile} but {r} in its config"
            )
        if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
            raise AdapterError(f"adapter '{name}': module '{module}' in {wfile} holds NaN or Inf weights")
        alpha = float(_pattern_value(config.get("alpha_pattern"), module, config["lora_alpha"]))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        # check the factors as applied (alpha 1e308 makes scale·B Inf); library.py checks the aligned ones too
        if not math.isfinite(scale) or not torch.isfinite(B * scale).all():
            raise AdapterError(
                f"adapter '{name}': module '{module}' in {wfile}: lora_alpha {alpha:g} and rank {r} give "
                f"scale {scale:g}, which makes its update non-finite"
            )
        modules[module] = LoraModule(A=A, B=B, scale=scale, alpha=alpha)
    return LoraAdapter(
        name=name, source=str(folder.resolve()), modules=modules, config=config, checksum=adapter_checksum(folder)
    )


def find_adapter_folders(paths) -> list[Path]:
    """Adapter folders from a list of folders, each an adapter or a parent holding adapters."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    found = []
    for p in map(Path, paths):
        if p.name in ("", ".", ".."):  # `build LIB .`: the adapter is named after the folder itself
            p = p.resolve()
        if (p / CONFIG_FILE).is_file():
            found.append(p)
        elif p.is_dir():
            children, skipped = [], []
            for c in sorted(p.iterdir()):
                if (c / CONFIG_FILE).is_file():
                    children.append(c)
                elif c.is_dir() and not c.name.startswith("."):  # hidden: e.g. a training run's temporary folder
                    if (c / SAFETENSORS_FILE).is_file() or (c / BIN_FILE).is_file():
                        raise AdapterError(f"adapter '{c.name}': {c} holds adapter weights but no {CONFIG_FILE}")
                    skipped.append(c.name)
            if not children:
                raise AdapterError(f"{p} holds no {CONFIG_FILE}, neither itself nor in a subfolder")
            if skipped:
                log.warning(
                    "skipping %d folder(s) of %s without %s: %s",
                    len(skipped),
                    p,
                    CONFIG_FILE,
                    ", ".join(skipped[:10]) + (", ..." if len(skipped) > 10 else ""),
                )
            found.extend(children)
        else:
            raise AdapterError(f"adapter path {p} does not exist")
    names: dict[str, Path] = {}
    for p in found:
        check_name(p.name, f"adapter folder {p}")
        if p.name in names:
            raise AdapterError(f"two adapters are named '{p.name}': {names[p.name]} and {p}")
        names[p.name] = p
    return found


def check_fits(adapter: LoraAdapter, shapes: dict[str, list]) -> None:
    """Every module the adapter targets exists in the base model with matching (d_in, d_out)."""
    for module, lm in adapter.modules.items():
        if module not in shapes:
            raise AdapterError(
                f"adapter '{adapter.name}' ({adapter.source}) targets '{module}', which is not an adaptable "
                "linear module of the base model"
            )
        d_in, d_out = shapes[module][:2]
        if lm.A.shape[1] != d_in or lm.B.shape[0] != d_out:
            raise AdapterError(
                f"adapter '{adapter.name}' ({adapter.source}): module '{module}' maps {lm.A.shape[1]}->{lm.B.shape[0]} "
                f"but the base model's maps {d_in}->{d_out}"
            )
