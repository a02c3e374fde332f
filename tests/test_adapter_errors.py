"""Every bad adapter gives an AdapterError that names the adapter and the file at fault."""

import json

import pytest
import torch
from conftest import save_lora, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file

from loralag import build_library, read_adapter
from loralag.errors import AdapterError
from loralag.library.adapters import find_adapter_folders
from loralag.library.store import module_shapes


@pytest.fixture
def good(tmp_path):
    return save_lora(tiny_llama(), tmp_path / "ads" / "good", seed=0, r=4)


def edit_config(folder, **changes):
    path = folder / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


def edit_tensors(folder, fn):
    path = folder / "adapter_model.safetensors"
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path))


def first_key(tensors, part):
    return next(k for k in sorted(tensors) if f"lora_{part}" in k)


def test_good_adapter_reads(good):
    a = read_adapter(good)
    assert a.name == "good" and a.rank == 4 and len(a.modules) == 4


@pytest.mark.parametrize(
    "breakage,match",
    [
        (lambda f: (f / "adapter_config.json").unlink(), r"missing .*adapter_config\.json"),
        (lambda f: (f / "adapter_config.json").write_text("{not json"), r"adapter_config\.json is not valid JSON"),
        (lambda f: edit_config(f, r=0), r"field 'r' must be a positive number"),
        (lambda f: edit_config(f, r=8), r"rank 4 in .* but 8 in its config"),
        (lambda f: edit_config(f, use_dora=True), r"use_dora \(DoRA\)"),
        (lambda f: edit_config(f, peft_type="IA3"), r"peft_type IA3"),
        (lambda f: edit_config(f, modules_to_save=["lm_head"]), r"modules_to_save"),
        (lambda f: (f / "adapter_model.safetensors").unlink(), r"no adapter_model\.safetensors"),
        (lambda f: (f / "adapter_model.safetensors").write_bytes(b"garbage"), r"cannot read weights"),
        (lambda f: edit_tensors(f, lambda t: t.pop(first_key(t, "B"))), r"no lora_B tensor for module"),
        (
            lambda f: edit_tensors(f, lambda t: t.update({"base_model.model.extra.bias": torch.zeros(3)})),
            r"unexpected tensor 'base_model\.model\.extra\.bias'",
        ),
        (
            lambda f: edit_tensors(
                f,
                lambda t: t.update(
                    {first_key(t, "A").replace("lora_A.weight", "lora_magnitude_vector"): torch.ones(3)}
                ),
            ),
            r"DoRA magnitude",
        ),
        (lambda f: edit_tensors(f, lambda t: t[first_key(t, "A")].__setitem__((0, 0), float("nan"))), r"NaN or Inf"),
        (lambda f: edit_tensors(f, lambda t: t[first_key(t, "B")].__setitem__((0, 0), float("inf"))), r"NaN or Inf"),
        (
            lambda f: edit_tensors(f, lambda t: t.update({first_key(t, "A"): torch.zeros(3, 32)})),
            r"expected \(r, d_in\) and \(d_out, r\)",
        ),
    ],
)
def test_bad_adapter_is_named(good, breakage, match):
    breakage(good)
    with pytest.raises(AdapterError, match=match) as err:
        read_adapter(good)
    assert "'good'" in str(err.value)


def test_legacy_bin_is_read_with_weights_only(good):
    tensors = load_file(str(good / "adapter_model.safetensors"))
    ref = read_adapter(good)
    (good / "adapter_model.safetensors").unlink()
    torch.save(tensors, good / "adapter_model.bin")
    again = read_adapter(good)
    assert all(torch.equal(again.modules[m].A, ref.modules[m].A) for m in ref.modules)
    # a pickle that needs code to load is refused, not executed
    torch.save({"x": torch.nn.Linear(2, 2)}, good / "adapter_model.bin")
    with pytest.raises(AdapterError, match=r"cannot read weights .*adapter_model\.bin"):
        read_adapter(good)


def test_shapes_that_do_not_fit_the_model(tmp_path, good):
    gpt2 = tiny_gpt2()
    with pytest.raises(
        AdapterError, match=r"'good' .* targets 'model\.layers\.0\.self_attn\.q_proj', which is not an adaptable"
    ):
        build_library(tmp_path / "lib", [good], base_model="gpt2", shapes=module_shapes(gpt2), progress=False)
    shapes = module_shapes(tiny_llama())
    shapes["model.layers.0.self_attn.q_proj"] = [64, 32, "linear"]
    with pytest.raises(AdapterError, match=r"maps 32->32 but the base model's maps 64->32"):
        build_library(tmp_path / "lib2", [good], base_model="other", shapes=shapes, progress=False)


def test_duplicate_names_and_missing_paths(tmp_path, good):
    twin = save_lora(tiny_llama(), tmp_path / "elsewhere" / "good", seed=1)
    with pytest.raises(AdapterError, match=r"two adapters are named 'good'"):
        find_adapter_folders([good, twin])
    with pytest.raises(AdapterError, match=r"does not exist"):
        find_adapter_folders([tmp_path / "nope"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match=r"holds no adapter_config\.json"):
        find_adapter_folders([tmp_path / "empty"])
