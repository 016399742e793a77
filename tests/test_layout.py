"""The package's rooms: the library never imports the applications (cli, bench, demo), models never import the
engine or data, tokenizer/ takes only config, errors, comm, jsonl and layers from beit3, and no module imports in a cycle.

Read from the source with ``ast`` (every import, also those inside functions), so this is also the command to check
the layout by hand: ``python -m pytest tests/test_layout.py -q``.
"""
from __future__ import annotations

import ast
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
APPLICATIONS = ("beit3.cli", "beit3.bench", "beit3.demo")
COMPAT_ALIASES = {"beit3.run_pretraining": "beit3.cli.pretrain", "beit3.run_finetuning": "beit3.cli.finetune"}
COMPAT_REEXPORTS = {"beit3.pretrain": {"MaskedDataModeling": "beit3.masked_data_modeling", "PretrainInputs": "beit3.masking",
                                       "visual_codes_fn": "beit3.data.codes"}}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for package in ("beit3", "tokenizer"):
        for path in sorted((REPO / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules ``name`` imports (absolute and relative, at any depth of the file)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            # the longest project module the target names (``from beit3.models import X`` -> beit3.models)
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                out.add(target)
    return out


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    found = modules()
    return {name: imports_of(name, path, set(found)) for name, path in found.items() if name not in COMPAT_ALIASES and name not in COMPAT_REEXPORTS}


def is_in(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def test_library_never_imports_the_applications(graph):
    wrong = {m: sorted(t for t in targets if is_in(t, APPLICATIONS))
             for m, targets in graph.items() if not is_in(m, APPLICATIONS)}
    assert not {m: t for m, t in wrong.items() if t}


def test_models_and_tokenizer_stay_in_their_rooms(graph):
    for m, targets in graph.items():
        if is_in(m, ("beit3.models",)):
            assert not [t for t in targets if is_in(t, ("beit3.engine", "beit3.data", "beit3.finetune"))], m
        if is_in(m, ("tokenizer",)):
            allowed = ("tokenizer", "beit3.config", "beit3.errors", "beit3.comm", "beit3.jsonl", "beit3.models.layers")
            assert not [t for t in targets if not is_in(t, allowed) and t != "beit3"], (m, targets)


def test_no_import_cycles(graph):
    # package __init__ files that only re-export their children are not edges back up
    edges = {m: {t for t in targets if not m.startswith(t + ".")} for m, targets in graph.items()}
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                cycles.append(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])
    assert not cycles


@pytest.mark.parametrize("old,new", sorted(COMPAT_ALIASES.items()))
def test_compatibility_aliases_are_the_moved_modules(old, new):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        alias = importlib.import_module(old)
    assert alias is importlib.import_module(new)
    assert any(issubclass(w.category, DeprecationWarning) and new in str(w.message) for w in caught)


@pytest.mark.parametrize("old", sorted(COMPAT_REEXPORTS))
def test_compatibility_reexports_are_the_moved_names(old):
    import importlib
    import sys

    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    assert any(issubclass(w.category, DeprecationWarning) for w in caught)
    for name, home in COMPAT_REEXPORTS[old].items():
        assert getattr(module, name) is getattr(importlib.import_module(home), name)
