"""Quantization with llama.cpp's quantizer, and quality measured from llama.cpp logits.

The source GGUF is a random-weight llama (hidden 256, 2 blocks) with SmolLM2's tokenizer written
with gguf-py (tests/gguf_samples.py), so these tests do not depend on the HF->GGUF exporter; rows
of 256 let the k-quants apply to every matrix instead of falling back. The last test runs the
real SmolLM2 through the exporter.
"""
from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import llama_cpp
import numpy as np
import pytest

from helpers import recipe_dict
from ollama_compress.fsutil import JOURNAL, MARKER

from gguf_samples import write_small_gguf, write_tiny_llama_gguf
from ollama_compress.errors import StageFailed, UserError
from ollama_compress.gguf_verify import verify_gguf
from ollama_compress.hooks.quantize import (
    format_quants_table,
    measure_quants,
    quant_file_name,
    quantize_file,
    quantize_gguf,
    write_quants_report,
)

# Used when ollama_compress/data/heldout.txt is not there; the tests pass it explicitly anyway.
FALLBACK_TEXT = [
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers moved their animals to the hills while the children watched from the church steps.",
    "A compiler translates source code into machine instructions. Most compilers first build an "
    "abstract syntax tree, then check types, optimise an intermediate form and finally emit code.",
    "def mean(xs):\n    return sum(xs) / len(xs) if xs else 0.0\n\nprint(mean([1, 2, 3]))",
    "Le marché ouvre à huit heures. On y trouve du pain, des fromages et des fruits de saison; "
    "les prix sont affichés à la craie sur de petites ardoises.",
    "Water boils at 100 degrees Celsius at sea level, but at lower temperatures on mountains, "
    "because the air pressure is lower and molecules escape the liquid more easily.",
]


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory, smollm2_gguf) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny-F16.gguf", smollm2_gguf)


@pytest.fixture(scope="module")
def quants(tiny_f16) -> dict[str, Path]:
    return {q: quantize_file(tiny_f16, q, tiny_f16.with_name(quant_file_name(tiny_f16, q)))
            for q in ("Q8_0", "Q4_K_M")}


def _load(path: Path, n_ctx: int = 64):
    return llama_cpp.Llama(str(path), n_ctx=n_ctx, verbose=False)


def test_quants_are_what_was_asked(tiny_f16, quants):
    f16 = verify_gguf(tiny_f16)
    for quant, path in quants.items():
        assert path.name == f"tiny-{quant}.gguf"
        summary = verify_gguf(path)
        assert summary.file_type == quant
        assert summary.size < f16.size
        assert summary.tensor_count == f16.tensor_count
    assert "Q8_0" in verify_gguf(quants["Q8_0"]).type_counts()
    assert "Q4_K" in verify_gguf(quants["Q4_K_M"]).type_counts()  # rows of 256: no fallback
    assert verify_gguf(quants["Q4_K_M"]).bits_per_weight < verify_gguf(quants["Q8_0"]).bits_per_weight
    assert not [p for p in tiny_f16.parent.iterdir() if p.name.startswith(".")]  # no temp files left


@pytest.mark.parametrize("quant", ["Q8_0", "Q4_K_M"])
def test_quants_load_and_generate(quant, quants):
    llm = _load(quants[quant])
    out = llm.create_completion("Once upon a time", max_tokens=8, temperature=0.0)
    assert out["usage"]["completion_tokens"] >= 1
    tokens = llm.tokenize(b"The cat sat on the mat", add_bos=False)
    llm.reset()
    llm.eval(tokens)
    assert np.isfinite(np.asarray(llm.scores[len(tokens) - 1])).all()
    llm.close()


def test_measure_quants(tiny_f16, quants, tmp_path):
    rows = measure_quants(tiny_f16, {"F16": tiny_f16, **quants}, texts=FALLBACK_TEXT, n_ctx=128, max_tokens=384)
    by_name = {r["name"]: r for r in rows[1:]}
    assert rows[0]["reference"] and rows[0]["name"] == "F16"
    for row in rows:
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
        assert math.isfinite(row["mean_kl"]) and 0 <= row["top1_agreement"] <= 1
        assert row["tokens"] > 100
    # the same file loaded twice gives the same logits; fewer bits give a worse match
    assert by_name["F16"]["mean_kl"] == pytest.approx(0.0, abs=1e-6)
    assert by_name["F16"]["top1_agreement"] == 1.0
    assert by_name["F16"]["perplexity"] == pytest.approx(rows[0]["perplexity"], rel=1e-5)
    assert by_name["Q4_K_M"]["mean_kl"] > by_name["Q8_0"]["mean_kl"] >= 0
    assert by_name["Q4_K_M"]["bits_per_weight"] < by_name["Q8_0"]["bits_per_weight"] < rows[0]["bits_per_weight"]

    # files are named relative to their own folder; every row has llama.cpp speeds
    assert [r["file"] for r in rows] == [tiny_f16.name, tiny_f16.name, *(p.name for p in quants.values())]
    assert all(r["prompt_tokens_per_s"] > 0 and r["gen_tokens_per_s"] > 0 for r in rows)
    assert all(r["imatrix"] is None for r in rows)
    report = write_quants_report(rows, tmp_path / "report")
    assert json.loads(report.read_text())["quants"] == json.loads(json.dumps(rows))
    assert format_quants_table(rows).row_count == len(rows)


def test_measure_quants_default_text(tiny_f16):
    """Without texts the shipped held-out corpus is used."""
    from ollama_compress.hooks.quantize import shipped_heldout_text

    rows = measure_quants(tiny_f16, {}, n_ctx=64, max_tokens=128, speed=False)
    shipped = measure_quants(tiny_f16, {}, texts=shipped_heldout_text(), n_ctx=64, max_tokens=128, speed=False)
    other = measure_quants(tiny_f16, {}, texts=FALLBACK_TEXT, n_ctx=64, max_tokens=128, speed=False)
    assert rows[0]["tokens"] == 126 and math.isfinite(rows[0]["perplexity"])
    assert rows[0]["perplexity"] == shipped[0]["perplexity"] != other[0]["perplexity"]


@pytest.mark.parametrize("quant,words", [
    ("Q4_K_X", "unknown quant 'Q4_K_X'; known: F32, F16"),
    ("q4_k_m", "did you mean Q4_K_M?"),
    ("IQ2_XXS", "IQ2_XXS needs an importance matrix"),
    ("Q2_K_S", "Q2_K_S needs an importance matrix"),
])
def test_bad_quant_names(quant, words, tiny_f16, tmp_path):
    with pytest.raises(UserError, match=words.replace("?", r"\?")):
        quantize_file(tiny_f16, quant, tmp_path / "out.gguf")
    assert not list(tmp_path.iterdir())


def test_rejects_quantized_source(smollm2_gguf, tmp_path):
    with pytest.raises(UserError, match=r"already quantized \(Q4_1, Q8_0 tensors\)"):
        quantize_file(smollm2_gguf, "Q4_K_M", tmp_path / "out.gguf")


def test_rejects_corrupted_source(tiny_f16, tmp_path):
    bad = tmp_path / "bad-F16.gguf"
    bad.write_bytes(tiny_f16.read_bytes()[:-1000])
    with pytest.raises(UserError, match="not a valid GGUF file"):
        quantize_file(bad, "Q8_0", tmp_path / "out.gguf")
    assert [p.name for p in tmp_path.iterdir()] == ["bad-F16.gguf"]


def test_output_dir_is_a_file(tiny_f16, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        quantize_file(tiny_f16, "Q8_0", blocker / "out.gguf")


def test_unknown_architecture_fails_cleanly(tmp_path):
    src = write_small_gguf(tmp_path / "small-F32.gguf")
    data = bytearray(src.read_bytes())
    at = data.find(b"llama")  # general.architecture's value comes first
    data[at : at + 5] = b"zorba"
    data = bytes(data).replace(b"llama.block_count", b"zorba.block_count")
    src.write_bytes(data)
    assert verify_gguf(src).architecture == "zorba"
    with pytest.raises((UserError, StageFailed), match="llama.cpp could not quantize .*zorba"):
        quantize_file(src, "Q8_0", tmp_path / "out.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["small-F32.gguf"]


def _corrupt(src: Path, dst: Path, name: str, field: str, value: int) -> Path:
    data = bytearray(src.read_bytes())
    if field == "block_count":
        at = data.find(b"llama.block_count") + 17 + 4
        struct.pack_into("<I", data, at, value)
    else:
        start = data.find(struct.pack("<Q", len(name)) + name.encode())
        n_dims = struct.unpack_from("<I", data, start + 8 + len(name))[0]
        at = start + 8 + len(name) + 4 + 8 * n_dims + 4
        struct.pack_into("<Q", data, at, struct.unpack_from("<Q", data, at)[0] + value)
    dst.write_bytes(bytes(data))
    return dst


@pytest.mark.parametrize("case", [("blk.0.attn_q.weight", "offset", 32), ("blk.0.attn_q.weight", "offset", 4),
                                  ("", "block_count", 1), ("", "block_count", 3)])
def test_verifier_rejects_what_llama_cpp_rejects(case, tiny_f16, tmp_path):
    """Each rule the verifier adds over plain bounds checks is one llama.cpp enforces too."""
    name, field, value = case
    bad = _corrupt(tiny_f16, tmp_path / "bad.gguf", name, field, value)
    with pytest.raises(UserError):
        verify_gguf(bad)
    with pytest.raises(ValueError):
        _load(bad)


def test_stage_hook_names_and_metrics(tiny_f16, tmp_path):
    from ollama_compress.context import StageContext
    from ollama_compress.recipe import validate

    recipe = validate(recipe_dict("x", "tiny", export={"quants": ["Q8_0"]}))
    ctx = StageContext(stage="export", recipe=recipe, run_dir=tmp_path, out_dir=tmp_path / "out")
    ctx.out_dir.mkdir()
    path = quantize_gguf(ctx, gguf_path=tiny_f16, quant="Q8_0")
    assert path == ctx.out_dir / "tiny-Q8_0.gguf"
    assert verify_gguf(path).file_type == "Q8_0"
    assert ctx.metrics["quantize"]["Q8_0"]["size_bytes"] == path.stat().st_size


def test_quant_file_name():
    assert quant_file_name(Path("a/m-F16.gguf"), "Q4_K_M") == "m-Q4_K_M.gguf"
    assert quant_file_name(Path("m-bf16.gguf"), "Q8_0") == "m-Q8_0.gguf"
    assert quant_file_name(Path("model.gguf"), "Q8_0") == "model-Q8_0.gguf"


@pytest.mark.slow
def test_smollm2_export_quants_load_and_generate(smollm2_hf, tmp_path):
    """The real path: SmolLM2 HF dir -> F16 GGUF (exporter) -> Q8_0 and Q4_K_M -> llama.cpp generates."""
    from ollama_compress.gguf import export_gguf

    f16 = tmp_path / "smollm2-F16.gguf"
    export_gguf(smollm2_hf, f16, "F16")
    for quant in ("Q8_0", "Q4_K_M"):
        path = quantize_file(f16, quant, tmp_path / quant_file_name(f16, quant))
        assert verify_gguf(path).file_type == quant
        llm = _load(path, n_ctx=128)
        out = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)
        assert out["usage"]["completion_tokens"] >= 1
        assert out["choices"][0]["text"].strip()
        llm.close()


# ---------------------------------------------------------------- one quant loop, through the hooks
TAKEOVER_PLUGIN = """
import os
from pathlib import Path
from ollama_compress.hookspecs import hookimpl

def _note(line):
    with open(os.environ["OC_PLUGIN_LOG"], "a") as f:
        f.write(line + "\\n")

@hookimpl
def load_source(ctx):
    from ollama_compress.hooks.source import source_path
    _note("locate source" if ctx.inputs.get("locate_source") else "load source")
    return source_path(ctx.recipe.source, ctx.options)

@hookimpl
def export_gguf(ctx, model_dir, outtype):
    from ollama_compress.gguf import export_gguf as write_gguf
    _note(f"export {Path(model_dir).name}")
    return write_gguf(Path(model_dir), Path(ctx.out_dir) / f"plugin-{outtype}.gguf", outtype, {"name": "plugin"},
                      ctx.options)

@hookimpl
def quantize_gguf(ctx, gguf_path, quant):
    from ollama_compress.hooks.quantize import quantize_file
    _note(f"quantize {Path(gguf_path).name} {quant}")
    return quantize_file(Path(gguf_path), quant, Path(ctx.out_dir) / f"plugin-{quant}.gguf")
"""


def test_a_plugin_that_takes_over_the_source_export_and_quantize_hooks_is_used_on_every_path(
        tmp_path, tiny_model_dir, recipe_file, plugin_dir):
    from helpers import cli, install_plugin

    install_plugin(plugin_dir, "oc_takeover", TAKEOVER_PLUGIN, dist="oc-takeover")
    log = tmp_path / "plugin.log"
    env = {"OC_PLUGIN_LOG": str(log)}
    teacher = tiny_model_dir("llama", 4)
    recipe = recipe_file(teacher, "tiny-takeover",
                         data={"calibration": {"samples": 2, "seq_len": 32},
                               "heldout": {"split": "heldout", "samples": 2, "seq_len": 32}},
                         prune={"layers": [2]}, export={"outtype": "F32", "quants": ["Q8_0"]},
                         evaluate={"teacher_quants": ["Q8_0"], "speed": False, "knowledge": False,
                                   "max_new_tokens": 1, "prompts": ["Hi."]})

    def run_cli(*args, env_extra):
        return cli(*args, env=env_extra, plugins=plugin_dir)

    run = run_cli("run", recipe, "--out", tmp_path / "run", env_extra=env)
    assert run.returncode == 0, run.stderr
    lock = json.loads((tmp_path / "run" / "run.json").read_text())
    notes = log.read_text().splitlines()
    assert notes[0] == "locate source" and "load source" in notes  # the stage cache hashes what the hook names
    assert Path(lock["stages"]["export"]["outputs"]["gguf"]["Q8_0"]).name == "plugin-Q8_0.gguf"
    rows = {r["name"]: r for r in lock["stages"]["evaluate"]["metrics"]["evaluation"]["rows"]}
    teacher_q8 = Path(rows["teacher Q8_0"]["path"])  # evaluate's teacher quant: exported and quantized by the plugin
    assert teacher_q8.name == "plugin-Q8_0.gguf" and "teacher-gguf" in teacher_q8.parts
    assert f"export {teacher.name}" in notes and "quantize plugin-F32.gguf Q8_0" in notes

    exported = run_cli("export", teacher, "--outtype", "F32", "--quant", "Q8_0", "--out", tmp_path / "exp",
                       env_extra=env)
    assert exported.returncode == 0, exported.stderr
    assert (tmp_path / "exp" / "plugin-Q8_0.gguf").is_file()

    (f32,) = (tmp_path / "exp").glob("*-F32.gguf")
    quantized = run_cli("quantize", f32, "-q", "Q8_0", "--out", tmp_path / "q", env_extra=env)
    assert quantized.returncode == 0, quantized.stderr
    assert [p.name for p in (tmp_path / "q").iterdir() if p.name not in (MARKER, JOURNAL)] == ["plugin-Q8_0.gguf"]
