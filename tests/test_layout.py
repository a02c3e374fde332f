"""The layout's rules, read from the source: packages import only the layers below them, and only routing/
writes a model's routing settings."""

from __future__ import annotations

import ast
from pathlib import Path

import loralag

ROOT = Path(loralag.__file__).parent
# low to high along the data path; a unit may import only units of a lower rank (generate, evaluation and
# serve share theirs with what is beside them: none imports another)
RANK = {
    "errors": 0,
    "models": 1,
    "workers": 1,
    "library": 2,
    "routing": 3,
    "training": 4,
    "generate": 4,
    "evaluation": 5,
    "serve": 5,
    "cluster": 6,
    "experiments": 7,
    "cli": 8,
}


def _unit(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "loralag"


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        name = ".".join(("loralag", *path.relative_to(ROOT).with_suffix("").parts)).removesuffix(".__init__")
        yield name, path, ast.parse(path.read_text(encoding="utf-8"))


def _imports(tree) -> list[str]:
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "loralag":
            out += [node.module] if node.module != "loralag" else [f"loralag.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            out += [a.name for a in node.names if a.name.split(".")[0] == "loralag"]
    return out


def test_packages_import_only_lower_layers():
    wrong = []
    for name, path, tree in _modules():
        unit = _unit(name)
        if unit == "loralag":  # the package's own lazy exports
            continue
        assert unit in RANK, f"{path}: a new top-level unit '{unit}' needs a place in RANK"
        for target in _imports(tree):
            other = _unit(target)
            if other != unit and other in RANK and RANK[other] >= RANK[unit]:
                wrong.append(f"{path.relative_to(ROOT)} imports {target}")
    assert not wrong, "\n".join(wrong)


def test_only_routing_touches_routing_settings():
    wrong = []
    for name, path, tree in _modules():
        if _unit(name) == "routing":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Name) and node.id == "STATE_ATTR":
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} reads STATE_ATTR")
            if isinstance(node, ast.Attribute) and node.attr == "_specs":
                wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} touches _specs")
            if isinstance(node, (ast.Assign, ast.AugAssign)):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    text = ast.unparse(target)
                    if ".specs" in text:
                        wrong.append(f"{path.relative_to(ROOT)}:{node.lineno} writes {text}")
    assert not wrong, "\n".join(wrong)


def test_every_package_says_what_it_owns_and_imports():
    for init in ROOT.glob("*/__init__.py"):
        doc = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) or ""
        assert len(doc) > 40 and "import" in doc.lower(), f"{init}: say what the package owns and may import"
