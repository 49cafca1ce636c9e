"""GGUF export: llama.cpp must compute what transformers computes, for every supported family.

Each check exports a real (tiny, random-weight) HF directory, loads the GGUF in llama.cpp through
llama-cpp-python and compares next-token logits with transformers' on the same token ids.

Tolerances, as the largest absolute logit difference relative to the largest |logit|:
* F32 export, F32 KV cache: the same float32 arithmetic in another order, so ~1e-6 is expected
  (measured <= 7e-7); bound 1e-5. Gemma's GELU is the exception: ggml's CPU backend evaluates
  GELU through a float16 lookup table (GGML_GELU_FP16), measured <= 7e-4; bound 5e-3.
* F16 export: weights rounded to 11-bit mantissas (relative 4.9e-4) and ggml converting the
  activations of F16 matmuls to F16 too; measured <= 1.3e-3; bound 1e-2.
* BF16 export: 8-bit mantissas (relative 3.9e-3 per weight); measured <= 8e-3; bound 5e-2.
Every wrong conversion we could make (Q/K row order, missing +1 on gemma norms, wrong sliding
window, wrong attention scale, dropped bias) moves logits by tens of percent of their scale.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGUFReader

from helpers import recipe_dict
from ollama_compress.errors import UserError
from ollama_compress.fsutil import tree_sha256
from ollama_compress.gguf import export_gguf, tensors, width_warnings
from tiny_models import tiny_model

GELU_FAMILIES = ("gemma2", "gemma3")
TEXT = ("def f(x):\n    return x * 2  # The quick brown fox jumps over the lazy dog, Ünïcödé 🦙 我想在apple工作. "
        "Then it sleeps.")


def rel_error(got: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(got - ref).max() / np.abs(ref).max())


def llama_logits(path: Path, ids: list[int], f32_cache: bool = True) -> np.ndarray:
    import llama_cpp

    kwargs = {"type_k": 0, "type_v": 0} if f32_cache else {}  # 0 = GGML_TYPE_F32
    llm = llama_cpp.Llama(model_path=str(path), logits_all=True, n_ctx=64, n_batch=64, n_threads=2,
                          verbose=False, **kwargs)
    try:
        llm.eval(ids)
        return np.array(llm.scores[: len(ids)], dtype=np.float32)
    finally:
        llm.close()


def hf_logits(model_dir: Path, ids: list[int]) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


@pytest.fixture(scope="module")
def ids(smollm2_tokenizer) -> list[int]:
    # 28 tokens: longer than the tiny gemmas' sliding window (16), so local layers are exercised
    return smollm2_tokenizer(TEXT).input_ids[:28]


def read_fields(path: Path) -> dict:
    reader = GGUFReader(path)
    return {name: field.contents() for name, field in reader.fields.items()}


def save_tiny(tmp_path: Path, tokenizer, arch: str, num_layers: int = 4, **overrides) -> Path:
    out = tmp_path / f"tiny-{arch}"
    tiny_model(arch, num_layers, **overrides).save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------- logits per architecture
def test_logits_match_f32(arch, tiny_model_dir, ids, tmp_path):
    model_dir = tiny_model_dir(arch)
    gguf = export_gguf(model_dir, tmp_path / f"{arch}.gguf", "F32")
    names = {t.name for t in GGUFReader(gguf).tensors}
    tied = json.loads((model_dir / "config.json").read_text()).get("tie_word_embeddings", True)
    assert ("output.weight" in names) is not tied  # tied: llama.cpp reuses token_embd
    bound = 5e-3 if arch in GELU_FAMILIES else 1e-5
    assert rel_error(llama_logits(gguf, ids), hf_logits(model_dir, ids)) <= bound


@pytest.mark.parametrize("arch,outtype,bound", [("llama", "F16", 1e-2), ("gemma2", "F16", 1e-2),
                                                ("qwen2", "BF16", 5e-2)])
def test_logits_match_half_precision(arch, outtype, bound, tiny_model_dir, ids, tmp_path):
    model_dir = tiny_model_dir(arch)
    gguf = export_gguf(model_dir, tmp_path / f"{arch}-{outtype}.gguf", outtype)
    types = {t.name: t.tensor_type.name for t in GGUFReader(gguf).tensors}
    assert types["blk.0.attn_output.weight"] == outtype and types["blk.0.attn_norm.weight"] == "F32"
    # the default F16 KV cache here: what a user of the file gets
    assert rel_error(llama_logits(gguf, ids, f32_cache=False), hf_logits(model_dir, ids)) <= bound


@pytest.mark.parametrize("arch,overrides", [
    # HF scales gemma attention by query_pre_attn_scalar**-0.5, llama.cpp by head_dim**-0.5
    ("gemma2", {"query_pre_attn_scalar": 32}),
    ("gemma3", {"query_pre_attn_scalar": 32}),
    # Llama 3.x rope scaling: llama.cpp needs the rope_freqs tensor
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0,
                                   "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                   "original_max_position_embeddings": 64}}),
    # Phi-3 long-context rope: factor tensors and the attention factor key
    ("phi3", {"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0,
                                  "long_factor": [1.0 + i / 4 for i in range(8)],
                                  "short_factor": [1.0 + i / 16 for i in range(8)]},
              "original_max_position_embeddings": 256}),
    ("llama", {"tie_word_embeddings": False, "attention_bias": True}),
    # a pruned gemma keeps each layer's attention type, off the family's period: the per-layer
    # sliding_window_pattern array must carry it
    ("gemma2", {"layer_types": ["sliding_attention", "sliding_attention", "full_attention", "full_attention"]}),
    ("gemma3", {"layer_types": ["full_attention", "sliding_attention", "sliding_attention", "full_attention"],
                "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0},
                                    "sliding_attention": {"rope_type": "default", "rope_theta": 500.0}}}),
])
def test_logits_match_variants(arch, overrides, smollm2_tokenizer, ids, tmp_path):
    model_dir = save_tiny(tmp_path, smollm2_tokenizer, arch, **overrides)
    gguf = export_gguf(model_dir, tmp_path / "out.gguf", "F32")
    bound = 5e-3 if arch in GELU_FAMILIES else 1e-5
    assert rel_error(llama_logits(gguf, ids), hf_logits(model_dir, ids)) <= bound


# ---------------------------------------------------------------- tokenizers and metadata
@pytest.mark.slow
def test_smollm2_tokenizer_template_and_logits(smollm2_hf, smollm2_tokenizer, tmp_path):
    import llama_cpp

    gguf = export_gguf(smollm2_hf, tmp_path / "smol-F16.gguf", "F16", {"name": "SmolLM2-135M-Instruct"})
    text = ("Hello wörld! Ça va? 你好，世界。こんにちは Ελληνικά русский العربية हिन्दी 🦙🚀👩‍💻 ✅\n\t"
            "def f(x):\n        return x**2 != 3.14e-5  # ok\n\n  <|im_start|>user\nHi<|im_end|> 1234567890")
    # (not "  1" or "\n 1": llama.cpp's smollm pre-tokenizer keeps a whitespace run before digits
    # whole where transformers splits it; that is llama.cpp's tokenizer, the same with its converter)
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    tok = smollm2_tokenizer
    assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok(text, add_special_tokens=False).input_ids
    assert llm.tokenize(text.encode(), add_bos=False, special=False) == \
        tok(text, add_special_tokens=False, split_special_tokens=True).input_ids
    fields = read_fields(gguf)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "smollm"
    assert fields["tokenizer.chat_template"] == tok.chat_template
    assert fields["tokenizer.ggml.bos_token_id"] == tok.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == tok.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] == (tok("a").input_ids[0] == tok.bos_token_id)
    assert fields["general.name"] == "SmolLM2-135M-Instruct"
    ids = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids[:40])
    assert rel_error(llama_logits(gguf, ids, f32_cache=False), hf_logits(smollm2_hf, ids)) <= 1e-2


def _tiny_spm(tmp_path: Path, with_model_file: bool):
    import io

    import sentencepiece as spm
    from transformers import AutoTokenizer

    lines = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
             "Sphinx of black quartz, judge my vow 123 456.", "Über café naïve résumé, 日本語 テキスト"] * 25
    buf = io.BytesIO()
    # like Llama 2 / Mistral: BPE with byte fallback, whitespace kept as is
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=400,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   remove_extra_whitespaces=False, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
                                   minloglevel=2)
    src = tmp_path / "spm"
    src.mkdir()
    (src / "tokenizer.model").write_bytes(buf.getvalue())
    (src / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False}))
    model_dir = tmp_path / "tiny-spm"
    tiny_model("llama", 2, vocab_size=400).save_pretrained(model_dir)
    if with_model_file:
        for name in ("tokenizer.model", "tokenizer_config.json"):
            shutil.copy(src / name, model_dir / name)
    else:  # only the tokenizer.json transformers writes (byte-fallback BPE)
        AutoTokenizer.from_pretrained(src).save_pretrained(model_dir)
        assert not (model_dir / "tokenizer.model").exists()
    return model_dir, spm.SentencePieceProcessor(model_file=str(src / "tokenizer.model"))


@pytest.mark.parametrize("with_model_file", [True, False], ids=["tokenizer.model", "tokenizer.json"])
def test_sentencepiece_vocab(with_model_file, tmp_path):
    import llama_cpp

    model_dir, sp = _tiny_spm(tmp_path, with_model_file)
    gguf = export_gguf(model_dir, tmp_path / "spm.gguf", "F32")
    fields = read_fields(gguf)
    assert fields["tokenizer.ggml.model"] == "llama"
    assert len(fields["tokenizer.ggml.scores"]) == 400 and fields["tokenizer.ggml.add_bos_token"] is True
    llm = llama_cpp.Llama(model_path=str(gguf), vocab_only=True, verbose=False)
    for text in ("The quick brown fox jumps over the lazy dog.", "Über café  naïve — 日本語 🦙 xyz!",
                 " leading space and  two"):
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == sp.encode(text)
    ids = [1, *sp.encode("The quick brown fox jumps")]
    assert rel_error(llama_logits(gguf, ids), hf_logits(model_dir, ids)) <= 1e-5


# ---------------------------------------------------------------- against llama.cpp's converter
# Every key and tensor (type, shape, bytes) must equal what convert_hf_to_gguf.py (vendored with the
# installed llama-cpp-python) writes, except our provenance keys and these keys only we add:
OUR_OWN_KEYS = ("ollama_compress.",)
OUR_EXTRA_KEYS = {
    "gemma2.attention.sliding_window_pattern": "each layer's attention type, so a pruned gemma keeps it",
    "gemma3.attention.sliding_window_pattern": "each layer's attention type, so a pruned gemma keeps it",
    "gemma2.rope.freq_base": "the config's rope_theta (llama.cpp assumes 10000 without it)",
    "gemma3.rope.local.freq_base": "the local rope base under the name Ollama's own engine reads",
}
SPM_VOCAB = 412


@pytest.fixture(scope="module")
def spm_source(tmp_path_factory) -> Path:
    """A trained SentencePiece tokenizer.model (BPE with byte fallback, like Llama 2 and Gemma)."""
    import io

    import sentencepiece as spm

    lines = ["The quick brown fox jumps over the lazy dog.", "Pack my box with five dozen liquor jugs!",
             "Sphinx of black quartz, judge my vow 123 456.", "Über café naïve résumé, 日本語 テキスト"] * 25
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_writer=buf, vocab_size=SPM_VOCAB - 12,
                                   model_type="bpe", byte_fallback=True, character_coverage=1.0,
                                   user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
                                   unk_id=0, bos_id=1, eos_id=2, pad_id=3, minloglevel=2)
    src = tmp_path_factory.mktemp("spm-source")
    (src / "tokenizer.model").write_bytes(buf.getvalue())
    return src


def _spm_model_dir(tmp_path: Path, spm_source: Path, arch: str, tokenizer_files: str) -> Path:
    """A tiny ``arch`` model (embedding 12 rows wider than the vocabulary) with a SentencePiece tokenizer.

    ``tokenizer_files``: "transformers" = what transformers' save_pretrained writes next to
    tokenizer.model (tokenizer.json lists the added tokens); "added" = a tokenizer_config.json that
    declares added tokens itself (special, special-looking, and plain with a SentencePiece space).
    """
    from transformers import AutoTokenizer

    model_dir = tmp_path / "spm-model"  # general.name comes from it; "phi3" in it would be renamed
    tiny_model(arch, 2, vocab_size=SPM_VOCAB).save_pretrained(model_dir)
    source = tmp_path / "spm-source"
    shutil.copytree(spm_source, source)
    (source / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "GemmaTokenizer" if arch.startswith("gemma") else "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "add_bos_token": True, "add_eos_token": False}))
    AutoTokenizer.from_pretrained(source).save_pretrained(model_dir)
    shutil.copy(source / "tokenizer.model", model_dir / "tokenizer.model")
    if tokenizer_files == "added":
        config = json.loads((model_dir / "tokenizer_config.json").read_text())
        config["added_tokens_decoder"] = {
            "3": {"content": "<pad>", "special": True},
            "4": {"content": "<start_of_turn>", "special": True},
            "5": {"content": "<end_of_turn>", "special": False},
            str(SPM_VOCAB - 12): {"content": "<|tool|>", "special": False},
            str(SPM_VOCAB - 11): {"content": "\u2581hello\u2581world", "special": False},
        }
        (model_dir / "tokenizer_config.json").write_text(json.dumps(config))
    return model_dir


def gguf_contents(path: Path) -> tuple[dict, dict]:
    """(every key but our own -> value, every tensor -> (type, shape, bytes)) of a GGUF file."""
    reader = GGUFReader(path)
    fields = {name: f.contents() for name, f in reader.fields.items()
              if not name.startswith(("GGUF.", *OUR_OWN_KEYS))}
    tensors = {t.name: (t.tensor_type.name, [int(d) for d in t.shape], bytes(np.asarray(t.data).tobytes()))
               for t in reader.tensors}
    return fields, tensors


@pytest.mark.parametrize("arch,tokenizer_files,outtype", [
    *((a, "transformers", "F32") for a in ("llama", "mistral", "qwen3", "gemma2", "gemma3", "phi3")),
    ("qwen2", "transformers", "BF16"), ("llama", "added", "F16"), ("gemma2", "added", "F16"), ("phi3", "added", "F16"),
])
def test_sentencepiece_model_equals_the_converter(arch, tokenizer_files, outtype, spm_source, tmp_path):
    from ollama_compress.gguf.reference import run_converter

    model_dir = _spm_model_dir(tmp_path, spm_source, arch, tokenizer_files)
    ours, ours_tensors = gguf_contents(export_gguf(model_dir, tmp_path / "ours.gguf", outtype))
    theirs, theirs_tensors = gguf_contents(run_converter(model_dir, tmp_path / "converter.gguf", outtype))
    assert sorted(ours.keys() - theirs.keys()) == sorted(k for k in OUR_EXTRA_KEYS if k in ours)
    differing = {k: (ours.get(k), theirs.get(k)) for k in sorted(theirs.keys()) if ours.get(k) != theirs[k]}
    assert {k: str(v)[:300] for k, v in differing.items()} == {}
    assert ours["tokenizer.ggml.model"] == "llama" and len(ours["tokenizer.ggml.tokens"]) == SPM_VOCAB
    assert sorted(ours_tensors) == sorted(theirs_tensors)
    assert [n for n in ours_tensors if ours_tensors[n] != theirs_tensors[n]] == []


def test_provenance_and_general_metadata(tiny_model_dir, tmp_path):
    model_dir = tmp_path / "pruned"
    shutil.copytree(tiny_model_dir("llama"), model_dir)
    (model_dir / "layer_map.json").write_text(json.dumps({"student_to_teacher": [0, 1, 3, 5, 6, 7], "removed": [2, 4],
                                                          "num_layers_before": 8, "metric": "block_influence"}))
    gguf = export_gguf(model_dir, tmp_path / "out" / "m.gguf", "F16",
                       {"name": "tiny-pruned", "license": "apache-2.0", "base_model": "HuggingFaceTB/SmolLM2-135M-Instruct",
                        "recipe": "tiny-recipe", "keep_ratio": 0.75})
    fields = read_fields(gguf)
    assert fields["ollama_compress.removed_layers"] == [2, 4]
    assert fields["ollama_compress.layer_map"] == [0, 1, 3, 5, 6, 7]
    assert fields["ollama_compress.teacher_layers"] == 8
    assert fields["ollama_compress.prune_metric"] == "block_influence"
    assert fields["ollama_compress.recipe"] == "tiny-recipe"
    assert fields["ollama_compress.keep_ratio"] == pytest.approx(0.75)
    assert fields["ollama_compress.source_sha256"] == tree_sha256(model_dir)
    assert fields["general.name"] == "tiny-pruned" and fields["general.license"] == "apache-2.0"
    assert fields["general.base_model.0.name"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert fields["general.architecture"] == "llama" and fields["general.file_type"] == 1  # MOSTLY_F16


# ---------------------------------------------------------------- width warning
def test_width_warnings(tiny_model_dir, tmp_path):
    narrow = width_warnings(tiny_model_dir("llama"))  # rows of 64 and 128 values
    assert narrow and all("not a multiple of 256" in line for line in narrow)
    assert any("Q4_K->Q5_0" in line and "IQ4_NL" in line for line in narrow)
    wide = save_tiny(tmp_path, None, "llama", num_layers=1, hidden_size=256, intermediate_size=512,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=64, vocab_size=256)
    assert width_warnings(wide) == []
    gguf = export_gguf(tiny_model_dir("llama"), tmp_path / "n.gguf", "F16")
    assert width_warnings(gguf) == narrow  # same answer from the GGUF file


# ---------------------------------------------------------------- bad input
def _no_outputs(directory: Path) -> bool:
    return not any(p.suffix == ".gguf" or ".tmp-" in p.name for p in directory.rglob("*"))


@pytest.mark.parametrize("model_type", ["gpt2", "bert"])
def test_unsupported_architecture(model_type, tmp_path):
    from transformers import AutoConfig, AutoModel

    config = AutoConfig.for_model(model_type, n_layer=1, num_hidden_layers=1, n_embd=32, hidden_size=32,
                                  n_head=2, num_attention_heads=2, intermediate_size=64, vocab_size=128)
    model_dir = tmp_path / model_type
    if model_type == "gpt2":
        from transformers import GPT2LMHeadModel

        GPT2LMHeadModel(config).save_pretrained(model_dir)
    else:
        AutoModel.from_config(config).save_pretrained(model_dir)
    with pytest.raises(UserError) as err:
        export_gguf(model_dir, tmp_path / "out" / "x.gguf")
    message = str(err.value)
    assert "\n" not in message and f"'{model_type}'" in message
    assert all(name in message for name in ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"))
    assert _no_outputs(tmp_path)


def test_output_dir_is_a_file(tiny_model_dir, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        export_gguf(tiny_model_dir("llama"), blocker / "m.gguf")
    assert blocker.read_text() == "x" and _no_outputs(tmp_path)


def test_not_enough_disk_space(tiny_model_dir, tmp_path, monkeypatch):
    real = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real(p)._replace(free=1 << 20))
    with pytest.raises(UserError, match="not enough disk space"):
        export_gguf(tiny_model_dir("llama"), tmp_path / "out" / "m.gguf")
    assert _no_outputs(tmp_path)


def test_failure_while_writing_leaves_no_file(tiny_model_dir, tmp_path, monkeypatch):
    real, calls = tensors._read_tensor, []

    def failing(path, name, rows=None):
        calls.append(name)
        if len(calls) == 10:
            raise OSError("disk vanished")
        return real(path, name, rows)

    monkeypatch.setattr(tensors, "_read_tensor", failing)
    with pytest.raises(OSError):
        export_gguf(tiny_model_dir("qwen2"), tmp_path / "out" / "m.gguf")
    assert len(calls) == 10 and _no_outputs(tmp_path)


# ---------------------------------------------------------------- stage hook and CLI
def test_stage_hook_writes_into_out_dir(tiny_model_dir, tmp_path):
    from ollama_compress.context import StageContext
    from ollama_compress.plugins import get_plugin_manager
    from ollama_compress.recipe import validate

    recipe = validate(recipe_dict("HuggingFaceTB/SmolLM2-135M", "tiny-run", export={"outtype": "F16", "quants": ["Q8_0"]}))
    ctx = StageContext(stage="export", recipe=recipe, run_dir=tmp_path, out_dir=tmp_path / "stage")
    ctx.out_dir.mkdir()
    path = get_plugin_manager().hook.export_gguf(ctx=ctx, model_dir=tiny_model_dir("llama"), outtype="F16")
    assert path == ctx.out_dir / "tiny-run-F16.gguf" and path.is_file()
    assert ctx.metrics["size_bytes"] == path.stat().st_size and ctx.metrics["width_warnings"]
    fields = read_fields(path)
    assert fields["ollama_compress.recipe"] == "tiny-run"
    assert fields["general.base_model.0.name"] == "HuggingFaceTB/SmolLM2-135M"


def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    from ollama_compress.cli import main

    with pytest.raises(SystemExit) as done:
        main(args)
    out = capsys.readouterr()
    return done.value.code, out.out, out.err


def test_cli_export_and_quantize(tiny_model_dir, ids, tmp_path, capsys):
    out = tmp_path / "out"
    heldout = tmp_path / "heldout.txt"
    heldout.write_text(TEXT * 3)  # a short text keeps the quality measurement quick
    code, stdout, err = run_cli(["export", str(tiny_model_dir("llama")), "--quant", "Q8_0", "--out", str(out),
                                 "--heldout", str(heldout), "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert Path(result["gguf"]).name.endswith("-F16.gguf") and Path(result["gguf"]).is_file()
    q8 = Path(result["quants"]["Q8_0"])
    assert q8.name == Path(result["gguf"]).name.replace("-F16", "-Q8_0")
    assert [row["name"] for row in json.loads((out / "quants.json").read_text())["quants"]] == ["F16", "Q8_0"]
    # Q8_0 keeps 8 bits per weight: the logits stay within a few percent of the F16 file's
    assert rel_error(llama_logits(q8, ids, f32_cache=False), llama_logits(Path(result["gguf"]), ids, f32_cache=False)) <= 0.05


def test_cli_export_accepts_a_gguf_file(tiny_model_dir, ids, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OLLAMA_COMPRESS_CACHE", str(tmp_path / "cache"))  # where the GGUF is imported
    source = export_gguf(tiny_model_dir("llama"), tmp_path / "tiny-llama.gguf", "F32")
    code, stdout, err = run_cli(["export", str(source), "--out", str(tmp_path / "out"), "--json"], capsys)
    assert code == 0, err
    result = json.loads(stdout)
    assert Path(result["gguf"]) == tmp_path / "out" / "tiny-llama-F16.gguf" and result["width_warnings"]
    assert rel_error(llama_logits(Path(result["gguf"]), ids), llama_logits(source, ids)) <= 1e-2


@pytest.mark.slow
def test_cli_export_accepts_the_embedded_model(smollm2_gguf, tmp_path, capsys):
    code, stdout, err = run_cli(["export", "embedded:smollm2-135m-instruct", "--out", str(tmp_path), "--json"], capsys)
    assert code == 0, err
    path = Path(json.loads(stdout)["gguf"])
    assert path == tmp_path / "smollm2-135m-instruct-F16.gguf"
    fields = read_fields(path)
    assert fields["general.name"] == "smollm2-135m-instruct" and fields["tokenizer.ggml.pre"] == "smollm"


def test_cli_bad_input(tiny_model_dir, tmp_path, capsys):
    model = str(tiny_model_dir("llama"))
    code, _, err = run_cli(["export", model, "--quant", "Q4_K_X", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and "unknown quant 'Q4_K_X'" in err and "Q4_K_M" in err
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run_cli(["export", model, "--out", str(blocker)], capsys)
    assert code == 2 and "is a file" in err
    assert _no_outputs(tmp_path)
