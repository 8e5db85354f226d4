"""The package's shape: imports point one way (no cycle), files stay small enough to read, and
imports inside functions defer a heavy optional dependency, each saying why.

Read from the source with ``ast``, so the test sees every import, also those inside functions.
"""

from __future__ import annotations

import ast
from pathlib import Path

from tests.conftest import ROOT

PACKAGE = ROOT / "src" / "detector"
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 60


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def sources() -> dict[str, tuple[Path, ast.Module]]:
    return {module_name(p): (p, ast.parse(p.read_text())) for p in sorted(PACKAGE.rglob("*.py"))}


def _type_checking_only(tree: ast.Module) -> set[int]:
    """Line numbers of imports under ``if TYPE_CHECKING:`` (never run, so never a cycle)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
            for sub in ast.walk(node):
                if isinstance(sub, ast.Import | ast.ImportFrom):
                    lines.add(sub.lineno)
    return lines


def imported_modules(tree: ast.Module, known: set[str]) -> set[str]:
    """The package's own modules that ``tree`` imports, at any depth."""
    skip = _type_checking_only(tree)
    found = set()
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            if node.module in known:
                found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names} & known
    return found


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def import_graph() -> dict[str, set[str]]:
    mods = sources()
    known = set(mods)
    graph = {}
    for name, (_, tree) in mods.items():
        # A package's __init__ is imported with each of its modules: it must not import them.
        graph[name] = imported_modules(tree, known) - {name}
    return graph


def test_no_import_cycle():
    graph = import_graph()
    assert len(graph) > 20  # the walk found the package
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_imports_point_one_way():
    """Shared utilities import no task, model or data module; model, data and evaluation import
    no task; nothing imports an entry point's task module from below."""
    graph = import_graph()
    layers = {
        "detector.errors": 0,
        "detector.files": 1,
        "detector.hardware": 1,
        "detector.launch_env": 0,
        "detector.distributed": 2,
        "detector.config": 3,
    }
    for name, imports in graph.items():
        if name.startswith("detector.tasks"):
            continue
        bad = sorted(i for i in imports if i.startswith("detector.tasks"))
        assert not bad, f"{name} imports {bad}: tasks are the top layer"
        if name in layers:
            below = [i for i in imports if layers.get(i, 99) >= layers[name]]
            assert not below, f"{name} (a shared utility) imports {below}"


def test_no_file_is_too_long():
    long = {
        str(p.relative_to(ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > MAX_FILE_LINES
    }
    assert not long, long


def test_imports_inside_functions_say_why():
    """One allowed reason: deferring a heavy or optional dependency; a comment on the import
    (or above its block of imports) says which."""
    unexplained = []
    for _, (path, tree) in sources().items():
        lines = path.read_text().splitlines()
        skip = _type_checking_only(tree)
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import | ast.ImportFrom) and node.lineno not in skip:
                    here, j = lines[node.lineno - 1], node.lineno - 2
                    while lines[j].strip().startswith(("import ", "from ")):  # one block
                        j -= 1
                    above = lines[j].strip()
                    if "#" not in here and not above.startswith("#"):
                        unexplained.append(
                            f"{path.relative_to(ROOT)}:{node.lineno}: {here.strip()}"
                        )
    assert not unexplained, "\n".join(unexplained)


def test_long_functions_say_why():
    """A function over 60 lines says in its docstring why it stays one piece ("One piece: ...")."""
    long = []
    for _, (path, tree) in sources().items():
        for fn in ast.walk(tree):
            if isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                n = fn.end_lineno - fn.lineno + 1
                if n > MAX_FUNCTION_LINES and "One piece:" not in (ast.get_docstring(fn) or ""):
                    long.append(f"{path.relative_to(ROOT)}:{fn.lineno} {fn.name} ({n} lines)")
    assert not long, "\n".join(long)


def test_readme_layout_names_every_module():
    """The README's Layout section is where a reader finds each job: it names every file."""
    readme = (ROOT / "README.md").read_text()
    layout = readme[readme.index("## Layout") :]
    layout = layout[: layout.index("\n## ")] if "\n## " in layout else layout
    missing = []
    for p in sorted(PACKAGE.rglob("*.py")):
        if p.name == "__init__.py":
            continue
        rel = p.relative_to(PACKAGE)
        folder = f"{rel.parent}/" if rel.parent.name else None
        if rel.name not in layout or (folder and folder not in layout):
            missing.append(str(rel))
    assert not missing, f"README Layout does not name: {missing}"
