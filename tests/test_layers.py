"""The import-layer contract (fast, reads source only): frontends → pipeline → stages → ir → shared,
never back up; a stage imports only earlier stages; no import cycles between modules.

Every `import` and `from … import` in onnxsnp/**/*.py counts — at module level, inside functions
and under `if TYPE_CHECKING:` alike (a typing-only import still ties the lower module to the
higher one's types; only the cycle check leaves it out, since it never runs). docs/DEVELOPMENT.md
states the rule; a violation that is the design is listed in EXCEPTIONS with the reason."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "onnxsnp"

# Lowest first. A component is a top-level module or sub-package of onnxsnp.
SHARED = ("errors", "progress", "threads", "heap")  # no onnxsnp imports beyond each other
IR = ("ir",)
# The stages in the order the flow runs them (pipeline.py's docstring): match, then the plan the
# later stages pass on (its types hold matched blocks), io (loading — and writing a genai folder,
# which takes the plan's widths), calibrate, score/allocate, the option declarations (they name
# the criteria, calibration and plan enums) and their checks (they know compensation's limits),
# compensate, rewrite, verify, report. A stage imports only earlier stages, ir and shared.
STAGES = ("match", "plan", "io", "data", "score", "compensate", "option_schema", "options",
          "rewrite", "verify", "report")
PIPELINE = ("pipeline",)
FRONTENDS = ("sweeping", "api", "olive", "cli", "__main__", "__init__")  # __init__: onnxsnp's lazy `api`
LAYERS = {**{c: (0, "shared") for c in SHARED}, **{c: (1, "ir") for c in IR},
          **{c: (2 + i, f"stage {c}") for i, c in enumerate(STAGES)},
          **{c: (2 + len(STAGES), "pipeline") for c in PIPELINE},
          **{c: (3 + len(STAGES), "frontend") for c in FRONTENDS}}

# (importing module, imported module) → why the upward import is the design, not a misplaced piece
# (a misplaced piece is moved instead: a data type to plan.py or the lowest stage that reads it, a
# helper to the lower layer).
EXCEPTIONS = {
    ("onnxsnp.compensate.onepass", "onnxsnp.rewrite.rewriting"):
        "DESIGN: the one-pass route is a flow of its own: it refits, rewrites and keeps each piece only if "
        "held-back fidelity rises, so it runs the rewrite and verify stages",
    ("onnxsnp.compensate.onepass", "onnxsnp.verify.verification"): "DESIGN: as above (fidelity of each piece)",
    ("onnxsnp.compensate.onepass", "onnxsnp.options"): "DESIGN: as above (the flow reads the checked options)",
    ("onnxsnp.score.sensitivity", "onnxsnp.compensate.batches"):
        "DESIGN: the --target-* survey measures each unit's loss after the compensation would refit it, "
        "on the reconstruction's own batches, so allocation reads compensation's machinery",
    ("onnxsnp.score.sensitivity", "onnxsnp.compensate.least_squares"): "DESIGN: as above (refits)",
    ("onnxsnp.score.sensitivity", "onnxsnp.compensate.projection"): "DESIGN: as above (projected pairs)",
    ("onnxsnp.score.sensitivity", "onnxsnp.compensate.reconstruction"): "DESIGN: as above (the reconstructor)",
    ("onnxsnp.score.downstream", "onnxsnp.compensate.batches"):
        "DESIGN: the survey's measured cut per half is carried to the last stream on the same batches",
    ("onnxsnp.score.downstream", "onnxsnp.compensate.least_squares"): "DESIGN: as above (the cut's refit)",
    ("onnxsnp.data.calib_data", "onnxsnp.option_schema"):
        "DESIGN: raw calibration's defaults (text length, image size, …) are declared once, in the option schema",
}


def modules() -> dict[str, tuple[Path, bool]]:
    """Every module of the package by dotted name, with its file and whether it is a package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if package else parts)] = (path, package)
    return found


def _typing_only(tree: ast.Module) -> set[int]:
    """ids of import nodes under `if TYPE_CHECKING:`."""
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            ids |= {id(n) for child in node.body for n in ast.walk(child)}
    return ids


def imports(known: dict[str, tuple[Path, bool]]) -> list[tuple[str, str, int, bool]]:
    """(importer, imported, line, typing_only) for every onnxsnp import; `from a import b` names
    the module a.b where b is one, else a."""
    edges = []
    for name, (path, package) in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        typing = _typing_only(tree)
        here = name.split(".") if package else name.split(".")[:-1]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                base = ".".join(here[:len(here) - node.level + 1] + ([node.module] if node.module else [])) \
                    if node.level else node.module or ""
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            edges += [(name, t, node.lineno, id(node) in typing) for t in targets
                      if t == "onnxsnp" or t.startswith("onnxsnp.")]
    return edges


def component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


KNOWN = modules()
EDGES = imports(KNOWN)


def test_every_module_has_a_layer():
    assert sorted({component(m) for m in KNOWN} - set(LAYERS)) == []


def test_the_graph_is_read():  # the parser sees the imports the flow is made of
    pairs = {(a, b) for a, b, _, _ in EDGES}
    assert {("onnxsnp.pipeline", "onnxsnp.rewrite.rewriting"), ("onnxsnp.cli", "onnxsnp.pipeline"),
            ("onnxsnp.compensate.onepass", "onnxsnp.data.prepared")} <= pairs  # the last one typing only


def test_no_layer_imports_a_higher_one():
    broken = []
    for importer, imported, line, typing in EDGES:
        (low, low_name), (high, high_name) = LAYERS[component(importer)], LAYERS[component(imported)]
        if high > low and (importer, imported) not in EXCEPTIONS:
            rule = ("a stage imports only earlier stages, ir and shared modules"
                    if low_name.startswith("stage") and high_name.startswith("stage")
                    else f"{low_name} never imports {high_name}")
            broken.append(f"{importer} (line {line}{', typing only' if typing else ''}) imports {imported}: {rule}")
    assert broken == [], "import-layer contract (docs/DEVELOPMENT.md):\n" + "\n".join(broken)


def test_exceptions_are_still_needed():
    """A fixed violation takes its exception with it."""
    pairs = {(a, b) for a, b, _, _ in EDGES}
    assert [e for e in EXCEPTIONS if e not in pairs] == []


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges.get(root, ()))))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root), on.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter[0]
                    counter[0] += 1
                    stack.append(child), on.add(child)
                    work.append((child, iter(sorted(edges.get(child, ())))))
                elif child in on:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component_ = []
                while True:
                    member = stack.pop()
                    on.discard(member)
                    component_.append(member)
                    if member == node:
                        break
                if len(component_) > 1:
                    found.append(sorted(component_))
    return found


def test_no_import_cycles():
    graph: dict[str, set[str]] = {}
    for importer, imported, _, typing in EDGES:
        if not typing and imported != importer:
            graph.setdefault(importer, set()).add(imported)
    cycles = _cycles(graph)
    lines = {(a, b): n for a, b, n, t in EDGES if not t}
    shown = []
    for members in cycles:  # one shortest loop through each component, by line
        path = _loop(graph, members)
        shown.append(" → ".join(f"{a} (line {lines[a, b]})" for a, b in zip(path, path[1:])) + f" → {path[-1]}")
    assert cycles == [], "import cycles (function-local imports included):\n" + "\n".join(shown)


def _loop(edges: dict[str, set[str]], members: list[str]) -> list[str]:
    """The shortest path from the component's first module back to it (breadth first)."""
    start, inside = members[0], set(members)
    before: dict[str, str] = {}
    queue = [start]
    for node in queue:
        for child in sorted(edges.get(node, ())):
            if child == start:
                path = [node]
                while path[-1] != start:
                    path.append(before[path[-1]])
                return path[::-1] + [start]
            if child in inside and child not in before:
                before[child] = node
                queue.append(child)
    return members


@pytest.mark.parametrize("edges,cycles", [({"a": {"b"}, "b": {"a"}, "c": {"a"}}, [["a", "b"]]),
                                          ({"a": {"b"}, "b": {"c"}}, [])])
def test_the_cycle_finder(edges, cycles):
    assert _cycles(edges) == cycles


def test_a_cycle_is_shown_by_its_shortest_loop():
    assert _loop({"a": {"b", "c"}, "b": {"c"}, "c": {"a"}}, ["a", "b", "c"]) == ["a", "c", "a"]
