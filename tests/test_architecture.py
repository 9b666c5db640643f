"""The layering rules of docs/architecture.md, read off the code itself.

Layers, lowest first: ``utils`` < ``data`` < ``features`` < ``cache`` < ``index`` < ``heads`` < ``model`` < ``tuning`` <
``stages`` < entry points (``cli``, ``transformer``, ``__init__``, ``__main__``). A module imports only from its own
layer or below, no stage imports another stage (a stage may be a package of its own modules), no import cycle exists (counting imports inside
functions), no private name crosses a module boundary, no function is longer than 80 lines and no module
is longer than 500.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "pipeline"
LAYERS = ("utils", "data", "features", "cache", "index", "heads", "model", "tuning", "stages")
MAX_FUNCTION_LINES = 80
MAX_MODULE_LINES = 500


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, ast.Module]:
    return {_module_name(p): ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.rglob("*.py"))}


def _is_package(name: str) -> bool:
    return (PACKAGE.parent / name.replace(".", "/") / "__init__.py").exists()


def _resolve(module: str, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".")
    if not _is_package(module):
        base = base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _imports(modules: dict[str, ast.Module]):
    """(importer, imported module, names) for every import of a pipeline module, anywhere in the file."""
    for name, tree in modules.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _resolve(name, node)
                if not target.startswith("pipeline"):
                    continue
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    if sub in modules:
                        yield name, sub, []
                    else:
                        yield name, target, [alias.name]
            elif isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.startswith("pipeline"):
                        yield name, alias.name, []


def _layer(module: str) -> int:
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in LAYERS:
        return LAYERS.index(parts[1])
    return len(LAYERS)  # entry points: the package itself, cli, transformer, __main__


def _edges(modules) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for src, dst, _ in _imports(modules):
        if dst in modules and dst != src and not src.startswith(dst + "."):
            graph[src].add(dst)
    return graph


def test_no_import_cycles():
    graph = _edges(_modules())
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycles.append(stack[stack.index(nxt) :] + [nxt])
            elif nxt not in state:
                visit(nxt, stack + [nxt])
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert cycles == []


def test_imports_only_run_down_the_layers():
    modules = _modules()
    back = [
        (src, dst)
        for src, dst, _ in _imports(modules)
        if dst in modules and _layer(dst) > _layer(src) and not src.startswith(dst + ".")
    ]
    assert back == []


def _stage(module: str) -> str:
    """``pipeline.stages.report`` for ``pipeline.stages.report.sections``: a stage may be a package."""
    return ".".join(module.split(".")[:3])


def test_stages_never_import_each_other():
    modules = _modules()
    crossing = [
        (src, dst)
        for src, dst, _ in _imports(modules)
        if src.startswith("pipeline.stages.")
        and dst.startswith("pipeline.stages.")
        and _stage(src) != _stage(dst)
    ]
    assert crossing == []


def test_no_private_name_crosses_a_module():
    modules = _modules()
    private = [
        (src, dst, n)
        for src, dst, names in _imports(modules)
        for n in names
        if n.startswith("_") and dst != src
    ]
    private += [
        (src, dst, "")
        for src, dst, _ in _imports(modules)
        if dst.rsplit(".", 1)[-1].startswith("_") and dst.rsplit(".", 1)[-1] not in ("__init__", "__main__")
    ]
    assert private == []


def test_no_private_attribute_of_another_object_is_used():
    """``obj._name`` for a private member featcache defines: only on ``self`` or ``cls``."""
    modules = _modules()
    members = {
        n.name if not isinstance(n, ast.Assign) else t.id
        for tree in modules.values()
        for cls in ast.walk(tree)
        if isinstance(cls, ast.ClassDef)
        for n in cls.body
        for t in (n.targets if isinstance(n, ast.Assign) else [None])
        if (getattr(n, "name", None) or getattr(t, "id", "")).startswith("_")
    }
    members |= {
        node.attr
        for tree in modules.values()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self"
    }
    found = [
        (name, node.lineno, node.attr)
        for name, tree in modules.items()
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and node.attr in members
        and node.attr.startswith("_")
        and not node.attr.startswith("__")
        and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))
    ]
    assert found == []


def test_functions_are_short_enough_to_read_at_once():
    long = []
    for name, tree in _modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = node.end_lineno - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    long.append((name, node.name, n))
    assert long == []


def test_modules_hold_one_idea_a_few_hundred_lines_long():
    """A module over :data:`MAX_MODULE_LINES` lines holds more than one idea: split it along its ideas."""
    long = {
        _module_name(p): n
        for p in sorted(PACKAGE.rglob("*.py"))
        if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES
    }
    assert long == {}
