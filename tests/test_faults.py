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

from ollama_compress.gguf_verify import verify_gguf

RECIPE = """\
recipe_version: 1
name: tiny-run
source: {{model: {model}}}
data:
  calibration: {{samples: 2, seq_len: 32}}
  heldout: {{split: heldout, samples: 2, seq_len: 32}}
prune: {{layers: [1]}}
export: {{outtype: F32, quants: [Q8_0]}}
"""


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
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir("llama", 4)))
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
