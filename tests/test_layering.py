"""Layers import only downward (design.md section 1), checked with ast over the package sources."""

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[1] / "flowkern"

# module prefix -> layer
LAYERS = [
    ("flowkern.cli", 6),
    ("flowkern.app", 6),
    ("flowkern.train", 6),
    ("flowkern.metrics", 6),
    ("flowkern.models", 5),
    ("flowkern.rewards", 5),
    ("flowkern.methods", 4),
    ("flowkern.adjoint", 3),
    ("flowkern.sampling", 3),
    ("flowkern.ops", 2),
    ("flowkern.profiling", 1),
    ("flowkern._C", 1),
]
# third-party packages allowed from a layer upward (L1-L4 need only torch, Triton optional)
THIRD_PARTY_MIN_LAYER = {"diffusers": 5, "transformers": 5, "peft": 5, "accelerate": 6}
# within L6: cli -> train -> metrics
L6_ORDER = {"flowkern.cli": 3, "flowkern.app": 3, "flowkern.train": 2, "flowkern.metrics": 1}


def layer_of(module: str) -> int | None:
    for prefix, layer in LAYERS:
        if module == prefix or module.startswith(prefix + "."):
            return layer
    return None


def module_name(path: pathlib.Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports(path: pathlib.Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            for alias in node.names:  # `from flowkern import adjoint`
                if node.module == "flowkern":
                    yield f"flowkern.{alias.name}"


def test_layers_import_only_downward():
    violations = []
    files = sorted(ROOT.rglob("*.py"))
    assert len(files) > 5
    for path in files:
        mod = module_name(path)
        own = layer_of(mod)
        if own is None:
            continue
        for imp in imports(path):
            top = imp.split(".")[0]
            if top in THIRD_PARTY_MIN_LAYER and own < THIRD_PARTY_MIN_LAYER[top]:
                violations.append(f"{mod} (L{own}) imports {imp} (allowed from L{THIRD_PARTY_MIN_LAYER[top]})")
            other = layer_of(imp)
            if other is None or imp == "flowkern":
                continue
            if other > own:
                violations.append(f"{mod} (L{own}) imports {imp} (L{other})")
            if own == other == 6:
                a = next(v for k, v in L6_ORDER.items() if mod.startswith(k))
                b = next(v for k, v in L6_ORDER.items() if imp.startswith(k))
                if b > a:
                    violations.append(f"{mod} imports {imp} (L6 order is cli -> train -> metrics)")
    assert not violations, "\n".join(violations)


def import_graph() -> dict[str, set[str]]:
    """flowkern module -> the flowkern modules it imports (any import, lazy or under TYPE_CHECKING, counts;
    ``from package import submodule`` is an edge to the submodule, a package's __init__ is a module of its own)."""
    modules = {module_name(path): path for path in ROOT.rglob("*.py")}
    graph = {}
    for mod, path in modules.items():
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names if alias.name in modules)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    if sub in modules:
                        edges.add(sub)
                    elif node.module in modules:
                        edges.add(node.module)
        edges.discard(mod)
        graph[mod] = edges
    return graph


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

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
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_import_cycles():
    """No two modules import each other, directly or around a loop, inside a layer or across layers (e.g. the trainer
    and its checkpoint code: checkpoint stores a plain state dict and imports nothing of the trainer)."""
    graph = import_graph()
    assert "flowkern.train.checkpoint" in graph["flowkern.train.trainer"]  # the graph sees the real imports
    assert not import_cycles(graph), import_cycles(graph)


def test_cycle_detection_finds_a_loop():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert import_cycles(graph) == [["a", "b", "c"]]
    assert import_cycles({"trainer": {"checkpoint"}, "checkpoint": {"trainer"}}) == [["checkpoint", "trainer"]]
