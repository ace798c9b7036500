"""The bundle's layers, as the README lists them: every import inside ``scripts`` goes to a layer listed above."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "bundles" / "cellvta" / "scripts"


def readme_layers() -> list[str]:
    """The layer names of the README's layout block, lowest first (``files``, ``model``, ...)."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("bundles/cellvta/scripts/"))
    layers = []
    for line in lines[start + 1:]:
        match = re.match(r"  (\w+)(/|\.py) ", line)
        if match is None:
            break
        layers.append(match.group(1))
    return layers


def layer_of(module: str) -> str | None:
    """``scripts.data.datasets`` -> ``data``; None outside ``scripts``."""
    parts = module.split(".")
    return parts[1] if parts[0] == "scripts" and len(parts) > 1 else None


def imported_layers(source: str, package: list[str]) -> set[str]:
    """The layers of ``scripts`` a module of ``package`` (e.g. ``["scripts", "nuclei"]``) with this source imports
    anywhere: relative or absolute, at the top or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[:len(package) - node.level + 1]
            names = [".".join([*base, node.module])] if node.module else [".".join([*base, a.name]) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module or ""]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        found |= {layer for layer in map(layer_of, names) if layer is not None}
    return found


def test_the_readme_lists_every_layer_once():
    layers = readme_layers()
    present = {p.stem for p in SCRIPTS.glob("*.py") if p.stem != "__init__"} | {
        p.parent.name for p in SCRIPTS.glob("*/__init__.py")}
    assert sorted(layers) == sorted(present) and len(set(layers)) == len(layers)


def test_every_import_goes_to_a_lower_layer():
    rank = {layer: i for i, layer in enumerate(readme_layers())}
    upward = []
    for path in sorted(SCRIPTS.rglob("*.py")):
        parts = path.relative_to(SCRIPTS).parts
        own = path.stem if len(parts) == 1 else parts[0]
        if own == "__init__":
            continue
        layers = imported_layers(path.read_text(), ["scripts", *parts[:-1]])
        upward += [f"{'/'.join(parts)} imports {layer}" for layer in sorted(layers) if rank[layer] > rank[own]]
    assert not upward, upward


def test_the_layer_check_sees_relative_absolute_and_function_level_imports():
    source = ("from ..files import atomic_path\nimport scripts.model.network\nfrom scripts.data import stain\n"
              "def f():\n    from ..cells.classifier import load_classifier\n    from . import metrics\n"
              "    from .. import slides\n    import numpy\n")
    assert imported_layers(source, ["scripts", "nuclei"]) == {"files", "model", "data", "cells", "nuclei", "slides"}
