"""Running the real CLI in a subprocess, as a user would."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def cli(*args: str, cwd: Path | None = None, timeout: int = 900, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``ollama-compress ARGS`` (with ``env`` added to the environment); return the finished process."""
    return subprocess.run([sys.executable, "-m", "ollama_compress", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})})


def assert_clean_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    """A bad-input failure: exit 2, no traceback, message names the problem."""
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in proc.stderr, (needle, proc.stderr)


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
