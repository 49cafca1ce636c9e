"""The package's dependency graph: the recipe schema stands alone, the command line starts without
torch, and no two package modules import each other at module level."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

from helpers import assert_clean_error, cli, write_recipe

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"plugin": "ollama_compress", "hooks": "ollama_compress.hooks"}  # folder -> import name
HEAVY = ("torch", "transformers", "numpy")


def imported_after(code: str) -> set[str]:
    """The modules loaded by a fresh interpreter once it ran ``code``."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return set(json.loads(proc.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------- the recipe schema
def test_validating_a_recipe_loads_no_plugin_manager_planner_or_server():
    loaded = imported_after(
        "import ollama_compress.recipe as r\n"
        "r.validate({'recipe_version': 1, 'name': 'x', 'source': {'model': '/m'}, 'prune': {'target': {'params': '1M'}},"
        " 'heal': {'loss': {'kl': 1}}, 'ollama': {'host': 'localhost:11434'}})")
    assert "ollama_compress.recipe" in loaded
    assert not loaded & {"ollama_compress.plugins", "ollama_compress.planner", "ollama_compress.ollama_server",
                         "pluggy", *HEAVY}


def test_names_no_plugin_registered_are_refused_with_their_place(tmp_path):
    recipe = write_recipe(tmp_path / "r.yaml", prune={"remove": 1, "metric": "cosine"},
                          heal={"loss": {"kl": 1, "klx": 1}}, data={"calibration": {"from": "parquet"}})
    proc = cli("validate", recipe)
    assert_clean_error(proc, "prune.metric: unknown importance metric 'cosine'; known: angular, block_influence",
                       "heal.loss: unknown loss 'klx'; known: ce, hidden_mse, kl, lens",
                       "data.calibration.from: unknown data source 'parquet'; known: default, hf, jsonl, teacher, text")
    assert len(proc.stderr.strip().splitlines()) == 3


# ---------------------------------------------------------------- the command line starts light
def test_the_command_line_starts_without_torch_transformers_or_numpy():
    for code in ("import ollama_compress.cli",
                 "import sys\nfrom ollama_compress.cli import main\nsys.argv = ['ollama-compress', '--help']\n"
                 "try:\n    main()\nexcept SystemExit as exc:\n    assert exc.code in (0, None)"):
        loaded = imported_after(code)
        assert "ollama_compress.cli" in loaded
        assert not loaded & set(HEAVY), (code, sorted(loaded & set(HEAVY)))


# ---------------------------------------------------------------- no import cycles
def module_name(path: Path) -> str:
    folder, *rest = path.relative_to(ROOT).with_suffix("").parts
    parts = [*PACKAGES[folder].split("."), *rest]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def module_level_imports(body: list[ast.stmt]) -> list[ast.Import | ast.ImportFrom]:
    """Import statements that run when the module loads (``if TYPE_CHECKING:`` blocks aside)."""
    found: list[ast.Import | ast.ImportFrom] = []
    for stmt in body:
        if isinstance(stmt, (ast.Import, ast.ImportFrom)):
            found.append(stmt)
        elif isinstance(stmt, ast.If):
            if "TYPE_CHECKING" not in ast.unparse(stmt.test):
                found += module_level_imports(stmt.body)
            found += module_level_imports(stmt.orelse)
        elif isinstance(stmt, ast.Try):
            found += module_level_imports(stmt.body + stmt.orelse + stmt.finalbody)
            for handler in stmt.handlers:
                found += module_level_imports(handler.body)
    return found


def import_graph() -> dict[str, set[str]]:
    """Package module -> the package modules it imports at module level. An import of a module's own
    parent package is left out: Python loads the parents of every module first."""
    files = {module_name(path): path for folder in PACKAGES for path in (ROOT / folder).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        targets: set[str] = set()
        for node in module_level_imports(ast.parse(path.read_text(encoding="utf-8")).body):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
                continue
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([node.module] if node.module else [])])
            targets.add(base)
            targets.update(f"{base}.{alias.name}" for alias in node.names)
        parents = {name.rsplit(".", depth)[0] for depth in range(1, name.count(".") + 1)}
        graph[name] = {t for t in targets if t in files and t != name and t not in parents}
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            group = []
            while True:
                member = stack.pop()
                group.append(member)
                if member == node:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_import_graph_sees_the_package():
    graph = import_graph()
    assert "ollama_compress.recipe" in graph["ollama_compress.pipeline"]
    assert "ollama_compress.hooks.data" in graph["ollama_compress.hooks.quantize"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_no_import_cycles_between_package_modules():
    assert cycles(import_graph()) == []
