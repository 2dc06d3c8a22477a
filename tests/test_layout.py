"""The tree reads as the data flow: the README's layout is the tree, layers import only backwards, no cycles."""

import ast
import re
from pathlib import Path

import tomllib

from conftest import REPO

SRC = REPO / "src" / "slmops"
LAYERS = ["core", "training", "shipping", "measuring", "cli"]  # each imports only from itself and those before


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    return {
        ".".join(("slmops", *p.relative_to(SRC).with_suffix("").parts)).removesuffix(".__init__"): p
        for p in SRC.rglob("*.py")
    }


def imports(path: Path) -> set[str]:
    """Every slmops module a file imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("slmops")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("slmops"):
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}  # `from slmops.x import module`
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: {m for m in imports(path) if m in known and m != name} for name, path in known.items()}


def test_readme_layout_is_the_tree():
    readme = (REPO / "README.md").read_text()
    block = readme[readme.index("## Layout") :].split("```")[1]
    documented, package = set(), None
    for line in block.splitlines():
        if not line.strip() or line.strip() == "src/slmops/":
            continue
        first = line.split()[0]
        if line.startswith("  ") and not line.startswith("    ") and first.endswith("/"):
            package = first.rstrip("/")
        elif line.startswith("    "):
            documented |= {f"{package}/{word}" for word in line.split() if re.fullmatch(r"[\w/]+\.py", word)}
    actual = {
        str(p.relative_to(SRC))
        for p in SRC.rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py") and p.parent != SRC
    }
    assert documented == actual, (
        f"in the tree, not in README's layout: {sorted(actual - documented)}; "
        f"in README's layout, not in the tree: {sorted(documented - actual)}"
    )
    packages = {str(p.parent.relative_to(SRC)) for p in SRC.rglob("__init__.py") if p.parent != SRC}
    assert packages <= {d.split("/")[0] for d in documented} | {d.rsplit("/", 1)[0] for d in documented}


def test_every_module_is_in_a_layer_and_imports_only_backwards():
    order = {name: i for i, name in enumerate(LAYERS)}
    layer = lambda module: order[module.split(".")[1]]  # noqa: E731
    loose = [m for m in modules() if m.count(".") == 1 and m != "slmops.cli" and m.split(".")[1] not in order]
    assert not loose, f"modules outside the layers: {loose}"
    backwards = [
        (a, b)
        for a, deps in graph().items()
        if a.count(".") >= 1 and a.split(".")[1] in order
        for b in deps
        if b.count(".") >= 1 and b.split(".")[1] in order and layer(b) > layer(a)
    ]
    assert not backwards, f"a module imports from a later layer: {backwards}"


def test_no_import_cycle():
    deps = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(deps[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt] if nxt in path else [node, nxt]
                raise AssertionError(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = 2

    for module in sorted(deps):
        if module not in state:
            visit(module, [module])


def test_no_module_imports_private_names():
    private = [
        (name, f"{node.module}.{a.name}")
        for name, path in modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("slmops")
        for a in node.names
        if a.name.startswith("_") and a.name != "__version__"
    ]
    assert not private, f"private names imported across modules: {private}"


def test_library_never_runs_the_cli():
    offenders = [
        name
        for name, path in modules().items()
        if not name.startswith("slmops.cli")
        and ("slmops.cli" in imports(path) or re.search(r"[\"']slmops\.cli[\"']", path.read_text()))
    ]
    assert not offenders, f"library modules that import or run the CLI: {offenders}"


def test_pyproject_lists_every_package():
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    actual = {".".join(("slmops", *p.parent.relative_to(SRC).parts)) for p in SRC.rglob("__init__.py")}
    assert listed == actual | {"slmops.recipes"}
