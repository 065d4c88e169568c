"""The layering of docs/ARCHITECTURE.md, checked on the modules' own imports (their ASTs).

Every ``import`` counts, at module level or inside a function: a lazy import that dodges a
circle is still a circle. Only imports under ``if TYPE_CHECKING:`` are left out (they never
run). The check fails with the offending module and import, so the layering stays true.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("fragjobs", "tasks", "models", "migrations")
TOP_MODULES = ("celeryconfig",)

DOMAIN = (
    "fragjobs.config",
    "fragjobs.errors",
    "fragjobs.keys",
    "fragjobs.logging_setup",
    "fragjobs.base_models",
    "fragjobs.base_identity",
    "fragjobs.base_folders",
    "fragjobs.base_text",
    "fragjobs.families",
    "fragjobs.builtin",
    "fragjobs.profiling",
    "fragjobs.extraction",
    "fragjobs.validation",
    "fragjobs.generation",
    "fragjobs.manifest",
    "fragjobs.storage",
    "fragjobs.catalog",
    "fragjobs.library",
    "fragjobs.library_index",
    "fragjobs.base_store",
    "fragjobs.base_cache",
    "fragjobs.reports",
)
FARM_LIBRARIES = ("celery", "kombu", "redis")
COMFY_NODES = ("fragjobs.comfy_nodes",)
# ComfyUI's own top-level modules: only the custom nodes may import them (inside functions).
COMFYUI_MODULES = (
    "comfy",
    "comfy_api",
    "comfy_execution",
    "comfy_extras",
    "execution",
    "folder_paths",
    "node_helpers",
    "nodes",
    "server",
)
UPPER_LAYERS = (
    "fragjobs.chain",
    "fragjobs.farm",
    "fragjobs.client",
    "fragjobs.bench",
    "fragjobs.bench_catalog",
    "fragjobs.doctor",
)
CORE = DOMAIN + UPPER_LAYERS + ("fragjobs.cli", "tasks", "celeryconfig", "models", "migrations")

# (who, what it must not import, why)
RULES = [
    (
        DOMAIN,
        FARM_LIBRARIES + ("click", "tasks", "fragjobs.cli") + UPPER_LAYERS + COMFY_NODES,
        "the domain",
    ),
    (
        ("fragjobs.chain",),
        FARM_LIBRARIES
        + ("click", "tasks", "fragjobs.cli", "fragjobs.farm", "fragjobs.client")
        + ("fragjobs.bench",)
        + COMFY_NODES,
        "the chain",
    ),
    (
        ("fragjobs.farm",),
        ("click", "tasks", "fragjobs.cli", "fragjobs.bench") + COMFY_NODES,
        "the farm side",
    ),
    (
        ("fragjobs.bench", "fragjobs.bench_catalog"),
        ("tasks", "fragjobs.cli") + COMFY_NODES,
        "the benchmarks",
    ),
    (
        ("tasks", "celeryconfig"),
        ("click", "fragjobs.cli", "fragjobs.bench") + COMFY_NODES,
        "the tasks",
    ),
    (("models",), ("fragjobs", "tasks", "migrations", "torch"), "the ORM"),
    (
        COMFY_NODES,
        FARM_LIBRARIES
        + ("click", "tasks", "fragjobs.cli", "fragjobs.farm", "fragjobs.client")
        + ("fragjobs.bench",),
        "the ComfyUI nodes",
    ),
    (CORE, COMFYUI_MODULES + COMFY_NODES, "the core (never ComfyUI, nor its nodes)"),
]
# The drills (python -m fragjobs.drills): a top layer over the chain and the farm; they run
# the command line only as subprocesses and talk to Redis only through the farm's client.
DRILLS = ("fragjobs.drills",)
RULES.append((DRILLS, ("click", "tasks", "fragjobs.cli", "fragjobs.bench"), "the drills"))
# The doctor (fragjobs doctor, python -m fragjobs.doctor): over the domain and the farm's
# checks; run by the command line and, as a subprocess, by the workers.
DOCTOR = ("fragjobs.doctor",)
RULES.append(
    (
        DOCTOR,
        FARM_LIBRARIES + ("click", "tasks", "fragjobs.cli", "fragjobs.bench", "fragjobs.chain"),
        "the doctor",
    )
)
RULES.append((("fragjobs.chain", "fragjobs.farm"), DOCTOR, "the chain and the farm"))
ONLY_FARM_SIDE_TALKS_TO_CELERY = ("tasks", "celeryconfig", "fragjobs.farm")
NEVER_IMPORTED_BY_OTHERS = ("fragjobs.cli", "fragjobs.drills")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    found = {_module_name(ROOT / f"{name}.py"): ROOT / f"{name}.py" for name in TOP_MODULES}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            found[_module_name(path)] = path
    return found


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(path: Path, module: str) -> list[tuple[str, int]]:
    """(imported module, line) for every import of ``path`` that can run."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    out: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            out.extend((alias.name, node.lineno) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                out.append((candidate if candidate in MODULES else base, node.lineno))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return out


GRAPH = {name: _imports(path, name) for name, path in MODULES.items()}


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize(("who", "forbidden", "what"), RULES, ids=[r[2] for r in RULES])
def test_layers_import_only_downwards(who, forbidden, what):
    offences = [
        f"{module}:{line} imports {target}"
        for module, imports in GRAPH.items()
        if _within(module, who)
        for target, line in imports
        if _within(target, forbidden)
    ]
    assert offences == [], f"{what} imports what it must not:\n" + "\n".join(offences)


def test_only_the_farm_side_talks_to_celery_and_redis():
    offences = [
        f"{module}:{line} imports {target}"
        for module, imports in GRAPH.items()
        if not _within(module, ONLY_FARM_SIDE_TALKS_TO_CELERY)
        for target, line in imports
        if _within(target, FARM_LIBRARIES)
    ]
    assert offences == []


@pytest.mark.parametrize("top", NEVER_IMPORTED_BY_OTHERS)
def test_nothing_imports_the_command_line_or_the_drills(top):
    offences = [
        f"{module}:{line} imports {target}"
        for module, imports in GRAPH.items()
        if not _within(module, (top,))
        for target, line in imports
        if _within(target, (top,))
    ]
    assert offences == []


def _cycles() -> list[list[str]]:
    edges = {
        module: sorted({t for t, _ in imports if t in MODULES and t != module})
        for module, imports in GRAPH.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = [0]

    def connect(node: str) -> None:  # Tarjan's strongly connected components
        index[node] = low[node] = counter[0]
        counter[0] += 1
        stack.append(node)
        on_stack.add(node)
        for nxt in edges[node]:
            if nxt not in index:
                connect(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10_000))
    for module in sorted(edges):
        if module not in index:
            connect(module)
    return found


def test_no_import_circles():
    assert _cycles() == []


def test_the_check_sees_a_lazy_import_and_a_circle(tmp_path):
    """The checker itself: an import inside a function counts, and a circle is found."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from fragjobs.cli import main\n")
    assert ("fragjobs.cli", 2) in _imports(path, "fragjobs.probe")
    GRAPH["fragjobs.config"].append(("fragjobs.errors", 0))
    GRAPH["fragjobs.errors"].append(("fragjobs.config", 0))
    try:
        assert ["fragjobs.config", "fragjobs.errors"] in _cycles()
    finally:
        GRAPH["fragjobs.config"].pop()
        GRAPH["fragjobs.errors"].pop()


@pytest.mark.parametrize(
    "argv",
    [
        ["fragments", "ls"],
        ["db", "upgrade"],
        ["run", ""],
        ["run", "a red circle", "--threshold", "2"],
        ["generate", "a red circle", "--seeds", "x"],
        ["fragments", "show", "Bad Key"],
        ["models", "ls"],
        ["models", "add", "/no/such/folder"],
        ["report", "ls"],
        ["report", "show", "latest"],
        ["report", "--compare", "latest", "--gate", "/no/such/thresholds.yaml"],
    ],
    ids=lambda argv: " ".join(argv) or "empty",
)
def test_catalog_commands_and_bad_input_never_import_torch(argv, settings):
    """What a new user meets first answers without loading torch, diffusers or celery."""
    code = (
        "import sys\n"
        "from fragjobs.cli import main\n"
        "try:\n"
        f"    main({argv!r}, standalone_mode=True)\n"
        "except SystemExit:\n"
        "    pass\n"
        "heavy = [m for m in ('torch', 'diffusers', 'transformers', 'celery')"
        " if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert "HEAVY []" in done.stdout, done.stdout + done.stderr
