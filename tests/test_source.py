"""Sources: GGUF import into a clean HF directory, and the bad inputs a source can be."""
from __future__ import annotations

import json

import pytest
import torch

from helpers import assert_clean_error, cli, write_recipe

PROMPT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"


def greedy(model, tokenizer, n=12):
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=n, do_sample=False)
    return tokenizer.decode(out[0, ids.shape[1]:])


@pytest.mark.slow
def test_import_gguf_writes_a_clean_hf_dir_that_generates_like_the_gguf(tmp_path, smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "smol"
    proc = cli("import-gguf", smollm2_gguf, "--out", out)
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= names
    assert not any(n.endswith(".bin") for n in names)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["num_hidden_layers"] == 30
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<|im_start|>" in tokenizer.chat_template

    imported = AutoModelForCausalLM.from_pretrained(out).eval()
    direct = AutoModelForCausalLM.from_pretrained(
        smollm2_gguf.parent, gguf_file=smollm2_gguf.name, dtype=torch.float32).eval()
    direct_tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    text = greedy(imported, tokenizer)
    assert text.strip()
    assert text == greedy(direct, direct_tok)


@pytest.fixture
def bad_gguf_files(tmp_path, smollm2_gguf):
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"PK\x03\x04 this is a zip, not a gguf" * 10)
    truncated = tmp_path / "truncated.gguf"
    with open(smollm2_gguf, "rb") as src:
        truncated.write_bytes(src.read(1 << 20))
    empty = tmp_path / "empty.gguf"
    empty.write_bytes(b"")
    return {"not_gguf": not_gguf, "truncated": truncated, "empty": empty}


@pytest.mark.parametrize("kind", ["not_gguf", "truncated", "empty"])
def test_import_gguf_refuses_bad_files_and_writes_nothing(tmp_path, bad_gguf_files, kind):
    out = tmp_path / "out"
    proc = cli("import-gguf", bad_gguf_files[kind], "--out", out)
    assert_clean_error(proc, str(bad_gguf_files[kind]))
    assert not out.exists()


def test_import_gguf_of_a_missing_file(tmp_path):
    proc = cli("import-gguf", tmp_path / "nope.gguf", "--out", tmp_path / "out")
    assert_clean_error(proc, "does not exist")
    assert not (tmp_path / "out").exists()


def pickle_only_model_dir(tmp_path):
    from tiny_models import tiny_model

    model_dir = tmp_path / "pickled"
    model_dir.mkdir()
    model = tiny_model("llama", 2)
    model.config.save_pretrained(model_dir)
    torch.save(model.state_dict(), model_dir / "pytorch_model.bin")
    return model_dir


def test_pickle_only_weights_need_allow_pickle(tmp_path):
    proc = cli("analyze", pickle_only_model_dir(tmp_path), "--json")
    assert_clean_error(proc, "pickle", "--allow-pickle")


def test_analyze_refuses_a_model_that_is_not_a_causal_lm(tmp_path):
    from transformers import BertConfig, BertModel

    model_dir = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                         vocab_size=100)).save_pretrained(model_dir)
    proc = cli("analyze", model_dir, "--json")
    assert_clean_error(proc, "not a causal language model")


def test_run_on_a_pickle_only_source_exits_2_and_writes_nothing(tmp_path):
    model_dir = pickle_only_model_dir(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", model_dir, "p", export={"quants": ["Q8_0"]})
    proc = cli("run", recipe, "--out", tmp_path / "run")
    assert_clean_error(proc, "pickle")
    assert not (tmp_path / "run").exists()
