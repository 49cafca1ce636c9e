"""The stage table: plugins that take over or wrap a stage, cache keys that cover what a stage reads."""
from __future__ import annotations

import json
import os

import pytest

from helpers import cli, install_plugin

EXPORT_PLUGIN = '''
from pathlib import Path
from ollama_compress.hookspecs import hookimpl

@hookimpl
def export_gguf(ctx, model_dir, outtype):
    from ollama_compress.gguf import export_gguf as write_gguf
    path = Path(ctx.out_dir) / "by-plugin.gguf"
    write_gguf(Path(model_dir), path, outtype, {"name": "by-plugin"}, ctx.options)
    ctx.metrics["exported_by"] = "oc-exporter"
    return path

@hookimpl(wrapper=True)
def run_stage(ctx):
    result = yield
    ctx.metrics["wrapped_by"] = "oc-exporter"
    return result
'''


def tiny_recipe(recipe_file, model_dir, prune: dict | None = None, quants: tuple = ()):
    return recipe_file(model_dir, "tiny-stages",
                       data={"calibration": {"samples": 2, "seq_len": 32},
                             "heldout": {"split": "heldout", "samples": 2, "seq_len": 32}},
                       prune=prune or {"remove": 2}, export={"outtype": "F32", "quants": list(quants)})


def test_an_installed_plugin_takes_over_a_stage_and_wraps_every_stage(tmp_path, tiny_model_dir, recipe_file, plugin_dir):
    install_plugin(plugin_dir, "oc_exporter", EXPORT_PLUGIN, dist="oc-exporter")
    recipe = tiny_recipe(recipe_file, tiny_model_dir("llama", 4), prune={"layers": [2]})
    out = tmp_path / "run"
    proc = cli("run", recipe, "--out", out, plugins=plugin_dir)
    assert proc.returncode == 0, proc.stderr
    stages = json.loads((out / "run.json").read_text())["stages"]
    assert stages["export"]["metrics"]["exported_by"] == "oc-exporter"
    assert stages["export"]["outputs"]["gguf"]["F32"] == str(out / "40-gguf" / "by-plugin.gguf")
    for name in ("source", "prune", "export"):
        assert stages[name]["metrics"]["wrapped_by"] == "oc-exporter"
        assert isinstance(stages[name]["seconds"], float) and "seconds" not in stages[name]["metrics"]


def test_a_misspelled_hook_is_an_error_that_names_it(tmp_path, plugin_dir):
    install_plugin(plugin_dir, "oc_typo", '''
from ollama_compress.hookspecs import hookimpl

@hookimpl
def export_guff(ctx, model_dir, outtype):
    return None
''', dist="oc-typo")
    proc = cli("plugins", plugins=plugin_dir)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "oc_typo" in proc.stderr and "export_guff" in proc.stderr


def statuses(stderr: str) -> dict[str, str]:
    """``{stage: "cached" | "done"}`` from a run's progress lines."""
    found = {}
    for line in stderr.splitlines():
        if "] " in line and ": " in line:
            stage, _, rest = line.split("] ", 1)[1].partition(": ")
            if rest.startswith(("cached", "done")):
                found[stage] = rest.split(",")[0].split(" ")[0]
    return found


@pytest.fixture
def isolated_cache(tmp_path):
    return {"OLLAMA_COMPRESS_CACHE": str(tmp_path / "cache")}


def test_cache_keys_cover_only_what_a_stage_reads(tmp_path, tiny_model_dir, isolated_cache, recipe_file):
    recipe = tiny_recipe(recipe_file, tiny_model_dir("llama", 6))
    out = tmp_path / "run"
    first = cli("run", recipe, "--out", out, env=isolated_cache)
    assert first.returncode == 0, first.stderr
    assert statuses(first.stderr) == {s: "done" for s in ("source", "importance", "prune", "export")}

    fewer = cli("run", recipe, "--out", out, "--set", "prune.remove=1", env=isolated_cache)
    assert fewer.returncode == 0, fewer.stderr
    assert statuses(fewer.stderr) == {"source": "cached", "importance": "cached", "prune": "done",
                                      "export": "done"}

    heldout = cli("run", recipe, "--out", out, "--set", "prune.remove=1", "--set",
                      "data.heldout.samples=3", env=isolated_cache)
    assert heldout.returncode == 0, heldout.stderr
    assert statuses(heldout.stderr) == {"source": "cached", "importance": "cached", "prune": "cached",
                                        "export": "done"}


def test_the_source_is_hashed_once_and_a_dry_run_reads_no_weights(tmp_path, tiny_model_dir, isolated_cache, recipe_file):
    from ollama_compress.fsutil import Fingerprints, tree_sha256

    model = tmp_path / "model"
    model.mkdir()
    for f in tiny_model_dir("llama", 4).iterdir():
        (model / f.name).write_bytes(f.read_bytes())
    recipe = tiny_recipe(recipe_file, model, prune={"layers": [1]})
    cache = tmp_path / "cache" / "fingerprints.json"

    plan = cli("run", recipe, "--out", tmp_path / "run", "--dry-run", env=isolated_cache)
    assert plan.returncode == 0, plan.stderr
    assert "source not hashed yet" in plan.stdout
    assert not cache.exists()  # a dry run never read the weights to hash them

    digest = Fingerprints(cache).sha256(model)
    assert digest == tree_sha256(model)
    weights = model / "model.safetensors"
    stat = weights.stat()
    blob = bytearray(weights.read_bytes())
    blob[-1] ^= 0xFF  # same size, same mtime, other bytes: the cached hash is reused unread
    weights.write_bytes(bytes(blob))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert Fingerprints(cache).sha256(model) == digest
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # touched: hashed again
    assert Fingerprints(cache).sha256(model) == tree_sha256(model) != digest


def test_a_stage_that_returns_an_undeclared_key_fails_by_name(tmp_path, tiny_model_dir, plugin_dir, recipe_file):
    install_plugin(plugin_dir, "oc_leaky", '''
from ollama_compress.hookspecs import hookimpl

@hookimpl(wrapper=True)
def run_stage(ctx):
    result = yield
    if ctx.stage == "prune":
        result = {**result, "ollama_host": "http://elsewhere"}
    return result
''', dist="oc-leaky")
    recipe = tiny_recipe(recipe_file, tiny_model_dir("llama", 4), prune={"layers": [2]})
    proc = cli("run", recipe, "--out", tmp_path / "run", plugins=plugin_dir)
    assert proc.returncode == 1, proc.stderr
    assert "prune stage returned ollama_host" in proc.stderr and "Traceback" not in proc.stderr


def test_from_until_and_reproducing_a_lock(tmp_path, tiny_model_dir, isolated_cache, recipe_file):
    recipe = tiny_recipe(recipe_file, tiny_model_dir("llama", 4), prune={"layers": [2]})
    out = tmp_path / "run"
    early = cli("run", recipe, "--out", out, "--from", "export", env=isolated_cache)
    assert early.returncode == 2 and "--from export: the source stage has no finished output" in early.stderr

    part = cli("run", recipe, "--out", out, "--until", "prune", env=isolated_cache)
    assert part.returncode == 0, part.stderr
    lock = json.loads((out / "run.json").read_text())
    assert lock["stages"]["export"] == {"status": "skipped", "reason": "--until prune"}
    assert not (out / "40-gguf").exists()

    rest = cli("run", recipe, "--out", out, "--from", "prune", env=isolated_cache)
    assert rest.returncode == 0, rest.stderr
    assert statuses(rest.stderr) == {"source": "cached", "prune": "done", "export": "done"}
    assert not list(out.glob(".*.work"))

    again = cli("run", out / "run.json", env=isolated_cache)  # reproduce from the lock
    assert again.returncode == 0, again.stderr
    assert statuses(again.stderr) == {"source": "cached", "prune": "cached", "export": "cached"}

    lock = json.loads((out / "run.json").read_text())
    lock["versions"]["torch"] = "0.0.1"
    lock["inputs"]["source"]["sha256"] = "0" * 64
    (out / "run.json").write_text(json.dumps(lock))
    refused = cli("run", out / "run.json", env=isolated_cache)
    assert refused.returncode == 2 and "Traceback" not in refused.stderr
    assert "torch 0.0.1 in the lock" in refused.stderr and "sha256" in refused.stderr and "--force" in refused.stderr
    forced = cli("run", out / "run.json", "--force", env=isolated_cache)
    assert forced.returncode == 0, forced.stderr

    lock["recipe"]["recipe_version"] = 99
    (out / "run.json").write_text(json.dumps(lock))
    newer = cli("run", out / "run.json", "--force", env=isolated_cache)
    assert newer.returncode == 2 and "recipe version 99" in newer.stderr
