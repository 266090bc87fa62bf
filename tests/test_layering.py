"""The import layering of regfsck/ stays one-way, as docs/architecture.md draws it.

* the core never imports the CLI (`regfsck.cli` renders; nothing below it knows it exists);
* a judging module never imports an acting one (the layers come from the architecture
  table: a module whose job starts with "acting" acts; one whose job is judgement, a plan,
  read-only or "no I/O" judges), lazily inside a function or not;
* module-level imports form no cycle.

Imports are read from the source (ast), so a lazy import inside a function counts too;
imports under `if TYPE_CHECKING:` count for the layers but not for cycles.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from tests.support import REPO_ROOT

PACKAGE = REPO_ROOT / "regfsck"
ARCHITECTURE = (REPO_ROOT / "docs" / "architecture.md").read_text()


@dataclass(frozen=True)
class Import:
    target: str
    line: int
    runtime_top: bool  # module level and not under TYPE_CHECKING


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO_ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(name: str) -> list[Import]:
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    typing_only = {id(sub) for node in ast.walk(tree) if isinstance(node, ast.If)
                   and "TYPE_CHECKING" in ast.unparse(node.test) for sub in ast.walk(node)}
    top = {id(node) for node in tree.body}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            targets = [base, *(f"{base}.{alias.name}" for alias in node.names)]
        else:
            continue
        for target in targets:
            if target in MODULES and target != name:
                found.append(Import(target, node.lineno,
                                    id(node) in top and id(node) not in typing_only))
    return found


def layers() -> tuple[set[str], set[str]]:
    """(acting, judging) module names, from the architecture table's "its one job" column."""
    acting: set[str] = set()
    judging: set[str] = set()
    for row in re.finditer(r"^\| (`[^|]+`) \| ([^|]+) \|$", ARCHITECTURE, re.M):
        names = [f"regfsck.{n.removesuffix('.py').replace('/', '.')}"
                 for n in re.findall(r"`([\w/]+\.py)`", row.group(1))]
        job = row.group(2).strip().lower()
        if job.startswith("acting"):
            acting.update(names)
        elif re.search(r"judg|read-only|no i/o|\bplan\b", job) \
                and not re.search(r"\bappl|\bwrit(e|es|ing)\b|acting", job):
            judging.update(names)
    return acting, judging


def test_the_architecture_table_names_the_layers() -> None:
    acting, judging = layers()
    # The table is what the rule is read from: if it stops naming these, the test would
    # check nothing, so it says so.
    assert {"regfsck.safety", "regfsck.quarantine", "regfsck.sweep", "regfsck.export"} <= acting
    assert {"regfsck.checks", "regfsck.gc", "regfsck.rm", "regfsck.undoplan",
            "regfsck.why", "regfsck.inspect", "regfsck.diskmap"} <= judging
    assert not acting & judging
    assert (acting | judging) <= set(MODULES), (acting | judging) - set(MODULES)


def test_the_core_never_imports_the_cli() -> None:
    wrong = [f"{name}:{imp.line} imports {imp.target}"
             for name in MODULES if not name.startswith("regfsck.cli") and name != "regfsck.__main__"
             for imp in imports_of(name) if imp.target.startswith("regfsck.cli")]
    assert wrong == []


def test_judging_modules_never_import_acting_modules() -> None:
    acting, judging = layers()
    wrong = [f"{name}:{imp.line} imports {imp.target}"
             for name in sorted(judging) for imp in imports_of(name) if imp.target in acting]
    assert wrong == []


def test_no_import_cycles() -> None:
    graph = {name: {imp.target for imp in imports_of(name) if imp.runtime_top} for name in MODULES}
    # a package's __init__ is imported by every module in it: not an edge of a cycle
    graph = {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(graph[name]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target):], target])
            elif target not in state:
                visit(target, [*path, target])
        state[name] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert cycles == []
