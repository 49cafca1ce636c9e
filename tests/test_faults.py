"""Fault injection: SIGKILL a real `ollama-compress run` at several points of a tiny recipe.

After each kill the run directory holds, for every stage, either the previous complete output or
none (never a half-written one); a rerun finishes the job and leaves no temporaries behind.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import TINY_DATA, write_recipe
from ollama_compress.gguf_verify import verify_gguf

def _write_tiny_recipe(path: Path, model: Path, **sections) -> Path:
    return write_recipe(path, model, "tiny-run", data=TINY_DATA, prune={"layers": [1]},
                        export={"outtype": "F32", "quants": ["Q8_0"]}, **sections)


def start(recipe: Path, out: Path, *overrides: str) -> subprocess.Popen:
    sets = [arg for item in overrides for arg in ("--set", item)]
    return subprocess.Popen([sys.executable, "-m", "ollama_compress", "run", str(recipe), "--out", str(out), *sets],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def kill_when(proc: subprocess.Popen, out: Path, pattern: str, min_size: int = 0, timeout: float = 300) -> Path:
    """SIGKILL ``proc`` as soon as a path matching ``pattern`` (under ``out``) has ``min_size`` bytes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in out.glob(pattern):
            try:
                big_enough = path.stat().st_size >= min_size
            except FileNotFoundError:
                continue
            if big_enough:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return path
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before {pattern} appeared: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"{pattern} did not appear within {timeout:.0f}s")


def temporaries(out: Path) -> list[Path]:
    return [p for p in out.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def assert_consistent(out: Path) -> dict[str, list[str]]:
    """Every visible stage directory is complete; returns each one's file names."""
    if (out / "run.json").exists():
        json.loads((out / "run.json").read_text())
    seen = {}
    for stage_dir in sorted(out.glob("[0-9][0-9]-*")):
        record = json.loads((stage_dir / ".stage.json").read_text())
        assert record["status"] == "done", (stage_dir, record)
        assert not temporaries(stage_dir), temporaries(stage_dir)
        for gguf in stage_dir.glob("*.gguf"):
            verify_gguf(gguf)
        seen[stage_dir.name] = sorted(p.name for p in stage_dir.rglob("*") if p.is_file())
    return seen


def test_sigkill_at_each_stage_leaves_old_or_new_and_a_rerun_finishes(tmp_path, tiny_model_dir):
    recipe = _write_tiny_recipe(tmp_path / "tiny.yaml", tiny_model_dir("llama", 4))
    out = tmp_path / "run"

    # 1. killed in the middle of writing the F32 GGUF: what finished before is intact
    kill_when(start(recipe, out), out, ".40-gguf.tmp-*/.tiny-run-F32.gguf.tmp-*", min_size=1 << 20)
    stages = assert_consistent(out)
    assert "20-pruned" in stages and "40-gguf" not in stages
    assert temporaries(out)  # the killed run's temporaries (a GGUF among them) are still there...

    # 2. a rerun finishes the job and removes them
    done = subprocess.run([sys.executable, "-m", "ollama_compress", "run", str(recipe), "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    stages = assert_consistent(out)
    assert {"tiny-run-F32.gguf", "tiny-run-Q8_0.gguf"} <= set(stages["40-gguf"])
    assert temporaries(out) == []

    # 3. killed while a changed export replaces the finished one: the previous export stays whole
    kill_when(start(recipe, out, "export.quants=[Q4_0]"), out, ".40-gguf.tmp-*/.tiny-run-Q4_0.gguf.tmp-*")
    assert assert_consistent(out)["40-gguf"] == stages["40-gguf"]


# ---------------------------------------------------------------- registration (a real Ollama server)
from ollama_fixtures import ollama_binary, ollama_server  # noqa: E402,F401
from ollama_compress.fsutil import file_sha256  # noqa: E402
from ollama_compress.ollama_server import OllamaServer  # noqa: E402



def registered(server_host: str, prefix: str) -> dict[str, str]:
    """name -> model blob sha256 of every model named ``prefix:*`` in the server."""
    from ollama_compress.ollama_server import make_client

    client = make_client(server_host)
    found = {}
    for model in client.list().models:
        if model.model.startswith(prefix + ":"):
            modelfile = client.show(model.model).modelfile or ""
            digest = next((w.rsplit("sha256-", 1)[1] for w in modelfile.split() if "sha256-" in w), "")
            found[model.model] = digest
    return found


def wait_for_request(proc: subprocess.Popen, log: Path, path: str, since: int, timeout: float = 600) -> None:
    """Return once the server's log (after byte ``since``) shows a request for ``path``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with open(log, "rb") as f:
            f.seek(since)
            if path.encode() in f.read():
                return
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before it called {path}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"no {path} request within {timeout:.0f}s")


def assert_nothing_half_registered(server_host: str, models_dir: Path, prefix: str, out: Path) -> dict[str, str]:
    ours = {file_sha256(p) for p in (out / "40-gguf").glob("*.gguf")} if (out / "40-gguf").is_dir() else set()
    models = registered(server_host, prefix)
    assert all(digest in ours for digest in models.values()), (models, ours)
    assert not list((models_dir / "blobs").glob("*-partial*"))
    return models


def register_and_check(recipe: Path, out: Path, host: str, models_dir: Path, prefix: str) -> None:
    done = subprocess.run([sys.executable, "-m", "ollama_compress", "run", str(recipe), "--out", str(out)],
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    names = json.loads((out / "run.json").read_text())["stages"]["ollama"]["outputs"]["ollama_models"]
    models = assert_nothing_half_registered(host, models_dir, prefix, out)
    assert set(models) == set(names.values()) and len(models) == 2
    assert temporaries(out) == []


@pytest.mark.ollama
def test_sigkill_during_registration_then_a_rerun_completes(tmp_path, tiny_model_dir, ollama_server):  # noqa: F811
    recipe = _write_tiny_recipe(tmp_path / "register.yaml", tiny_model_dir("llama", 4),
                                ollama={"name": "killed", "host": ollama_server.host})
    out = tmp_path / "run"
    since = ollama_server.log_path.stat().st_size
    proc = start(recipe, out)
    wait_for_request(proc, ollama_server.log_path, "/api/blobs/", since)
    os.kill(proc.pid, signal.SIGKILL)  # while the first GGUF is uploaded or created
    proc.wait()
    assert_consistent(out)
    assert_nothing_half_registered(ollama_server.host, ollama_server.models_dir, "killed", out)
    register_and_check(recipe, out, ollama_server.host, ollama_server.models_dir, "killed")


@pytest.mark.ollama
def test_a_server_that_dies_mid_registration_then_a_rerun_completes(tmp_path, tiny_model_dir, ollama_binary):  # noqa: F811
    models_dir = tmp_path / "models"
    server = OllamaServer(ollama_binary, models_dir=models_dir, log_path=tmp_path / "serve.log", startup_timeout=120)
    server.start()
    try:
        recipe = _write_tiny_recipe(tmp_path / "register.yaml", tiny_model_dir("llama", 4),
                                    ollama={"name": "orphan", "host": server.host})
        out = tmp_path / "run"
        proc = start(recipe, out)
        wait_for_request(proc, server.log_path, "/api/blobs/", 0)
        os.killpg(server.process.pid, signal.SIGKILL)  # the server dies under the registration
        server.process.wait()
        server.process = None
        proc.wait(timeout=300)
        stderr = proc.stderr.read()
        assert proc.returncode == 1 and "Traceback" not in stderr, stderr[-3000:]
        assert stderr.strip().splitlines()[-1].startswith("Error:"), stderr[-2000:]
        assert_consistent(out)
        assert not (out / "50-ollama").exists()

        server.start()  # the same port and models directory, as after a restart
        assert_nothing_half_registered(server.host, models_dir, "orphan", out)
        register_and_check(recipe, out, server.host, models_dir, "orphan")
    finally:
        server.stop()
