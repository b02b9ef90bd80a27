"""The house rules that the import-linter contracts (pyproject.toml, run by CI) do not say by themselves:
no import cycle anywhere in the package (imports inside functions included), no method touching the
shared model behind its workbench, and a short experiment module."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedrouter"


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_in_the_package():
    grimp = pytest.importorskip("grimp", reason="grimp comes with import-linter (the dev extra)")
    built = grimp.build_graph("fedrouter")  # imports inside functions count too
    graph = {m: {d for d in built.find_modules_directly_imported_by(m) if d.startswith("fedrouter")}
             for m in built.modules if m.startswith("fedrouter")}
    assert _cycles(graph) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_method_reaches_past_its_workbench():
    # what the workbench keeps behind it: the shared model, the peft model, the tokenizer, the raw splits
    hidden = {"shared", "model", "tokenizer", "splits", "train_data", "train_examples"}
    offenders = []
    for path in sorted((SRC / "methods").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr in hidden:
                offenders.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert offenders == []


def test_the_experiment_module_only_picks_the_engine_and_runs_the_driver():
    assert len((SRC / "experiment.py").read_text().splitlines()) < 120
