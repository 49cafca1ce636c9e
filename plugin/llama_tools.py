"""llama.cpp's command-line tools (``llama-quantize``, ``llama-imatrix``), the same version as the bindings.

``build_llama_tools`` compiles them once with cmake from the llama.cpp sources vendored in the
sdist of the installed llama-cpp-python, into ``<cache>/llama.cpp-VERSION/bin`` (``.ci/setup``
runs ``python -m ollama_compress.llama_tools``); ``llama_tool`` finds them there, so the quantizer,
the tools and the bindings always agree and nobody edits PATH.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Callable

from .embedded import cache_dir
from .errors import StageFailed, UserError, run_as_script
from .fsutil import atomic_path

TOOLS = ("llama-quantize", "llama-imatrix")
# Like the bindings' build (.ci/setup sets CMAKE_ARGS=-DGGML_NATIVE=OFF): portable, CPU only, and
# static so the two programs need no libllama.so beside them.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_CURL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
)
BUILD_NICENESS = 15


def bindings_version() -> str:
    """The installed llama-cpp-python's version (StageFailed when it is not installed)."""
    try:
        return metadata.version("llama-cpp-python")
    except metadata.PackageNotFoundError:
        raise StageFailed("llama-cpp-python is not installed; pip install llama-cpp-python") from None


def tools_dir() -> Path:
    """``<cache>/llama.cpp-VERSION/bin``, VERSION being the bindings' version."""
    return cache_dir() / f"llama.cpp-{bindings_version()}" / "bin"


def llama_tool(name: str) -> Path:
    """The built ``name`` (one of TOOLS); UserError saying how to build it when it is missing."""
    path = tools_dir() / name
    if path.is_file() and os.access(path, os.X_OK):
        return path
    raise UserError(
        f"{name} is not built for llama-cpp-python {bindings_version()}: run 'bash .ci/setup' "
        f"or 'python -m ollama_compress.llama_tools' (builds {' and '.join(TOOLS)} once, about 10 minutes)"
    )


def build_llama_tools(log: Callable[[str], None] = print) -> Path:
    """Build TOOLS into ``tools_dir()`` unless they are there; return that directory.

    Downloads the llama-cpp-python sdist of the installed version (pip), configures its vendored
    llama.cpp with CMAKE_OPTIONS and builds only TOOLS, at low priority. StageFailed on failure;
    nothing is left in ``tools_dir()`` unless both programs were built.
    """
    target = tools_dir()
    if all((target / name).is_file() for name in TOOLS):
        log(f"llama-tools: {', '.join(TOOLS)} already in {target}")
        return target
    if shutil.which("cmake") is None:
        raise StageFailed("building llama.cpp's tools needs cmake and a C++ compiler (apt-get install cmake build-essential)")
    version, started = bindings_version(), time.monotonic()
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=target.parent) as tmp:
        source = _vendored_sources(version, Path(tmp))
        build = Path(tmp) / "build"
        log(f"llama-tools: building {', '.join(TOOLS)} from llama-cpp-python {version}'s llama.cpp (once)...")
        _run(["cmake", "-S", str(source), "-B", str(build), *CMAKE_OPTIONS], "cmake configure")
        _run(["cmake", "--build", str(build), "--target", *TOOLS, "-j", str(os.cpu_count() or 1)], "cmake build")
        with atomic_path(target, is_dir=True) as staged:  # replaces only a folder this tool made
            for name in TOOLS:
                shutil.copy2(build / "bin" / name, staged / name)
    log(f"llama-tools: built in {time.monotonic() - started:.0f} s into {target}")
    return target


def _vendored_sources(version: str, tmp: Path) -> Path:
    """Download llama-cpp-python==version's sdist into ``tmp``; return its vendor/llama.cpp folder."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
           "-d", str(tmp), f"llama-cpp-python=={version}"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(tmp.glob("llama_cpp_python-*.tar.gz")) + sorted(tmp.glob("llama-cpp-python-*.tar.gz"))
    if done.returncode != 0 or not archives:
        raise StageFailed(f"could not download the llama-cpp-python {version} sdist: {_last_lines(done.stderr)}")
    with tarfile.open(archives[0]) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name]
        tar.extractall(tmp / "src", members=members, filter="data")
    found = list((tmp / "src").glob("*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        raise StageFailed(f"{archives[0].name} has no vendor/llama.cpp sources")
    return found[0].parent


def _run(cmd: list[str], what: str) -> None:
    done = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=lambda: os.nice(BUILD_NICENESS))
    if done.returncode != 0:
        raise StageFailed(f"{what} of llama.cpp's tools failed: {_last_lines(done.stderr or done.stdout)}")


def _last_lines(text: str, n: int = 3) -> str:
    return " | ".join(text.strip().splitlines()[-n:]) or "no output"


if __name__ == "__main__":  # .ci/setup
    run_as_script("llama-tools", build_llama_tools)
