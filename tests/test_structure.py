"""Structural rules of ``src/spinifel`` checked on the source with ``ast`` (no imports).

* no function longer than :data:`MAX_LINES` lines (docstring included);
* MPI only in ``spinifel/parallel/``: no ``import mpi4py`` / ``from mpi4py`` and no call
  of a communicator's collective or point-to-point method anywhere else;
* no import cycle between spinifel modules through module-level imports.

Each checker also runs on a small known-bad sample, so a checker that silently finds
nothing fails too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "spinifel"
MAX_LINES = 120
PARALLEL = PACKAGE / "parallel"
MPI_METHODS = {
    "Allreduce", "allreduce", "Reduce", "Bcast", "bcast", "Gather", "gather",
    "Gatherv", "Allgather", "allgather", "Allgatherv", "Scatter", "scatter", "Scatterv",
    "Sendrecv", "sendrecv", "Send", "send", "Recv", "recv", "Isend", "isend", "Irecv",
    "irecv", "Barrier", "barrier", "Alltoall", "alltoall", "Alltoallv", "Split", "Abort",
}


def _modules() -> dict[str, Path]:
    """Dotted module name -> file for every module of the package."""
    out = {}
    for p in sorted(PACKAGE.rglob("*.py")):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def long_functions(source: str, limit: int = MAX_LINES) -> list[tuple[str, int]]:
    """``(name, lines)`` of every function or method longer than ``limit`` lines."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > limit:
                out.append((node.name, n))
    return out


def mpi_uses(source: str) -> list[str]:
    """Lines using MPI directly: an mpi4py import or a call of an MPI method name."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] == "mpi4py"
                                                for a in node.names):
            out.append(f"line {node.lineno}: import mpi4py")
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mpi4py":
            out.append(f"line {node.lineno}: from mpi4py")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
              and node.func.attr in MPI_METHODS):
            out.append(f"line {node.lineno}: .{node.func.attr}(")
    return out


def module_imports(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """Spinifel modules imported at module level (not inside functions) by module ``name``."""
    out: set[str] = set()
    tree = ast.parse(source)
    base = name if is_package else name.rpartition(".")[0]

    def visit(stmts):
        for node in stmts:
            if isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in known)
            elif isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                if node.level:
                    pkg = base.rsplit(".", node.level - 1)[0] if node.level > 1 else base
                    mod = f"{pkg}.{mod}" if mod else pkg
                for a in node.names:
                    if f"{mod}.{a.name}" in known:
                        out.add(f"{mod}.{a.name}")
                    elif mod in known:
                        out.add(mod)
            elif isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(node.orelse)
                for h in getattr(node, "handlers", []):
                    visit(h.body)
                visit(getattr(node, "finalbody", []))

    visit(tree.body)
    out.discard(name)
    return out


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(u: str) -> list[str] | None:
        state[u] = 1
        stack.append(u)
        for v in sorted(graph.get(u, ())):
            if state.get(v) == 1:
                return stack[stack.index(v):] + [v]
            if v not in state:
                c = dfs(v)
                if c:
                    return c
        stack.pop()
        state[u] = 2
        return None

    for u in sorted(graph):
        if u not in state:
            c = dfs(u)
            if c:
                return c
    return None


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    return {m: module_imports(p.read_text(), m, p.name == "__init__.py", known)
            for m, p in mods.items()}


# ------------------------------------------------------------------------------ the rules


def test_no_function_longer_than_limit():
    """Catches a function growing past 120 lines (run_pipeline was 353)."""
    bad = [f"{p.relative_to(SRC)}:{name} ({n} lines)"
           for p in _modules().values() for name, n in long_functions(p.read_text())]
    assert not bad, "functions over %d lines: %s" % (MAX_LINES, ", ".join(bad))


def test_mpi_only_in_parallel_package():
    """Catches an mpi4py import or a comm.gather/sendrecv/... call outside parallel/
    (the pipeline's gathers and matching's ring sendrecv used to be there)."""
    bad = []
    for p in _modules().values():
        if PARALLEL in p.parents:
            continue
        bad += [f"{p.relative_to(SRC)} {u}" for u in mpi_uses(p.read_text())]
    assert not bad, "MPI outside spinifel/parallel/: " + "; ".join(bad)


def test_no_import_cycle():
    """Catches a module-level import cycle (io/cxi <-> io/dataset was one, through
    function-level imports; now neither may appear at module level either)."""
    cycle = find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_graph_sees_real_edges():
    """Catches an import-graph builder that finds no edges (every cycle test would pass)."""
    g = _graph()
    assert "spinifel.geometry.points" in g["spinifel.orientation.slicing"]
    assert "spinifel.geometry.points" in g["spinifel.merging.merge"]
    assert "spinifel.io.common" in g["spinifel.io.cxi"]
    assert "spinifel.io.cxi" in g["spinifel.io.dataset"]  # `from spinifel.io import cxi`


# ------------------------------------------------------------------ the checkers fail


def test_checkers_flag_known_bad_samples():
    """Catches checkers that never fire: each finds its violation in a small sample."""
    long_src = "def f():\n" + "    x = 1\n" * MAX_LINES
    assert long_functions(long_src) == [("f", MAX_LINES + 1)]
    assert long_functions("def f():\n" + "    x = 1\n" * (MAX_LINES - 1)) == []
    mpi_src = ("from mpi4py import MPI\nimport mpi4py.MPI\n"
               "def f(comm, x):\n    return comm.allgather(x) + comm.Sendrecv(x)\n")
    uses = mpi_uses(mpi_src)
    assert len(uses) == 4, uses
    assert mpi_uses("def f(x):\n    return x.sum()\n") == []
    known = {"spinifel.a", "spinifel.b", "spinifel.c"}
    g = {"spinifel.a": module_imports("from spinifel.b import x\n", "spinifel.a", False, known),
         "spinifel.b": module_imports("import spinifel.c\n", "spinifel.b", False, known),
         "spinifel.c": module_imports("from spinifel import a\n"
                                      "def f():\n    from spinifel import b\n",
                                      "spinifel.c", False, known)}
    assert g["spinifel.c"] == {"spinifel.a"}  # the function-level import is not counted
    assert find_cycle(g) == ["spinifel.a", "spinifel.b", "spinifel.c", "spinifel.a"]
    g["spinifel.c"] = set()
    assert find_cycle(g) is None


@pytest.mark.parametrize("name", ["spinifel.pipeline.solver", "spinifel.orientation.matching",
                                  "spinifel.merging.merge"])
def test_algorithm_modules_do_not_import_mpi(name):
    """Catches an algorithm module importing mpi4py at any level (inside functions too)."""
    src = _modules()[name].read_text()
    assert not [u for u in mpi_uses(src) if "mpi4py" in u]
