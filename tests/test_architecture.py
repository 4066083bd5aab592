"""The import rules that keep the layers apart: dependencies run one way.

Every module of orchestrator/ and worker/ is read with `ast`, imports at the top of a module and
inside functions alike (an import under `if TYPE_CHECKING:` never runs: it counts only for the
orchestrator -> worker rule). The rules:

- the worker loads no orchestrator module that draws tables or renders templates (jinja2, typer,
  rich), directly or through other orchestrator modules;
- the orchestrator reaches the worker in three modules only: the job entry a rank runs, the export
  and the reshard;
- no import cycles inside orchestrator, nor inside worker (top-level imports: an import inside a
  function is how a cycle is legitimately broken);
- the shared layer (orchestrator/spec/, orchestrator/rundir/) loads no jinja2, typer, rich, nor torch.

A chain follows what the importing code can run: a module imported by name may have its functions
called, so its imports inside functions count; a package above it only runs its `__init__`'s top
level (e.g. a registry that imports each backend when asked for one is not followed). A failure
names each chain: `worker.w -> orchestrator.a (worker/w.py line 3) -> orchestrator.render.files
(in a function, orchestrator/a.py line 7) -> jinja2 (orchestrator/render/files.py line 20)`.
"""

from __future__ import annotations

import ast
import functools
import itertools
import pickle
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pytest
from helpers import REPO

PACKAGES = ("orchestrator", "worker")
UI_LIBS = frozenset({"jinja2", "typer", "rich"})
HEAVY_LIBS = frozenset({"torch", "deepspeed", "transformers"})
SHARED_LAYER = ("orchestrator.spec", "orchestrator.rundir")
WORKER_ENTRIES = frozenset(
    {"orchestrator.lifecycle.job", "orchestrator.lifecycle.export", "orchestrator.lifecycle.reshard"}
)
"""The job entry submitit runs on each rank, and the export and reshard (worker/export.py and
worker/reshard.py read the checkpoint's files with torch)."""

Kind = Literal["top", "function", "type_checking"]


@dataclass(frozen=True)
class Import:
    module: str  # the importing module, "orchestrator.cli"
    target: str  # what it imports, absolute: "worker.export", "jinja2.sandbox"
    kind: Kind
    line: int
    file: str = ""  # the importing module's file, relative to the repository

    def describe(self) -> str:
        where = {"top": "", "function": "in a function, ", "type_checking": "if TYPE_CHECKING, "}[self.kind]
        return f"({where}{self.file or self.module} line {self.line})"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


@functools.cache
def modules() -> dict[str, Path]:
    """Every module of the two packages, by dotted name."""
    found: dict[str, Path] = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            found[module_name(path)] = path
    return found


def ancestors(name: str) -> list[str]:
    """The packages whose `__init__` runs before `name` loads: a.b.c -> [a, a.b]."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def is_internal(name: str) -> bool:
    return name.split(".")[0] in PACKAGES


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _resolve_from(module: str, is_package: bool, node: ast.ImportFrom) -> list[str]:
    """The modules a `from X import a, b` loads: X.a where that is a module, else X."""
    if node.level:
        package = module if is_package else module.rpartition(".")[0]
        base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
        base = ".".join([*base_parts, node.module] if node.module else base_parts)
    else:
        base = node.module or ""
    targets = []
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        targets.append(sub if sub in modules() else base)
    return sorted(set(targets))


@functools.cache
def imports_of(module: str) -> tuple[Import, ...]:
    """Every import statement of `module`, with where it sits."""
    path = modules()[module]
    is_package = path.name == "__init__.py"
    file = path.relative_to(REPO).as_posix()
    found: list[Import] = []

    def visit(node: ast.AST, kind: Kind) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, kind, child.lineno, file) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                targets = _resolve_from(module, is_package, child)
                found.extend(Import(module, target, kind, child.lineno, file) for target in targets)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                for stmt in child.body:
                    visit(ast.Module(body=[stmt], type_ignores=[]), "type_checking")
                for stmt in child.orelse:
                    visit(ast.Module(body=[stmt], type_ignores=[]), kind)
            elif isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                visit(child, "type_checking" if kind == "type_checking" else "function")
            else:
                visit(child, kind)

    visit(ast.parse(path.read_text(), str(path)), "top")
    return tuple(found)


def loaded_by(imp: Import) -> list[str]:
    """The internal modules an import runs: its target and the packages above it."""
    names = [*ancestors(imp.target), imp.target]
    return [name for name in names if name in modules()]


State = tuple[str, bool]
"""(module, used): a module the code imports by name is used, so its functions may run and its
imports inside functions count; a package above it only runs its `__init__` (top-level imports)."""


def reached(imp: Import, used: bool = True) -> list[State]:
    names = [*ancestors(imp.target), imp.target]
    return [(name, used and name == imp.target) for name in names if name in modules()]


def reaches(origin: str, first: Import | None, libs: frozenset[str], within: str) -> list[str]:
    """Chains from `origin` to any of `libs`, through `first` (an import `origin` makes) or from
    `origin` itself, following the modules of package `within` only."""
    parents: dict[State, tuple[State | None, Import | None]] = {}
    queue = deque[State]()

    def add(state: State, parent: tuple[State | None, Import | None]) -> None:
        if state not in parents and (state[0], True) not in parents:
            parents[state] = parent
            queue.append(state)

    starts = reached(first) if first else [(name, False) for name in ancestors(origin)] + [(origin, True)]
    for state in starts:
        if state[0] in modules():
            add(state, (None, first))
    found: list[str] = []
    while queue:
        state = queue.popleft()
        name, used = state
        if name.split(".")[0] != within:
            continue
        for imp in imports_of(name):
            if imp.kind == "type_checking" or (imp.kind == "function" and not used):
                continue
            if imp.target.split(".")[0] in libs:
                found.append(f"{trail(parents, state)} -> {imp.target} {imp.describe()}")
            for nxt in reached(imp, used):
                add(nxt, (state, imp))
    return found


def trail(parents: dict[State, tuple[State | None, Import | None]], state: State) -> str:
    """`a -> b (where) -> c (where)`: how the search reached `state`."""
    steps: list[str] = []
    while True:
        before, imp = parents[state]
        if imp is None:
            return state[0] + "".join(reversed(steps))
        steps.append(f" -> {state[0]} {imp.describe()}")
        if before is None:
            return imp.module + "".join(reversed(steps))
        state = before


def test_the_scan_reads_both_packages_and_sees_imports_inside_functions() -> None:
    names = modules()
    assert "orchestrator.cli" in names and "worker.train" in names and "orchestrator" in names
    cli_imports = imports_of("orchestrator.cli.run_commands")
    assert any(imp.target.startswith("typer") and imp.kind == "top" for imp in cli_imports)
    assert any(imp.kind == "function" for imp in cli_imports)


def test_the_worker_loads_no_orchestrator_module_that_draws_or_renders() -> None:
    violations = []
    for name in sorted(modules()):
        if not name.startswith("worker"):
            continue
        for imp in imports_of(name):
            if imp.kind != "type_checking" and imp.target.startswith("orchestrator"):
                violations += reaches(name, imp, UI_LIBS, within="orchestrator")
    assert not violations, "the worker loads jinja2/typer/rich through the orchestrator:\n" + "\n".join(
        sorted(set(violations))
    )


@pytest.mark.parametrize("entry", ["worker.train", "worker.__main__"])
def test_importing_the_worker_loads_no_jinja2_typer_or_rich(entry: str) -> None:
    probe = f"import sys, {entry}; print(sorted(m for m in {sorted(UI_LIBS)!r} if m in sys.modules))"
    res = subprocess.run(
        [sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.strip() == "[]", f"`import {entry}` loaded {res.stdout.strip()}"


def test_the_orchestrator_reaches_the_worker_only_from_the_job_entry_and_the_export() -> None:
    importers: dict[str, list[str]] = {}
    for name in sorted(modules()):
        if name.startswith("orchestrator"):
            for imp in imports_of(name):
                if imp.target.split(".")[0] == "worker":
                    importers.setdefault(name, []).append(f"{imp.target} {imp.describe()}")
    outside = {name: where for name, where in importers.items() if name not in WORKER_ENTRIES}
    assert not outside, f"only {sorted(WORKER_ENTRIES)} may import the worker; also: " + "; ".join(
        f"{name}: {', '.join(where)}" for name, where in outside.items()
    )


def cycles(package: str) -> list[list[str]]:
    """One cycle through each strongly connected group of `package`'s modules (top-level imports)."""
    graph: dict[str, set[str]] = {name: set() for name in modules() if name.split(".")[0] == package}
    for name in graph:
        own = {name, *ancestors(name)}
        for imp in imports_of(name):
            if imp.kind == "top":
                graph[name] |= {t for t in loaded_by(imp) if t in graph and t not in own}

    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            connect(node)

    found = []
    for group in groups:
        start, members = group[0], set(group)
        parents: dict[str, str] = {}
        queue = deque([start])
        while queue:
            current = queue.popleft()
            if start in graph[current]:
                path = [current]
                while path[-1] != start:
                    path.append(parents[path[-1]])
                found.append([*reversed(path), start])
                break
            for nxt in sorted(graph[current] & members):
                if nxt not in parents and nxt != start:
                    parents[nxt] = current
                    queue.append(nxt)
    return found


def describe_cycle(cycle: list[str]) -> str:
    """`a -> b (a.py line 3) -> a (b.py line 7)`."""
    text = cycle[0]
    for before, after in itertools.pairwise(cycle):
        imp = next(i for i in imports_of(before) if i.kind == "top" and after in loaded_by(i))
        text += f" -> {after} {imp.describe()}"
    return text


@pytest.mark.parametrize("package", PACKAGES)
def test_no_import_cycles_inside_a_package(package: str) -> None:
    found = cycles(package)
    assert not found, f"import cycles in {package} (top-level imports):\n" + "\n".join(
        describe_cycle(cycle) for cycle in found
    )


def test_the_cycle_finder_reports_a_cycle_with_its_path(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {
        "orchestrator.a": (Import("orchestrator.a", "orchestrator.b", "top", 1),),
        "orchestrator.b": (
            Import("orchestrator.b", "orchestrator.c", "top", 1),
            Import("orchestrator.b", "orchestrator.a", "function", 9),  # lazy: breaks nothing
        ),
        "orchestrator.c": (Import("orchestrator.c", "orchestrator.a", "top", 1),),
    }
    monkeypatch.setattr(sys.modules[__name__], "modules", lambda: dict.fromkeys(fake, REPO))
    monkeypatch.setattr(sys.modules[__name__], "imports_of", lambda name: fake[name])
    (cycle,) = cycles("orchestrator")
    assert cycle == ["orchestrator.a", "orchestrator.b", "orchestrator.c", "orchestrator.a"]


def test_a_chain_follows_what_the_importer_can_run(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = {
        "worker.w": (Import("worker.w", "orchestrator.pkg.used", "top", 3),),
        # A package above the used module only runs its top level: its lazy registry is not followed.
        "orchestrator.pkg": (Import("orchestrator.pkg", "orchestrator.ui", "function", 5),),
        # The used module's functions may run: its lazy imports are followed.
        "orchestrator.pkg.used": (Import("orchestrator.pkg.used", "orchestrator.render", "function", 7),),
        "orchestrator.render": (Import("orchestrator.render", "jinja2", "top", 1),),
        "orchestrator.ui": (Import("orchestrator.ui", "rich.table", "top", 1),),
    }
    monkeypatch.setattr(sys.modules[__name__], "modules", lambda: dict.fromkeys(fake, REPO))
    monkeypatch.setattr(sys.modules[__name__], "imports_of", lambda name: fake[name])
    assert reaches("worker.w", fake["worker.w"][0], UI_LIBS, within="orchestrator") == [
        "worker.w -> orchestrator.pkg.used (worker.w line 3) -> orchestrator.render"
        " (in a function, orchestrator.pkg.used line 7) -> jinja2 (orchestrator.render line 1)"
    ]


def test_the_shared_layer_loads_no_ui_library_nor_torch() -> None:
    violations = []
    for name in sorted(modules()):
        if name.startswith(SHARED_LAYER):
            violations += reaches(name, None, UI_LIBS | HEAVY_LIBS, within="orchestrator")
    assert not violations, "the shared layer loads:\n" + "\n".join(sorted(set(violations)))


OLD_JOB_REFERENCE = (
    b"\x80\x05\x95#\x00\x00\x00\x00\x00\x00\x00\x8c\x10orchestrator.job\x94\x8c\nrun_worker\x94\x93\x94."
)
"""`cloudpickle.dumps(run_worker)` (what submitit pickles) while the function lived in
orchestrator/job.py: a job queued before the move names this path."""


def test_a_job_pickled_with_the_old_path_loads_the_job_function() -> None:
    from orchestrator.lifecycle.job import run_worker

    assert pickle.loads(OLD_JOB_REFERENCE) is run_worker
