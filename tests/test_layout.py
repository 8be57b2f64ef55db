"""The house rules of docs/ARCHITECTURE.md, checked on the source: layers, no method importing
another method, no import cycle, small classes, a README per method."""

from __future__ import annotations

import ast
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PKG = os.path.join(ROOT, "flux_app")
#: what each layer may import from flux_app (a method may also import its own package)
ALLOWED = {
    "common": {"common"},
    "data": {"data"},
    "engine": {"common", "data", "engine"},
    "methods": {"common", "data", "engine"},
    "testing": {"common", "data", "engine"},
    "deploy": {"deploy"},
}


def _modules() -> dict[str, str]:
    """Dotted module name -> path, for every module of flux_app."""
    out = {}
    for folder, _, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                rel = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = path
    return out


def _imports(path: str, *, top_level_only: bool) -> set[str]:
    """flux_app modules imported by a file (``TYPE_CHECKING`` blocks never count; with
    ``top_level_only`` imports inside functions do not count either)."""
    with open(path) as fh:
        tree = ast.parse(fh.read())
    found: set[str] = set()

    def visit(node: ast.AST, depth: int) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                continue
            inner = depth + isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef))
            if top_level_only and inner:
                continue
            if isinstance(child, ast.ImportFrom) and child.module and child.level == 0:
                if child.module.startswith("flux_app"):
                    found.add(child.module)
                    found.update(f"{child.module}.{a.name}" for a in child.names)
            elif isinstance(child, ast.Import):
                found.update(a.name for a in child.names if a.name.startswith("flux_app"))
            visit(child, inner)

    visit(tree, 0)
    return found


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_layers_import_only_what_they_may():
    modules = _modules()
    bad = []
    for mod, path in modules.items():
        layer = _layer(mod)
        if layer not in ALLOWED:
            continue
        for imp in _imports(path, top_level_only=False):
            if imp not in modules:
                continue  # a name imported from a module, not a module
            target = _layer(imp)
            own_method = layer == "methods" and (
                imp.split(".")[:3] == mod.split(".")[:3] or mod == "flux_app.methods"
            )
            if target not in ALLOWED[layer] and not own_method and imp != "flux_app":
                bad.append(f"{mod} imports {imp}")
    assert not bad, "layer rule broken:\n" + "\n".join(sorted(bad))


def test_no_method_imports_another_method():
    modules = _modules()
    bad = []
    for mod, path in modules.items():
        if not mod.startswith("flux_app.methods."):
            continue
        mine = mod.split(".")[2]
        for imp in _imports(path, top_level_only=False):
            parts = imp.split(".")
            if parts[:2] == ["flux_app", "methods"] and len(parts) > 2 and parts[2] != mine:
                bad.append(f"{mod} imports {imp}")
    assert not bad, "\n".join(bad)


def test_no_import_cycle():
    modules = _modules()
    graph = {
        m: {i for i in _imports(p, top_level_only=True) if i in modules and i != m}
        for m, p in modules.items()
    }
    # a package's __init__ importing its own submodules is not a cycle of ideas
    for m in graph:
        graph[m] = {i for i in graph[m] if not (i.startswith(m + ".") and m in _packages(modules))}
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> list[str] | None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                return stack[stack.index(n) :] + [n]
            if n not in state and (cycle := dfs(n)):
                return cycle
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(graph):
        if m not in state:
            cycle = dfs(m)
            assert cycle is None, " -> ".join(cycle)


def _packages(modules: dict[str, str]) -> set[str]:
    return {m for m, p in modules.items() if p.endswith("__init__.py")}


def test_classes_are_small():
    sizes = {}
    for mod, path in _modules().items():
        with open(path) as fh:
            tree = ast.parse(fh.read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ClassDef):
                sizes[f"{mod}.{node.name}"] = node.end_lineno - node.lineno + 1
    largest = max(sizes, key=sizes.get)
    assert sizes[largest] < 260, f"{largest} has {sizes[largest]} lines"


def test_every_method_has_a_readme_and_registers():
    from flux_app.engine.registry import STRATEGIES, load_plugins

    load_plugins()
    folders = sorted(
        d for d in os.listdir(os.path.join(PKG, "methods")) if not d.startswith(("_", "."))
    )
    for d in folders:
        assert os.path.exists(os.path.join(PKG, "methods", d, "README.md")), d
    owners = {
        cls.__module__.split(".")[2]
        for cls in STRATEGIES.values()
        if cls.__module__.startswith("flux_app.methods.")
    }
    assert owners == set(folders)
