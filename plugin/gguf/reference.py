"""llama.cpp's own converter (``convert_hf_to_gguf.py``), the reference our writer is compared with.

It is taken from the llama.cpp sources vendored in the sdist of the installed llama-cpp-python, so
converter, gguf-py and the llama.cpp that loads the files are one version. The sdist is fetched
once with ``pip download`` (a package registry) and the converter, its ``conversion`` package and
its ``gguf-py`` are unpacked into ``<cache>/llama.cpp-converter-VERSION``.
"""
from __future__ import annotations

import subprocess
import sys
import tarfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from ollama_compress.embedded import cache_dir
from ollama_compress.errors import StageFailed
from ollama_compress.fsutil import atomic_path

SCRIPT = "convert_hf_to_gguf.py"
_PARTS = (SCRIPT, "conversion/", "gguf-py/")  # what the converter needs from vendor/llama.cpp


def bindings_version() -> str:
    """The installed llama-cpp-python's version."""
    try:
        return version("llama-cpp-python")
    except PackageNotFoundError:
        raise StageFailed("llama-cpp-python is not installed; pip install llama-cpp-python") from None


def converter_script() -> Path:
    """``convert_hf_to_gguf.py`` of the installed llama-cpp-python's llama.cpp, unpacked once."""
    version = bindings_version()
    target = cache_dir() / f"llama.cpp-converter-{version}"
    if not (target / SCRIPT).is_file():
        sdist = _sdist(version, cache_dir() / "sdist")
        with atomic_path(target, is_dir=True) as tmp:
            _unpack(sdist, tmp)
    return target / SCRIPT


def _sdist(version: str, folder: Path) -> Path:
    """The llama-cpp-python sdist of ``version`` in ``folder``, downloaded with pip when absent."""
    name = f"llama_cpp_python-{version}.tar.gz"
    if not (folder / name).is_file():
        folder.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
               "-d", str(folder), f"llama-cpp-python=={version}"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not (folder / name).is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise StageFailed(f"could not download the llama-cpp-python {version} sdist: {last}")
    return folder / name


def _unpack(sdist: Path, out: Path) -> None:
    """The converter's files from ``sdist``'s vendor/llama.cpp into ``out`` (paths kept relative)."""
    with tarfile.open(sdist) as tar:
        members = []
        for member in tar.getmembers():
            _, _, rel = member.name.partition("/vendor/llama.cpp/")
            if rel and rel.startswith(_PARTS) and (member.isfile() or member.isdir()):
                member.name = rel
                members.append(member)
        if not any(m.name == SCRIPT for m in members):
            raise StageFailed(f"{sdist.name} has no vendor/llama.cpp/{SCRIPT}")
        tar.extractall(out, members=members, filter="data")


def run_converter(model_dir: Path, out_path: Path, outtype: str = "F16", timeout: float = 1800) -> Path:
    """Convert ``model_dir`` with llama.cpp's converter to ``out_path`` (``outtype``: F32, F16 or BF16)."""
    cmd = [sys.executable, str(converter_script()), str(model_dir), "--outfile", str(out_path),
           "--outtype", outtype.lower()]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-5:])
        raise StageFailed(f"llama.cpp's converter failed on {model_dir}:\n{tail}")
    return out_path
