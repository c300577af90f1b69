"""The layout's one-way dependencies (README, Layout): each package imports only the packages its
row allows, anywhere in a module (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ALLOWED = {
    "memoir": {"memoir"},
    "store": {"store", "memoir"},
    "pipeline": {"pipeline", "store"},
    "workers": {"workers", "memoir", "store", "pipeline"},
    "serving": {"serving", "memoir", "store", "pipeline"},
}


def project_imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        found |= {name.split(".")[0] for name in names} & set(ALLOWED)
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_a_package_imports_only_what_its_layer_allows(package):
    wrong = {str(path.relative_to(ROOT)): sorted(project_imports(path) - ALLOWED[package])
             for path in sorted((ROOT / package).rglob("*.py"))}
    assert {path: names for path, names in wrong.items() if names} == {}


def test_the_check_sees_a_forbidden_import(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("def f():\n    from workers.runtime import Runtime\n    import serving.app\n")
    assert project_imports(module) == {"workers", "serving"}
