"""What tests share: the real CLI in a subprocess as a user runs it, recipes written from a dict,
and tiny third-party plugins installed through the entry-point group.

* ``cli("run", recipe, "--out", out)`` -> the finished process; ``assert_clean_error(proc, ...)``.
* ``recipe_dict(model, prune={...})`` / ``write_recipe(path, model, ...)``: a minimal valid recipe
  with the sections given (``None`` drops a section); the ``recipe_file`` fixture writes one into
  the test's tmp_path; ``TINY_DATA`` is a data section for quick runs.
* ``dead_pid()``: the PID of a process that has exited.
* ``install_plugin(root, module, source)``: a distribution with one ``ollama_compress`` entry
  point under ``root``; pass ``plugins=root`` to ``cli`` to load it. The ``plugin_dir`` fixture
  is a fresh root.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import yaml


def cli(*args: Any, cwd: Path | None = None, timeout: int = 900, env: dict | None = None,
        plugins: Path | None = None) -> subprocess.CompletedProcess:
    """Run ``ollama-compress ARGS`` (with ``env`` added to the environment, and the plugins
    installed under ``plugins`` importable); return the finished process."""
    full = {key: value for key, value in os.environ.items() if key != "OLLAMA_COMPRESS_LOAD_PLUGINS"}
    full.update({"COLUMNS": "200", **(env or {})})
    if plugins is not None:
        full["PYTHONPATH"] = os.pathsep.join(filter(None, [str(plugins), full.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "ollama_compress", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env=full)


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A bad-input failure: exit 2, no traceback, message names the problem."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


TINY_DATA = {"calibration": {"samples": 2, "seq_len": 32},
             "heldout": {"split": "heldout", "samples": 2, "seq_len": 32}}  # a data section for quick runs


def recipe_dict(model: Any = "/m", name: str = "test", **sections: Any) -> dict[str, Any]:
    """A recipe with ``source.model`` and the given sections; a section given as None is left out."""
    recipe: dict[str, Any] = {"recipe_version": 1, "name": name, "source": {"model": str(model)}}
    recipe.update({key: value for key, value in sections.items() if value is not None})
    return recipe


def write_recipe(path: Path, model: Any = "/m", name: str = "test", **sections: Any) -> Path:
    """``recipe_dict`` written as YAML to ``path``."""
    path = Path(path)
    path.write_text(yaml.safe_dump(recipe_dict(model, name, **sections), sort_keys=False))
    return path


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def install_plugin(root: Path, module: str, source: str, dist: str | None = None, version: str = "1.0",
                   entry_point: str | None = None) -> Path:
    """A tiny installed distribution ``dist`` whose one entry point (``entry_point``, default the
    module name) loads ``module`` (``source``), importable from ``root``; returns ``root``."""
    root = Path(root)
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist or module}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[ollama_compress]\n{entry_point or module} = {module}\n")
    return root


def make_deep_tree(top: Path, levels: int) -> None:
    """``top/d/d/.../d``, ``levels`` folders deep, made relative so no path passes PATH_MAX.

    Remove it with ``remove_deep_tree``: recursive deleters (pytest's cleanup, shutil.rmtree)
    exhaust Python's stack on it."""
    here = os.getcwd()
    os.mkdir(top)
    os.chdir(top)
    try:
        for _ in range(levels):
            os.mkdir("d")
            os.chdir("d")
    finally:
        os.chdir(here)


def remove_deep_tree(top: Path) -> None:
    """Remove what ``make_deep_tree`` made, bottom up, without recursion."""
    here = os.getcwd()
    os.chdir(top)
    depth = 0
    try:
        while os.path.isdir("d"):
            os.chdir("d")
            depth += 1
        for _ in range(depth):
            os.chdir("..")
            os.rmdir("d")
    finally:
        os.chdir(here)
    os.rmdir(top)
