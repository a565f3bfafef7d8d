"""The house's floors: core <- ps <- spark. Every import of core/, ps/ and spark/ (inside functions too) is
read with ast; no module takes part in an import cycle, and no lower floor imports a higher one."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLOORS = {"core": 0, "ps": 1, "spark": 2}


def module_files() -> dict:
    """module name -> path, for every .py under the three packages."""
    out = {}
    for top in FLOORS:
        for path in (ROOT / top).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules) -> set:
    """The project modules ``name`` imports, anywhere in its source."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()

    def add(target):
        while target and target not in modules:      # a.b.C (a class) -> a.b
            target = target.rpartition(".")[0]
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return found


def import_graph() -> dict:
    modules = module_files()
    return {name: imports_of(name, path, modules) for name, path in modules.items()}


def cycles(graph) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    assert "core.backends.numba_ops" in graph["core.backends"]          # imported inside get_backend()
    assert "ps.shards" in graph["ps.worker"] and "core" in graph["ps.worker"]       # the latter in run_worker
    assert len(graph) > 30


def test_no_import_cycles():
    found = cycles(import_graph())
    assert found == [], f"import cycles: {found}"


def test_no_import_from_a_lower_floor_to_a_higher_one():
    bad = [(src, dst) for src, targets in import_graph().items() for dst in targets
           if FLOORS[src.split(".")[0]] < FLOORS[dst.split(".")[0]]]
    assert bad == [], f"core must not import ps or spark, ps must not import spark: {bad}"


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []
