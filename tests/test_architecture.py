"""The layering of the source tree: app -> tasks -> circuits -> sae, no import cycles between modules,
no private name imported across packages, no library module over 400 lines, argparse only in the app."""

from __future__ import annotations

import ast
from pathlib import Path

import networkx as nx

ROOT = Path(__file__).resolve().parent.parent
RANK = {"sae": 0, "circuits": 1, "tasks": 2, "sparse_circuits": 3}
LIBRARIES = ("sae", "circuits", "tasks")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every absolute import in a file, at any depth."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, [], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module, [alias.name for alias in node.names], node.lineno))
    return found


def source_files() -> list[Path]:
    return sorted(path for package in RANK for path in (ROOT / package).rglob("*.py"))


def test_dependencies_point_down_and_no_private_names_cross_packages():
    problems = []
    for path in source_files():
        package = path.relative_to(ROOT).parts[0]
        for module, names, line in imports(path):
            top = module.split(".")[0]
            if top in RANK and RANK[top] > RANK[package]:
                problems.append(f"{path.relative_to(ROOT)}:{line} imports {module} (a back edge)")
            if top in RANK and top != package and any(name.startswith("_") for name in names):
                problems.append(f"{path.relative_to(ROOT)}:{line} imports private names {names} from {module}")
    assert not problems, "\n".join(problems)


def test_no_import_cycles_between_modules():
    files = {module_name(path): path for path in source_files()}
    graph = nx.DiGraph()
    graph.add_nodes_from(files)
    for name, path in files.items():
        for module, names, _ in imports(path):
            candidates = [f"{module}.{item}" for item in names] + [module]
            target = next((candidate for candidate in candidates if candidate in files), None)
            if target is not None and target != name:
                graph.add_edge(name, target)
    cycles = list(nx.simple_cycles(graph))
    assert not cycles, f"import cycles: {cycles[:5]}"


def test_library_modules_are_small_and_have_no_argparse():
    problems = []
    for path in source_files():
        if path.relative_to(ROOT).parts[0] not in LIBRARIES:
            continue
        text = path.read_text()
        if len(text.splitlines()) > 400:
            problems.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        if "import argparse" in text or "from argparse" in text:
            problems.append(f"{path.relative_to(ROOT)}: argparse belongs in the app layer")
    assert not problems, "\n".join(problems)
