"""The suite checks itself: every hook a plugin can implement is exercised by some test and
documented in the README (parsed from plugin/hookspecs.py, as datasette's meta-tests do)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def hookspec_names() -> list[str]:
    tree = ast.parse((ROOT / "plugin" / "hookspecs.py").read_text())
    names = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)
             and any("hookspec" in ast.unparse(d) for d in node.decorator_list)]
    assert len(names) >= 10, names  # the parse found the specs
    return names


def suite_text() -> str:
    return "\n".join(p.read_text() for p in sorted((ROOT / "tests").glob("*.py")) if p.name != "test_meta.py")


HOOKS = hookspec_names()


@pytest.mark.parametrize("name", HOOKS)
def test_every_hookspec_is_documented_in_the_readme(name):
    readme = (ROOT / "README.md").read_text()
    assert f"`{name}`" in readme, f"README.md never names the hook `{name}`"


@pytest.mark.parametrize("name", HOOKS)
def test_every_hookspec_is_called_by_some_test(name):
    """Called directly (``hook.NAME(``, ``call_first("NAME"``), or implemented by a test plugin
    (``@hookimpl ... def NAME(``) that a test then runs through the core."""
    text = suite_text()
    called = re.search(rf"hook\.{name}\(|call_first\(\s*[\"']{name}[\"']", text)
    implemented = re.search(rf"@hookimpl[^\n]*\n(?:\s*@[^\n]*\n)*\s*def {name}\(", text)
    assert called or implemented, f"no test calls or implements the hook {name}"


def project_imports(path: Path) -> list[tuple[str, str]]:
    """(module, name) of every ``from ollama_compress... import name`` in ``path``, at any depth
    (bench scripts import inside ``main`` so that ``--help`` stays fast)."""
    tree = ast.parse(path.read_text())
    return [(node.module, alias.name) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ollama_compress"
            for alias in node.names]


BENCH_SCRIPTS = sorted((ROOT / "bench").glob("*.py"))


@pytest.mark.parametrize("script", BENCH_SCRIPTS, ids=lambda p: p.name)
def test_every_bench_script_imports_names_that_exist(script):
    """A benchmark is run by hand, rarely: a name it imports that moved would only show when it is
    next needed."""
    import importlib

    missing = []
    for module, name in project_imports(script):
        imported = importlib.import_module(module)
        if not hasattr(imported, name):
            try:
                importlib.import_module(f"{module}.{name}")
            except ImportError:
                missing.append(f"{module}.{name}")
    assert not missing, f"{script.name} imports names that do not exist: {missing}"
