"""The run pipeline on a tiny model: stage dirs, run.json lock, cache, not-available stages, dry run."""
from __future__ import annotations

import json

import pytest

from helpers import TINY_DATA, cli, write_recipe


@pytest.fixture(scope="module")
def tiny_recipe(tmp_path_factory, tiny_model_dir):
    return write_recipe(tmp_path_factory.mktemp("recipe") / "tiny.yaml", tiny_model_dir("llama", 6), "tiny-run",
                        data=TINY_DATA, prune={"layers": [2, 3]}, heal={"steps": 1},
                        export={"outtype": "F32", "quants": ["Q8_0"]})


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, tiny_recipe):
    out = tmp_path / "run"
    proc = cli("run", tiny_recipe, "--out", out, "--dry-run")
    assert proc.returncode == 0, proc.stderr
    for stage in ("source", "prune", "heal", "export", "ollama"):
        assert stage in proc.stdout
    assert "will run" in proc.stdout and "cached" not in proc.stdout
    assert not out.exists()


def test_run_writes_stage_dirs_and_lock_then_reuses_the_cache(tmp_path, tiny_recipe):
    out = tmp_path / "run"
    first = cli("run", tiny_recipe, "--out", out)
    assert first.returncode == 0, first.stderr
    lock = json.loads((out / "run.json").read_text())
    stages = lock["stages"]
    assert [stages[s]["status"] for s in ("source", "prune", "heal", "export")] == ["done"] * 4
    assert stages["importance"]["status"] == "skipped"  # layers were given: nothing to score
    assert lock["inputs"]["source"]["sha256"]
    assert lock["versions"]["torch"] and lock["versions"]["gguf"]
    layer_map = json.loads((out / "20-pruned" / "model" / "layer_map.json").read_text())
    assert layer_map["removed"] == [2, 3]
    ggufs = stages["export"]["outputs"]["gguf"]
    assert set(ggufs) == {"F32", "Q8_0"}
    for path in ggufs.values():
        assert path.startswith(str(out / "40-gguf")) and open(path, "rb").read(4) == b"GGUF"
    assert not [p for p in out.rglob(".*tmp-*")]
    for written in out.rglob("*"):  # no file names the temporary directory its stage ran in
        if written.is_file() and written.suffix in (".json", ".jsonl", ".md", "") and written.stat().st_size < 2**20:
            assert ".tmp-" not in written.read_text(errors="replace"), written

    second = cli("run", tiny_recipe, "--out", out)
    assert second.returncode == 0, second.stderr
    assert second.stderr.count("cached, skipped") == 4  # source, prune, heal, export

    third = cli("run", tiny_recipe, "--out", out, "--set", "prune.layers=[1]")
    assert third.returncode == 0, third.stderr
    assert "source: cached" in third.stderr
    assert "prune: done" in third.stderr and "heal: done" in third.stderr and "export: done" in third.stderr
    lock = json.loads((out / "run.json").read_text())
    assert lock["recipe"]["prune"]["layers"] == [1]
