"""Third-party plugins load through the entry-point group, like the built-ins, and can be limited."""
from __future__ import annotations

import json

import pytest

from helpers import cli, install_plugin

PLUGIN = '''
from ollama_compress.hookspecs import hookimpl

def weight_norm(model, batches, **options):
    return [float(sum(p.norm() for p in layer.parameters())) for layer in model.model.layers]

@hookimpl
def register_importance_metrics(register):
    register("weight_norm", weight_norm, "sum of parameter norms per layer")
'''


@pytest.fixture
def plugin_path(plugin_dir):
    """A tiny installed distribution 'oc-weight-norm' with one entry point, on a PYTHONPATH."""
    return install_plugin(plugin_dir, "oc_weight_norm", PLUGIN, "oc-weight-norm", "0.3.0", "weight_norm")


def run(args, plugin_path, load=None):
    return cli(*args, plugins=plugin_path, env={} if load is None else {"OLLAMA_COMPRESS_LOAD_PLUGINS": load},
               timeout=600)


def test_third_party_plugin_is_listed_with_its_version_and_hooks(plugin_path):
    proc = run(["plugins"], plugin_path)
    assert proc.returncode == 0, proc.stderr
    plugins = {p["name"]: p for p in json.loads(proc.stdout)}
    assert plugins["weight_norm"] == {"name": "weight_norm", "version": "0.3.0", "builtin": False,
                                      "hooks": ["register_importance_metrics"]}


@pytest.mark.parametrize("load, listed", [("", False), ("other", False), ("weight_norm", True),
                                          ("oc-weight-norm", True)])
def test_load_plugins_env_limits_external_plugins_only(plugin_path, load, listed):
    proc = run(["plugins"], plugin_path, load=load)
    names = {p["name"] for p in json.loads(proc.stdout)}
    assert ("weight_norm" in names) is listed
    assert {"source", "prune", "export", "stages"} <= names  # built-ins always load


def test_a_plugin_metric_is_usable_by_name(plugin_path, tiny_model_dir):
    model_dir = tiny_model_dir("llama", 4)
    proc = run(["analyze", model_dir, "--metric", "weight_norm", "--samples", "2", "--seq-len", "16",
                "--json", "--out", plugin_path / "analysis"], plugin_path)
    assert proc.returncode == 0, proc.stderr
    scores = json.loads(proc.stdout)["weight_norm"]
    assert len(scores) == 4 and all(s > 0 for s in scores)


def test_a_broken_plugin_is_reported_and_left_out(plugin_path):
    (plugin_path / "oc_weight_norm.py").write_text("raise ImportError('missing dependency foo')\n")
    proc = run(["plugins"], plugin_path)
    assert proc.returncode == 0
    assert "plugin 'weight_norm' failed to load" in proc.stderr
    assert "weight_norm" not in {p["name"] for p in json.loads(proc.stdout)}


def test_a_plugin_capability_wins_over_a_builtin_of_the_same_name():
    from ollama_compress import plugins
    from ollama_compress.hookspecs import hookimpl

    class Override:
        @hookimpl
        def register_importance_metrics(self, register):
            register("block_influence", lambda model, batches, **o: [0.0], "replacement")

    try:
        plugins.register_plugin(Override(), name="override")
        metrics = plugins.capabilities("importance_metrics")
        assert metrics["block_influence"].description == "replacement"
        assert metrics["block_influence"].plugin == "override"
        assert next(iter(metrics)) == "block_influence"  # third-party names come first
        assert "angular" in metrics and metrics["angular"].plugin == "importance"
    finally:
        plugins.reset()
