"""The parts and what each may import (docs/architecture.md, "Parts and what each may import"),
checked from the source with ``ast``: no import cycle between modules, no import across parts that
the rules below do not allow, and nothing heavier than the light base imported at module level on
the device side. ``make lint`` runs this file; so does the suite.

Every import counts, those inside functions too: a lazy import still ties the two modules together
(it only postpones the failure), so a cycle through one is a cycle. Imports under
``if TYPE_CHECKING:`` are not run and do not count.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.9/3.10
    import tomli as tomllib  # type: ignore[no-redef]

REPO = Path(__file__).resolve().parents[1]

PART_RULES: dict[str, tuple[str, ...]] = {
    # the contracts host and device share: the light base only
    "edgeship.ota": (),
    # the device: the contracts, never the host's code
    "edgeship.agent": ("edgeship.ota",),
    # model in, converted model out: the formats, and the runtimes the device serves with, so a
    # model is proven on the workstation by the code it will meet on the device
    "edgeship.converters": ("edgeship.ota", "edgeship.agent.runtimes"),
    # the host CLI and the fleet side: everything but the device's daemon
    "edgeship.toolkit": ("edgeship.ota", "edgeship.converters", "edgeship.agent.runtimes"),
}
"""Part -> the other parts (or modules) it may import."""

LAZY_ONLY_RULES: dict[str, tuple[str, ...]] = {
    # `edgeship bundle build` without a converter report and the golden-vector check read a model's
    # signature through the runtimes, inside those host-side functions: a device importing
    # edgeship.ota loads nothing more (docs/architecture.md, "ota stays light on the device").
    "edgeship.ota": ("edgeship.agent.runtimes",),
}
"""Part -> what it may import only inside a function, never at module level."""

KNOWN_CYCLES: tuple[frozenset[str], ...] = ()
"""Import cycles tolerated while one is being taken apart (none today): each names its modules."""

DEVICE_PARTS = ("edgeship.ota", "edgeship.agent")
LIGHT_BASE = frozenset({"numpy", "cryptography", "bcrypt", "tuf", "securesystemslib", "paho", "click", "tomli"})
"""What the device side may import at module level besides the standard library (pyproject's base
dependencies): a runtime, psutil or zstandard only inside the function that needs it."""


@dataclass(frozen=True)
class Import:
    """One import statement's target, resolved to a module of the project where it names one."""

    source: str
    target: str
    line: int
    lazy: bool


def package_dirs(pyproject: Path = REPO / "pyproject.toml") -> dict[str, Path]:
    """``edgeship.<part>`` -> its folder, from pyproject's ``package-dir`` (the one mapping)."""
    mapping = tomllib.loads(pyproject.read_text())["tool"]["setuptools"]["package-dir"]
    return {name: REPO / folder for name, folder in mapping.items()}


def module_files(parts: Mapping[str, Path]) -> dict[str, Path]:
    """Every module of the project by its import name."""
    found: dict[str, Path] = {}
    for package, folder in parts.items():
        for path in sorted(folder.rglob("*.py")):
            names = list(path.relative_to(folder).with_suffix("").parts)
            if names[-1] == "__init__":
                names.pop()
            found[".".join([package, *names])] = path
    return found


def _type_checking_block(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports_of(module: str, source: str, is_package: bool, known: Iterable[str]) -> list[Import]:
    """The imports of one module's source, relative ones resolved; a ``from package import name``
    names the submodule where ``name`` is one. Pure: source text in, imports out."""
    modules = set(known)
    found: list[Import] = []

    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, lazy: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_block(child):
                continue
            if isinstance(child, ast.Import):
                found.extend(Import(module, alias.name, child.lineno, lazy) for alias in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = resolve(child)
                for alias in child.names:
                    sub = f"{base}.{alias.name}"
                    found.append(Import(module, sub if sub in modules else base, child.lineno, lazy))
            visit(child, lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)))

    visit(ast.parse(source), False)
    return found


def import_graph(files: Mapping[str, Path]) -> dict[str, list[Import]]:
    """Module -> its imports (all of them, third-party included)."""
    return {name: imports_of(name, path.read_text(), path.name == "__init__.py", files) for name, path in files.items()}


def project_target(target: str, modules: Iterable[str]) -> str | None:
    """The project module an import loads (the longest known prefix), or None for a third party."""
    known = set(modules)
    while target and target not in known:
        target = target.rpartition(".")[0]
    return target or None


def cycles(graph: Mapping[str, list[Import]]) -> list[frozenset[str]]:
    """The strongly connected groups of more than one module (Tarjan, iterative)."""
    edges = {
        name: sorted({t for i in imports if (t := project_target(i.target, graph)) and t != name})
        for name, imports in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups: list[frozenset[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(edges[root]))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(edges[child])))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                group = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    group.add(member)
                    if member == node:
                        break
                if len(group) > 1:
                    groups.append(frozenset(group))
    return groups


def part_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _within(target: str, allowed: Iterable[str]) -> bool:
    return any(target == prefix or target.startswith(prefix + ".") for prefix in allowed)


def rule_violations(graph: Mapping[str, list[Import]], files: Mapping[str, Path]) -> list[str]:
    """Each import across parts that PART_RULES and LAZY_ONLY_RULES do not allow, one line each."""
    refused = []
    for name, imports in graph.items():
        part = part_of(name)
        for imp in imports:
            target = project_target(imp.target, graph)
            if target is None or part_of(target) == part:
                continue
            if _within(target, PART_RULES[part]) or (imp.lazy and _within(target, LAZY_ONLY_RULES.get(part, ()))):
                continue
            how = "inside a function" if imp.lazy else "at module level"
            refused.append(f"{files[name].relative_to(REPO)}:{imp.line}: {name} imports {target} {how}; "
                           f"{part} may import {', '.join(PART_RULES[part]) or 'no other part'}")
    return refused


OPTIONAL_EXTRAS = {
    # module prefix -> the optional libraries it may import at module level, and why that is light
    "edgeship.agent.decoding": (
        ("orjson", "simdjson"), "the JSON fast paths, guarded: json when they are missing (about 1 MB each)"
    ),
    "edgeship.agent.protos.": (("google",), "edgeship[grpc]: generated messages, loaded only when gRPC starts"),
}


def heavy_device_imports(graph: Mapping[str, list[Import]], files: Mapping[str, Path]) -> list[str]:
    """Module-level imports on the device side that are neither the standard library, the light
    base, the project nor an optional extra of the module importing it."""
    heavy = []
    for name, imports in graph.items():
        if part_of(name) not in DEVICE_PARTS:
            continue
        optional = {lib for prefix, (libs, _) in OPTIONAL_EXTRAS.items() if name.startswith(prefix) for lib in libs}
        for imp in imports:
            top = imp.target.split(".")[0]
            if imp.lazy or top == "edgeship" or top in LIGHT_BASE or top in sys.stdlib_module_names:
                continue
            if top in optional:
                continue
            heavy.append(f"{files[name].relative_to(REPO)}:{imp.line}: {name} imports {imp.target} at module level")
    return heavy


@pytest.fixture(scope="module")
def project() -> tuple[dict[str, Path], dict[str, list[Import]]]:
    files = module_files(package_dirs())
    return files, import_graph(files)


def test_every_part_has_a_rule(project: tuple[dict[str, Path], dict[str, list[Import]]]) -> None:
    files, _ = project
    assert {part_of(name) for name in files} == set(PART_RULES)


def test_no_import_cycle_between_modules(project: tuple[dict[str, Path], dict[str, list[Import]]]) -> None:
    _, graph = project
    new = [sorted(group) for group in cycles(graph) if group not in KNOWN_CYCLES]
    assert not new, f"import cycles (each list imports itself round): {new}"


def test_each_allow_listed_cycle_still_exists(project: tuple[dict[str, Path], dict[str, list[Import]]]) -> None:
    """An allow-listed cycle that is gone is a line to delete, so the list never hides a new one."""
    _, graph = project
    gone = [sorted(group) for group in KNOWN_CYCLES if group not in cycles(graph)]
    assert not gone, f"these cycles are gone: remove them from KNOWN_CYCLES: {gone}"


def test_parts_import_only_what_their_rule_allows(project: tuple[dict[str, Path], dict[str, list[Import]]]) -> None:
    files, graph = project
    refused = rule_violations(graph, files)
    assert not refused, "\n".join(refused)


def test_device_side_imports_only_the_light_base_at_module_level(
    project: tuple[dict[str, Path], dict[str, list[Import]]],
) -> None:
    files, graph = project
    heavy = heavy_device_imports(graph, files)
    assert not heavy, "\n".join(heavy)


# -- the checker itself can fail ---------------------------------------------------------------------


def _graph(sources: Mapping[str, str]) -> dict[str, list[Import]]:
    return {name: imports_of(name, text, False, sources) for name, text in sources.items()}


def test_a_cycle_through_a_lazy_relative_import_is_found() -> None:
    graph = _graph({
        "edgeship.agent.a": "from . import b\n",
        "edgeship.agent.b": "def f():\n    from .c import x\n",
        "edgeship.agent.c": "import edgeship.agent.a\n",
        "edgeship.agent.d": "from .a import thing\n",
    })
    assert cycles(graph) == [frozenset({"edgeship.agent.a", "edgeship.agent.b", "edgeship.agent.c"})]


def test_type_checking_imports_make_no_cycle() -> None:
    graph = _graph({
        "edgeship.ota.a": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
        "edgeship.ota.b": "from .a import A\n",
    })
    assert cycles(graph) == []


def test_an_import_across_parts_that_no_rule_allows_is_named_with_its_line() -> None:
    sources = {
        "edgeship.agent.daemon": "import json\nfrom edgeship.toolkit.store import FleetStore\n",
        "edgeship.ota.bundle": "def f():\n    from edgeship.agent.runtimes import open_model\n",
        "edgeship.ota.golden": "from edgeship.agent.runtimes import TensorSpec\n",
        "edgeship.toolkit.store": "",
        "edgeship.agent.runtimes": "",
    }
    files = {name: REPO / "x" / f"{name}.py" for name in sources}
    refused = rule_violations(_graph(sources), files)
    assert len(refused) == 2, refused
    assert refused[0].endswith(":2: edgeship.agent.daemon imports edgeship.toolkit.store at module level; "
                               "edgeship.agent may import edgeship.ota")
    assert "edgeship.ota.golden imports edgeship.agent.runtimes at module level" in refused[1]


def test_a_heavy_module_level_import_on_the_device_is_named() -> None:
    sources = {
        "edgeship.agent.runtimes": "import numpy\ndef f():\n    import onnxruntime\n",
        "edgeship.agent.serving": "import tensorflow as tf\n",
        "edgeship.converters.to_tflite": "import tensorflow as tf\n",
    }
    files = {name: REPO / "x" / f"{name}.py" for name in sources}
    assert [line.split(": ", 1)[1] for line in heavy_device_imports(_graph(sources), files)] == [
        "edgeship.agent.serving imports tensorflow at module level"
    ]


def test_the_grpc_extra_loads_only_when_grpc_starts(
    project: tuple[dict[str, Path], dict[str, list[Import]]],
) -> None:
    """A device without edgeship[grpc] must import the rest of the agent: only the gRPC front end
    (and the generated messages themselves) may import them at module level."""
    _, graph = project
    grpc_side = ("edgeship.agent.protos", "edgeship.agent.grpc_server")
    eager = [f"{name} imports {imp.target}" for name, imports in graph.items() for imp in imports
             if imp.target.startswith(grpc_side) and not imp.lazy and not name.startswith(grpc_side)]
    assert not eager, "\n".join(eager)


def test_the_update_table_in_the_architecture_docs_is_the_one_in_the_code() -> None:
    """docs/architecture.md draws the transition table; a row added in the code and not there
    (or the other way round) fails here."""
    from edgeship.agent.state_machine import TRANSITIONS, Event, State

    text = (REPO / "docs" / "architecture.md").read_text()
    section = text[text.index("## The update state machine"):]
    header, drawn = None, {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or set(cells[0]) <= {"-", " "}:
            continue
        if cells[0] == "state":
            header = cells[1:]
            continue
        assert header is not None
        for event, cell in zip(header, cells[1:]):
            if not cell:
                continue
            if event == "other":  # "EVENT -> STATE"
                event, _, cell = (part.strip() for part in cell.partition("->"))
            drawn[(State[cells[0]], Event[event])] = State[cell]
    assert drawn == dict(TRANSITIONS)
