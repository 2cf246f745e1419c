"""The package's layers, read from the source: every import points down the documented order
(README, "Architecture"), and the edge runtime shares no code with the main package."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "sparsemeta"
EDGE = Path(__file__).resolve().parents[1] / "edge" / "src" / "sparsemeta_edge"
#: bottom to top; a unit may import its own layer and the ones below it, nothing else
LAYERS = ("foundations", "sparsity", "data", "models", "config", "meta", "training",
          "experiments", "cli")
ENTRY_POINTS = ("__init__", "__main__")  # the package itself may start the CLI
ALIASES = {"configs": "config"}  # the packaged YAML presets belong to the config layer
MAX_FUNCTION_LINES = 80


def _unit(path: Path, src: Path) -> str:
    rel = path.relative_to(src).parts
    return rel[0] if len(rel) > 1 else rel[0].removesuffix(".py")


def _imported(tree: ast.AST, path: Path, src: Path) -> list[tuple[str, int]]:
    """(top-level sparsemeta unit, line) of every import in a module, function-level too."""
    out = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif isinstance(node, ast.ImportFrom):
            base = ("sparsemeta",) + path.parent.relative_to(src).parts
            base = base[: len(base) - node.level + 1]
            names = [".".join(base + ((node.module,) if node.module else ()))]
        for name in names:
            parts = name.split(".")
            if parts[0] == "sparsemeta" and len(parts) > 1:
                out.append((parts[1], node.lineno))
    return out


def import_violations(src: Path = SRC) -> list[str]:
    rank = {name: i for i, name in enumerate(LAYERS)}
    bad = []
    for path in sorted(src.rglob("*.py")):
        unit = ALIASES.get(_unit(path, src), _unit(path, src))
        if unit in ENTRY_POINTS:
            continue
        if unit not in rank:
            bad.append(f"{path.relative_to(src)}: unit '{unit}' has no place in LAYERS")
            continue
        for target, line in _imported(ast.parse(path.read_text()), path, src):
            target = ALIASES.get(target, target)
            if target != unit and rank.get(target, len(LAYERS)) >= rank[unit]:
                bad.append(f"{path.relative_to(src)}:{line}: {unit} imports {target} "
                           "(up or sideways)")
    return bad


def test_every_import_points_down_the_documented_layers():
    assert import_violations() == []


def test_the_check_catches_an_upward_import(tmp_path):
    """The check itself can fail: a data module importing training is reported."""
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "bad.py").write_text("from sparsemeta.training.loop import train\n")
    (tmp_path / "training").mkdir()
    (tmp_path / "training" / "ok.py").write_text("from sparsemeta.data.bad import x\n")
    assert import_violations(tmp_path) == ["data/bad.py:1: data imports training (up or sideways)"]


def test_the_readme_states_the_same_order():
    """The order is stated on the docs site's architecture page (the README links to it)."""
    page = (SRC.parents[1] / "docs" / "architecture.md").read_text(encoding="utf-8")
    assert " → ".join(LAYERS) in page


def test_the_edge_runtime_imports_nothing_of_the_main_package():
    for path in EDGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                         else [node.module or ""])
                assert not any(n.split(".")[0] in ("sparsemeta", "torch") for n in names), path


@pytest.mark.parametrize("root", [SRC, EDGE], ids=["sparsemeta", "sparsemeta_edge"])
def test_no_function_is_longer_than_the_limit(root):
    long = [f"{path.relative_to(root)}:{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for path in root.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert long == []


def test_a_layer_imports_a_module_by_name_only_where_the_layering_says_so():
    """Imports by name are invisible to the import check above, so below the experiments
    (whose method registry imports its own modules) each is listed: the data registry's loaders
    (its own layer) and the config's section providers (the one import of a layer above it, on
    the first config built — see config.SECTION_PROVIDERS)."""
    from sparsemeta.config import SECTION_PROVIDERS
    from sparsemeta.data.registry import LOADERS

    rank = {name: i for i, name in enumerate(LAYERS)}
    below = [path for path in SRC.rglob("*.py") if rank.get(
        ALIASES.get(_unit(path, SRC), _unit(path, SRC)), 0) < rank["experiments"]]
    dynamic = sorted(str(p.relative_to(SRC)) for p in below if "import_module(" in p.read_text())
    assert dynamic == ["config.py", "data/registry.py"]
    assert all(m.startswith("sparsemeta.data.") for m, _ in LOADERS.values())
    assert [m.split(".")[1] for m in SECTION_PROVIDERS] == ["experiments"]
