"""The demo recipe on the real SmolLM2, into a real `ollama serve`, ending with a chat reply."""
from __future__ import annotations

import json
import math

import pytest

from helpers import cli
from ollama_fixtures import RUNNER_OPTIONS, ollama_binary, ollama_server  # noqa: F401


def test_embedded_source_is_the_smollm2_gguf(smollm2_gguf):
    from ollama_compress.hooks.source import resolve_source

    assert resolve_source("embedded:smollm2-135m-instruct") == smollm2_gguf


@pytest.mark.slow
def test_demo_recipe_end_to_end(tmp_path, smollm2_hf, ollama_server):  # noqa: F811
    out = tmp_path / "run"
    proc = cli("run", "smollm2-135m-demo", "--out", out, "--set", f"source.model={smollm2_hf}",
               "--set", f"ollama.host={ollama_server.host}", "--set", "ollama.parameters.num_ctx=512",
               "--set", "data.calibration.samples=8", "--set", "data.heldout.samples=4",
               "--set", "heal.budget=null", "--set", "heal.steps=6", "--set", "heal.batch_size=1",  # a short heal:
               "--set", "heal.checkpoint_every=3",  # the bench measures the full one
               "--set", "evaluate.teacher_quants=[Q4_K_M, IQ3_M]",
               "--set", "prune.select=metric",  # measured selection is covered in test_repair; it costs minutes here
               "--set", "evaluate.max_new_tokens=8")
    assert proc.returncode == 0, proc.stderr[-3000:]

    lock = json.loads((out / "run.json").read_text())
    status = {name: stage["status"] for name, stage in lock["stages"].items()}
    assert status == {"source": "done", "importance": "done", "prune": "done", "heal": "done",
                      "export": "done", "ollama": "done", "evaluate": "done"}
    heal = lock["stages"]["heal"]["metrics"]
    assert heal["kl_after"] < heal["kl_before"]  # even 6 steps move the student towards the teacher
    assert (out / "60-evaluate" / "report.md").is_file()

    scores = json.loads((out / "10-importance" / "scores.json").read_text())
    assert len(scores["block_influence"]) == 30 and all(math.isfinite(s) for s in scores["block_influence"])
    layer_map = json.loads(next((out / "20-pruned").rglob("layer_map.json")).read_text())
    assert len(layer_map["student_to_teacher"]) == 24 and len(layer_map["removed"]) == 6
    assert 0 not in layer_map["removed"] and 29 not in layer_map["removed"]

    quants = {row["name"]: row for row in json.loads((out / "40-gguf" / "quants.json").read_text())["quants"]}
    assert {"Q8_0", "Q4_K_M"} <= set(quants)
    for row in quants.values():
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
    assert quants["Q4_K_M"]["size_bytes"] < quants["Q8_0"]["size_bytes"]

    client = ollama_server.client()
    names = {m.model for m in client.list().models}
    assert {"smollm2-135m-demo:Q8_0", "smollm2-135m-demo:Q4_K_M"} <= names
    reply = client.chat(model="smollm2-135m-demo:Q4_K_M",
                        messages=[{"role": "user", "content": "Name a colour."}],
                        options={**RUNNER_OPTIONS, "num_predict": 16, "temperature": 0})
    assert reply.message.content.strip()
    assert "ollama run smollm2-135m-demo:" in proc.stdout
