"""The importance matrix computed in PyTorch: llama.cpp's format, llama-imatrix's numbers, bad input.

Tests that run llama.cpp's tools need them built (``bash .ci/setup`` does, CI runs it); without
them they fail with that instruction.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest

from gguf_samples import write_tiny_llama_gguf
from helpers import assert_clean_error, cli, recipe_dict
from ollama_compress.errors import UserError
from ollama_compress.gguf_verify import verify_gguf
from ollama_compress.hooks.quantize import measure_quants, quantize_file, quantize_gguf
from ollama_compress.imatrix import (
    Imatrix,
    check_imatrix,
    collect_imatrix,
    gguf_names,
    read_imatrix,
    write_imatrix,
)
from ollama_compress.llama_tools import llama_tool

# Relative error ||ours - llama-imatrix|| / ||llama-imatrix|| per tensor over SmolLM2's 210 matrices,
# 4 chunks of 128 tokens of the held-out text: measured max 0.00137 (blk.12.attn_output.weight),
# median 0.00008 (F16 weights and F16 intermediate results in llama.cpp against F32 in PyTorch).
# The bound leaves 3.6x room.
REL_TOLERANCE = 0.005


def tool(name: str) -> Path:
    try:
        return llama_tool(name)
    except UserError as exc:
        pytest.fail(f"{exc} (CI builds them with .ci/setup)", pytrace=False)


@pytest.fixture(scope="module")
def tiny_f16(tmp_path_factory, smollm2_gguf) -> Path:
    return write_tiny_llama_gguf(tmp_path_factory.mktemp("tiny") / "tiny-F16.gguf", smollm2_gguf)


def block_widths(gguf: Path) -> dict[str, int]:
    return {t.name: t.shape[0] for t in verify_gguf(gguf).tensors
            if t.name.startswith("blk.") and len(t.shape) == 2}


def random_imatrix(gguf: Path, seed: int = 0) -> Imatrix:
    rng = np.random.default_rng(seed)
    widths = block_widths(gguf)
    return Imatrix(sums={n: rng.uniform(0.1, 4.0, w) * 50 for n, w in widths.items()},
                   counts={n: 50 for n in widths}, datasets=["random"], chunk_count=1, chunk_size=50)


# ---------------------------------------------------------------- format
def test_round_trip_and_llama_quantize_reads_it(tiny_f16, tmp_path):
    matrix = random_imatrix(tiny_f16)
    path = write_imatrix(matrix, tmp_path / "m.gguf")
    back = read_imatrix(path)
    assert set(back.sums) == set(matrix.sums) and back.datasets == ["random"]
    for name in matrix.sums:
        np.testing.assert_allclose(back.mean(name), matrix.mean(name), rtol=1e-6)
    assert back.chunk_count == 1 and back.chunk_size == 50
    # llama.cpp reads it: IQ2_XS refuses to run without a matrix for every block tensor
    out = quantize_file(tiny_f16, "IQ2_XS", tmp_path / "tiny-IQ2_XS.gguf", imatrix=path)
    summary = verify_gguf(out)
    assert summary.file_type == "IQ2_XS"
    assert summary.metadata["quantize.imatrix.file"] == "m.gguf"  # no directory recorded
    assert summary.metadata["quantize.imatrix.entries_count"] == len(matrix.sums)


def test_reads_llama_cpp_legacy_dat(tiny_f16, tmp_path):
    """The old .dat layout: n, then (name, ncall, nval, mean * ncall) per entry, chunks, dataset."""
    matrix = random_imatrix(tiny_f16, seed=1)
    blob = bytearray(np.int32(len(matrix.sums)).tobytes())
    for name, sums in matrix.sums.items():
        blob += np.int32(len(name)).tobytes() + name.encode() + np.array([3, len(sums)], np.int32).tobytes()
        blob += (sums / matrix.counts[name] * 3).astype(np.float32).tobytes()
    blob += np.int32(3).tobytes() + np.int32(4).tobytes() + b"data"
    path = tmp_path / "m.dat"
    path.write_bytes(bytes(blob))
    back = check_imatrix(path, tiny_f16)
    assert back.datasets == ["data"]
    for name in matrix.sums:
        np.testing.assert_allclose(back.mean(name), matrix.mean(name), rtol=1e-6)
    path.write_bytes(bytes(blob[:200]))
    with pytest.raises(UserError, match="truncated"):
        read_imatrix(path)


# ---------------------------------------------------------------- the same numbers as llama-imatrix
@pytest.mark.slow
def test_matches_llama_imatrix_on_smollm2(smollm2_hf, tmp_path):
    import llama_cpp
    import torch
    from transformers import AutoModelForCausalLM

    from ollama_compress.hooks.quantize import shipped_heldout_text

    done = cli("export", smollm2_hf, "--out", tmp_path / "gguf")
    assert done.returncode == 0, done.stderr
    (f16,) = (tmp_path / "gguf").glob("*-F16.gguf")
    n_ctx, n_chunks = 128, 4
    text_file = tmp_path / "text.txt"
    text_file.write_text("\n\n".join(shipped_heldout_text()))
    ref_path = tmp_path / "ref.gguf"
    args = [tool("llama-imatrix"), "-m", f16, "-f", text_file, "-o", ref_path, "-c", n_ctx, "-b", n_ctx,
            "--chunks", n_chunks, "--no-ppl", "-t", 2]
    ran = subprocess.run([str(a) for a in args], capture_output=True, text=True)
    assert ran.returncode == 0, ran.stderr[-2000:]
    reference = read_imatrix(ref_path)

    # the tokens llama-imatrix used: the text with special tokens added, chunks of n_ctx, each
    # chunk starting with BOS when the vocabulary adds one
    vocab = llama_cpp.Llama(str(f16), vocab_only=True, verbose=False)
    tokens = vocab.tokenize(text_file.read_text().encode(), add_bos=True, special=False)
    bos = vocab.tokenize(b"", add_bos=True, special=False)
    chunks = [tokens[i * n_ctx:(i + 1) * n_ctx] for i in range(n_chunks)]
    if bos:
        chunks = [bos + c[1:] for c in chunks]
    model = AutoModelForCausalLM.from_pretrained(smollm2_hf, dtype=torch.float32, local_files_only=True).eval()
    summary = verify_gguf(f16)
    names = gguf_names(summary.architecture, summary.block_count, (n for n, _ in model.named_modules()))
    ours = collect_imatrix(model, [torch.tensor([c]) for c in chunks], names)

    check_imatrix(ours, summary)
    assert set(ours.sums) == set(reference.sums) and len(ours.sums) == 7 * summary.block_count
    errors = {n: np.linalg.norm(ours.mean(n) - reference.mean(n)) / np.linalg.norm(reference.mean(n))
              for n in reference.sums}
    worst = max(errors, key=errors.get)
    print(f"imatrix relative error: max {errors[worst]:.5f} ({worst}), median {np.median(list(errors.values())):.5f}")
    assert errors[worst] < REL_TOLERANCE, worst
    assert all(ours.counts[n] == n_ctx * n_chunks == reference.counts[n] for n in reference.sums)


def test_names_cover_every_block_matrix_of_each_architecture(arch, tiny_model_dir, tmp_path):
    """gguf-py's names for the HF modules are exactly the exported file's block matrices."""
    import torch

    from ollama_compress.imatrix import compute_imatrix

    model = tiny_model_dir(arch)
    done = cli("export", model, "--out", tmp_path)
    assert done.returncode == 0, done.stderr
    (f16,) = tmp_path.glob("*-F16.gguf")
    batches = [torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))]
    matrix = read_imatrix(compute_imatrix(model, f16, batches, tmp_path / "m.gguf", "random ids"))
    assert set(matrix.sums) == set(block_widths(f16))  # compute_imatrix also ran check_imatrix
    assert all(c == 32 for c in matrix.counts.values()) and matrix.datasets == ["random ids"]


# ---------------------------------------------------------------- the export stage
def test_stage_computes_one_imatrix_and_records_it(tiny_model_dir, tmp_path):
    from ollama_compress.context import StageContext
    from ollama_compress.recipe import validate

    model = tiny_model_dir("llama")
    done = cli("export", model, "--out", tmp_path / "gguf")
    assert done.returncode == 0, done.stderr
    (f16,) = (tmp_path / "gguf").glob("*-F16.gguf")
    recipe = validate(recipe_dict("x", "tiny", data={"calibration": {"samples": 4, "seq_len": 64}},
                                  export={"quants": ["Q4_K_M", "IQ2_XS", "Q8_0"]}))
    assert recipe.export.imatrix == "auto"
    out = tmp_path / ".40-gguf.tmp-1234"
    out.mkdir()
    ctx = StageContext(stage="export", recipe=recipe, run_dir=tmp_path, out_dir=out, inputs={"model_dir": str(model)})
    paths = {q: quantize_gguf(ctx, gguf_path=f16, quant=q) for q in recipe.export.quants}
    matrix = check_imatrix(out / "imatrix.gguf", f16)
    assert matrix.chunk_count == 4 and all(c == 4 * 64 for c in matrix.counts.values())
    assert matrix.datasets == ["calibration: default (4x64 tokens, seed 0)"]
    assert {q: m["imatrix"] for q, m in ctx.metrics["quantize"].items()} == {
        "Q4_K_M": "imatrix.gguf", "IQ2_XS": "imatrix.gguf", "Q8_0": None}

    rows = measure_quants(f16, paths, texts=[Path(model, "config.json").read_text() * 20], n_ctx=64, max_tokens=256)
    report = json.dumps(rows)
    assert ".tmp-" not in report and str(tmp_path) not in report
    by_name = {r["name"]: r for r in rows}
    assert by_name["IQ2_XS"]["imatrix"]["file"] == "imatrix.gguf"
    assert by_name["IQ2_XS"]["imatrix"]["entries"] == len(matrix.sums)
    assert by_name["Q8_0"]["imatrix"] is None and by_name["IQ2_XS"]["file"] == paths["IQ2_XS"].name
    assert all(r["prompt_tokens_per_s"] > 0 and r["gen_tokens_per_s"] > 0 for r in rows)


# ---------------------------------------------------------------- bad input
def test_imatrix_of_another_model(tiny_f16, tmp_path, smollm2_gguf):
    other = write_tiny_llama_gguf(tmp_path / "other-F16.gguf", smollm2_gguf, hidden=512, ffn=1024)
    path = write_imatrix(random_imatrix(other), tmp_path / "other.gguf")
    with pytest.raises(UserError, match="has 512 columns but tiny-F16.gguf has 256"):
        quantize_file(tiny_f16, "IQ2_XS", tmp_path / "out.gguf", imatrix=path)
    deeper = write_tiny_llama_gguf(tmp_path / "deep-F16.gguf", smollm2_gguf, layers=3)
    path = write_imatrix(random_imatrix(deeper), tmp_path / "deep.gguf")
    with pytest.raises(UserError, match=r"entry blk\.2\.\S+ \(and 6 more\) is not a matrix of tiny-F16.gguf"):
        quantize_file(tiny_f16, "Q4_K_M", tmp_path / "out.gguf", imatrix=path)
    partial = random_imatrix(tiny_f16)
    del partial.sums["blk.1.ffn_down.weight"]
    path = write_imatrix(partial, tmp_path / "partial.gguf")
    with pytest.raises(UserError, match=r"no entry for blk\.1\.ffn_down\.weight"):
        quantize_file(tiny_f16, "Q4_K_M", tmp_path / "out.gguf", imatrix=path)
    assert not (tmp_path / "out.gguf").exists()


def test_truncated_and_non_finite_files(tiny_f16, tmp_path):
    good = write_imatrix(random_imatrix(tiny_f16), tmp_path / "good.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(UserError, match="not a valid GGUF file: .*runs past the end of the file"):
        read_imatrix(cut)
    bad = random_imatrix(tiny_f16)
    bad.sums["blk.0.attn_q.weight"][3] = np.nan
    with pytest.raises(UserError, match=r"non-finite values for blk\.0\.attn_q\.weight"):
        read_imatrix(write_imatrix(bad, tmp_path / "nan.gguf"))
    with pytest.raises(UserError, match="not found"):
        read_imatrix(tmp_path / "missing.gguf")


def test_cli_bad_imatrix_is_one_line_exit_2(tiny_f16, tmp_path):
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(write_imatrix(random_imatrix(tiny_f16), tmp_path / "good.gguf").read_bytes()[:300])
    done = cli("quantize", tiny_f16, "-q", "IQ2_XS", "--imatrix", cut, "--out", tmp_path / "out")
    assert_clean_error(done, "cut.gguf", "not a valid GGUF file")
    assert len(done.stderr.strip().splitlines()) == 1
    done = cli("quantize", tiny_f16, "-q", "IQ1_S", "--out", tmp_path / "out")
    assert_clean_error(done, "IQ1_S needs an importance matrix")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_missing_tool(tiny_f16, tmp_path, monkeypatch):
    path = write_imatrix(random_imatrix(tiny_f16), tmp_path / "m.gguf")
    monkeypatch.setenv("OLLAMA_COMPRESS_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(UserError, match=r"llama-quantize is not built .* run 'bash \.ci/setup'"):
        quantize_file(tiny_f16, "IQ2_XS", tmp_path / "out.gguf", imatrix=path)
    assert not (tmp_path / "out.gguf").exists()


def test_recipe_refuses_a_needy_quant_without_imatrix():
    from ollama_compress.recipe import validate

    base = recipe_dict("x", "t")
    with pytest.raises(UserError, match="IQ2_XS need an importance matrix"):
        validate(base | {"export": {"quants": ["IQ2_XS"], "imatrix": None}})
    assert validate(base | {"export": {"quants": ["Q4_K_M"], "imatrix": None}}).export.imatrix is None
    with pytest.raises(UserError, match="did you mean IQ4_XS"):
        validate(base | {"export": {"quants": ["iq4_xs"]}})
