"""The layers import downward only, and through public names: grass_kernels never imports grass,
and python/grass uses only grass_kernels' public surface (no ``grass_kernels._private``)."""

from __future__ import annotations

import ast
from pathlib import Path

import grass_kernels

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path):
    """(module, names) of every import in ``path``; names are those taken from the module."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, ()
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.module, tuple(alias.name for alias in node.names)


def _private_attributes(path: Path):
    """``gk._x`` / ``grass_kernels._x`` attribute reads in ``path``."""
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in ("gk", "grass_kernels") and node.attr.startswith("_")):
            yield f"{node.value.id}.{node.attr}"


def _private(module: str, names: tuple[str, ...]) -> bool:
    parts = module.split(".")
    return parts[0] == "grass_kernels" and (
        any(p.startswith("_") for p in parts[1:]) or any(n.startswith("_") for n in names)
    )


def test_grass_kernels_never_imports_grass():
    files = sorted((ROOT / "grass_kernels").rglob("*.py"))
    assert files
    upward = [(f.name, m) for f in files for m, _ in _imports(f) if m.split(".")[0] == "grass"]
    assert upward == []


def test_grass_uses_only_public_grass_kernels():
    files = sorted((ROOT / "python" / "grass").rglob("*.py"))
    assert files
    private = [(f.name, m, n) for f in files for m, n in _imports(f) if _private(m, n)]
    assert private == []
    assert [(f.name, a) for f in files for a in _private_attributes(f)] == []
    # The names grass takes from grass_kernels are in its public list.
    taken = {n for f in files for m, names in _imports(f) if m == "grass_kernels" for n in names}
    assert taken <= set(grass_kernels.__all__)


def test_the_private_check_sees_private_imports():
    """The check itself: a private import, in either spelling, is reported."""
    assert _private("grass_kernels._checks", ("positive_int",))
    assert _private("grass_kernels", ("_checks",))
    assert not _private("grass_kernels", ("linear_grads",))
    sample = ROOT / "tests" / "test_layering.py"  # this file reads gk._checks below
    assert "gk._checks" in set(_private_attributes(sample))


def _reads_a_private_attribute(gk):
    return gk._checks
