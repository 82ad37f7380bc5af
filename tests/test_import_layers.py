"""The package layers point one way (docs/DESIGN.md, "Packages"), read from the source, not from a list of cases.

``bunit`` knows only torch; ``baselines`` knows ``bunit``; in ``harness``, ``core`` knows no other harness package,
``measure`` knows ``core``, ``run`` knows ``core`` and ``measure``, ``analyse`` reads ``core`` and ``measure``'s
tables (and ``baselines``' family names), and only the CLI (and the package's lazy attribute table) sees everything. A project import inside a
function must say why on its line or the line above (an optional dependency, what each CLI command loads).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

ALLOWED = {
    "bunit": {"bunit"},
    "baselines": {"bunit", "baselines"},
    "harness.core": {"bunit", "baselines", "harness.core", "harness.compat"},
    "harness.measure": {"bunit", "baselines", "harness.core", "harness.measure", "harness.compat"},
    "harness.run": {"bunit", "baselines", "harness.core", "harness.measure", "harness.run", "harness.compat"},
    "harness.analyse": {"baselines", "harness.core", "harness.measure", "harness.analyse"},
}
PROJECT = ("bunit", "baselines", "harness")


def layer_of(module: str) -> str | None:
    """The layer a dotted module name belongs to (longest prefix in ``ALLOWED``), or None."""
    for name in sorted(ALLOWED, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return module if module in ("harness", "harness.compat", "harness.cli") else None


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_imports(path: Path, root: Path = ROOT) -> list[tuple[str, int, bool]]:
    """``(imported module, line, inside a function)`` for every import of a project package in ``path``."""
    mod = module_name(path, root)
    package = mod if path.name == "__init__.py" else mod.rsplit(".", 1)[0]
    tree = ast.parse(path.read_text())
    top = {id(node) for node in tree.body}
    for node in tree.body:  # `if TYPE_CHECKING:` / `try:` blocks at module level count as top level
        if isinstance(node, (ast.If, ast.Try)):
            top |= {id(n) for n in ast.walk(node)}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            names = [target + "." + a.name for a in node.names]  # a name may be a submodule: the longest prefix decides
        for name in names:
            if name.split(".")[0] in PROJECT:
                found.append((name, node.lineno, id(node) not in top))
    return found


SOURCES = sorted(p for pkg in ("bunit", "baselines", "harness") for p in (ROOT / pkg).rglob("*.py"))


def test_the_layers_exist():
    layers = {layer_of(module_name(p)) for p in SOURCES}
    assert {"bunit", "baselines", "harness.core", "harness.measure", "harness.run", "harness.analyse"} <= layers


def has_reason(lines: list[str], line: int) -> bool:
    """A comment on the import's line, or above the run of import lines it belongs to."""
    i = line - 1
    while i > 0 and lines[i - 1].strip().startswith(("from ", "import ")):
        i -= 1
    block = lines[i:line]
    return any("#" in text for text in block) or (i > 0 and lines[i - 1].strip().startswith("#"))


def wrong_arrows(path: Path, root: Path = ROOT) -> list[tuple[str, int]]:
    """Imports in ``path`` of a layer its own layer may not import."""
    mine = layer_of(module_name(path, root))
    if mine not in ALLOWED:  # harness/__init__.py, cli.py, compat.py: the entry points see everything
        return []
    return [(name, line) for name, line, _ in project_imports(path, root)
            if layer_of(name) not in ALLOWED[mine] and not name.startswith("harness.compat")]


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_point_down(path: Path):
    wrong = wrong_arrows(path)
    assert not wrong, f"{layer_of(module_name(path))} must not import {wrong}"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_imports_inside_functions_say_why(path: Path):
    lines = path.read_text().splitlines()
    silent = [(name, line) for name, line, inner in project_imports(path) if inner and not has_reason(lines, line)]
    assert not silent, f"imports inside functions without a stated reason: {silent}"


def test_the_checker_sees_wrong_arrows(tmp_path):
    """The check itself: a core module importing the runner, absolutely or relatively, in a function or not."""
    probe = tmp_path / "harness" / "core" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from harness.run.runner import run_suite\n\n\ndef f():\n    from ..analyse import verdict\n"
                     "    from . import store\n")
    assert wrong_arrows(probe, tmp_path) == [("harness.run.runner.run_suite", 1), ("harness.analyse.verdict", 5)]
    assert [inner for _, _, inner in project_imports(probe, tmp_path)] == [False, True, True]
