"""The import graph of parti_jax: no import cycles, no import that runs up the layers.

The graph is read from the source with `ast` (imports inside functions
included; nothing is imported), over `parti_jax/` and the two folders installed
under its name (`tasks/` as parti_jax.tasks, `launch/` as parti_jax.launch).
`from pkg import name` counts as an import of the submodule `pkg.name` when
there is one, else of `pkg` itself (its `__init__.py`).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Where each package's source lives (setup.py's package_dir).
SOURCES = {
    "parti_jax": ROOT / "parti_jax",
    "parti_jax.tasks": ROOT / "tasks",
    "parti_jax.launch": ROOT / "launch",
}

# How the code is meant to stand, lowest first: a unit (a top-level module or a
# subpackage of parti_jax) may import units of its own layer or of those below.
LAYERS: tuple[tuple[str, ...], ...] = (
    # the model and what it is sharded and decoded with; small helpers
    ("models", "partitioning", "decoding", "rerank", "devices", "workdir", "storage"),
    ("data",),  # the input pipeline: the shapes world, codes, vocabularies
    ("tasks",),  # SeqIO registrations over data/
    ("train",),  # the encoder-decoder's trainer and the training loop
    ("vqgan", "upsampler"),  # the image tokenizer and the upsampler, with their trainers
    # reading trained work dirs; memory plans; the contrastive model (its scorer loads one)
    ("loading", "memory", "contrastive"),
    ("sampling", "benchmark"),  # generation, timings
    ("eval",),  # eval suites and reports
    # inference bundles and their model card, the Pipeline and its web server; the demo
    ("bundle", "export", "model_card", "pipeline", "serve", "demo", "__init__"),
    ("launch",),  # launchers for clusters
    ("cli", "__main__"),  # the command line
)


def module_files(sources: dict[str, Path]) -> dict[str, Path]:
    """{module name: file} of every .py file under the source folders."""
    out = {}
    for package, folder in sources.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join([package, *parts])] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest prefix of a dotted name that is one of `modules`."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in modules:
            return prefix
    return None


def _import_statements(tree: ast.Module):
    """Every import statement, at any depth of statements (not inside expressions)."""
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        for field in ("body", "orelse", "finalbody", "handlers", "cases"):
            stack.extend(getattr(node, field, ()))


def import_edges(modules: dict[str, Path]) -> list[tuple[str, int, str]]:
    """(importing module, line, imported module) for every import between `modules`."""
    edges = []
    for module, path in modules.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in _import_statements(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [_resolve(a.name, modules) for a in node.names]
            else:
                base = node.module or ""
                if node.level:  # relative: from the package, level - 1 packages up
                    parts = package.split(".")
                    anchor = parts[: len(parts) - node.level + 1]
                    base = ".".join([*anchor, base] if base else anchor)
                targets = []
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in modules else _resolve(base, modules))
            edges += [(module, node.lineno, t) for t in dict.fromkeys(targets) if t]
    return edges


def unit_of(module: str) -> str:
    """parti_jax.data.shapes -> 'data'; parti_jax -> '__init__'."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def upward_imports(
    edges: list[tuple[str, int, str]], layers: tuple[tuple[str, ...], ...]
) -> list[tuple[str, int, str]]:
    """The edges from a unit to a unit on a higher layer (units without a layer: none)."""
    level = {unit: i for i, units in enumerate(layers) for unit in units}
    up = level.get  # an unknown unit is reported by test_every_unit_has_a_layer
    return [e for e in edges if up(unit_of(e[2]), -1) > up(unit_of(e[0]), len(layers))]


def import_cycles(edges: list[tuple[str, int, str]]) -> list[list[str]]:
    """Groups of two or more modules that import each other in a loop (Tarjan), sorted."""
    graph: dict[str, set[str]] = {}
    for src, _, dst in edges:
        graph.setdefault(src, set()).add(dst)
        graph.setdefault(dst, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(groups)


@pytest.fixture(scope="module")
def graph():
    modules = module_files(SOURCES)
    return modules, import_edges(modules)


def _where(modules: dict[str, Path], edge: tuple[str, int, str]) -> str:
    src, line, dst = edge
    return f"{modules[src].relative_to(ROOT)}:{line} imports {dst}"


def test_every_unit_has_a_layer(graph):
    modules, _ = graph
    known = {unit for units in LAYERS for unit in units}
    missing = sorted({unit_of(m) for m in modules} - known)
    assert not missing, f"units without a layer: {missing}; add each to LAYERS where it stands"


def test_no_import_runs_up_the_layers(graph):
    modules, edges = graph
    level = {unit: i for i, units in enumerate(LAYERS) for unit in units}
    wrong = [
        f"{_where(modules, e)} ({unit_of(e[0])!r} on layer {level[unit_of(e[0])]}, "
        f"{unit_of(e[2])!r} on layer {level[unit_of(e[2])]})"
        for e in upward_imports(edges, LAYERS)
    ]
    assert not wrong, "imports that run up the layers:\n" + "\n".join(wrong)


def test_no_import_cycles(graph):
    modules, edges = graph
    lines = []
    for group in import_cycles(edges):
        members = set(group)
        lines.append("cycle: " + ", ".join(group))
        lines += ["  " + _where(modules, e) for e in edges if e[0] in members and e[2] in members]
    assert not lines, "\n".join(lines)


def test_checks_find_a_cycle_and_an_upward_import(tmp_path):
    """The checks themselves, on a made-up package: low.a <-> low.b, low.a -> high."""
    pkg = tmp_path / "pkg"
    (pkg / "low").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "low" / "__init__.py").write_text("")
    (pkg / "low" / "a.py").write_text("from . import b\n\ndef f():\n    import pkg.high\n")
    (pkg / "low" / "b.py").write_text("from pkg.low.a import f\n")
    (pkg / "high.py").write_text("from pkg.low import a, b\n")
    modules = module_files({"pkg": pkg})
    edges = import_edges(modules)
    assert sorted(edges) == [
        ("pkg.high", 1, "pkg.low.a"),
        ("pkg.high", 1, "pkg.low.b"),
        ("pkg.low.a", 1, "pkg.low.b"),
        ("pkg.low.a", 4, "pkg.high"),
        ("pkg.low.b", 1, "pkg.low.a"),
    ]
    assert import_cycles(edges) == [["pkg.high", "pkg.low.a", "pkg.low.b"]]
    assert upward_imports(edges, (("low",), ("high",))) == [("pkg.low.a", 4, "pkg.high")]
