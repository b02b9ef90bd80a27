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


def test_modules_stay_a_size_one_can_read():
    sizes = {path.relative_to(SRC).as_posix(): len(path.read_text().splitlines()) for path in SRC.rglob("*.py")}
    assert [name for name, n in sizes.items() if n > 450] == []
    # FedRouter's whole task discovery and routing, with the generic clustering it stands on (issue 31)
    assert sum(n for name, n in sizes.items() if name.startswith("methods/fedrouter/")) + sizes["core/cluster.py"] <= 1200


# Words that are method names and ordinary words too: the local DP mode and router mode ("local"), and the
# package's own name ("fedrouter": a cache folder, a JSON field, a logger). A literal of either says nothing
# about a method; a comparison of a method name with them still counts (`_method_knowledge`).
_ALSO_WORDS = {"local", "fedrouter"}


def _is_method_name(node) -> bool:
    """`x.method`, `method`, `x["method"]`: an expression that holds a method's name."""
    return ((isinstance(node, ast.Attribute) and node.attr == "method") or (isinstance(node, ast.Name) and node.id == "method")
            or (isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) and node.slice.value == "method"))


def _method_knowledge(source: str, names: set[str]) -> list[str]:
    """Where `source` knows a method by its name: a literal method name (but the ordinary words above), a
    startswith/endswith on a method name or with a prefix of one, a method name compared with one."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names - _ALSO_WORDS:
            found.append(f"{node.lineno}: the literal {node.value!r}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in ("startswith", "endswith")
              and (_is_method_name(node.func.value) or any(
                  isinstance(a, ast.Constant) and isinstance(a.value, str) and any(n.startswith(a.value) for n in names)
                  for a in node.args))):
            found.append(f"{node.lineno}: .{node.func.attr}(...) on a method name")
        elif isinstance(node, ast.Compare) and any(_is_method_name(side) for side in [node.left, *node.comparators]) and any(
                isinstance(c, ast.Constant) and c.value in names
                for side in [node.left, *node.comparators] if not _is_method_name(side) for c in ast.walk(side)):
            found.append(f"{node.lineno}: a method name compared with a literal")
    return found


def test_no_method_is_known_by_its_name_outside_methods():
    # What the layers above need of a method, the method declares (methods.base.MethodFacts, read through
    # methods.facts_of); the registry (methods/__init__.py) is the one place names are listed.
    from fedrouter.methods import METHODS

    offenders = []
    for path in sorted(SRC.rglob("*.py")):
        if path.relative_to(SRC).parts[0] == "methods":
            continue
        offenders += [f"{path.relative_to(SRC)}:{where}" for where in _method_knowledge(path.read_text(), set(METHODS))]
    assert offenders == []


def test_the_method_name_check_finds_what_it_looks_for():
    names = {"fedit", "flora", "fedrouter", "fedrouter-star", "local"}
    assert len(_method_knowledge('PRIVATE = ("fedit", "flora")', names)) == 2
    assert _method_knowledge('if cfg.method.startswith("fedrouter"): pass', names)
    assert _method_knowledge('rows = [r for r in rows if r["method"].startswith("x")]', names)
    assert _method_knowledge('if self.method == "fedrouter": pass', names)
    assert _method_knowledge('ok = name.startswith("fedrout")', names)
    assert _method_knowledge('mode = "local"; cache = "fedrouter"; mode == "local"; ok = scope["method"] == "GET"', names) == []
