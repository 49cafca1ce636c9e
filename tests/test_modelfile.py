"""Modelfile stage: chat family matching, Modelfile text, reading it back, the stage hook."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from chat_templates import ALPACA, BY_FAMILY, LLAMA2, LLAMA3, QWEN25
from helpers import recipe_dict
from ollama_compress.errors import UserError
from ollama_compress.hooks import modelfile as mf

BUILTIN = {"chatml", "qwen2.5", "llama3", "mistral", "phi3", "gemma"}


@pytest.fixture(scope="module")
def smollm2_template(smollm2_gguf) -> str:
    template = mf.read_gguf_chat_template(smollm2_gguf)
    assert template and "<|im_start|>" in template
    return template


def test_builtin_families_registered():
    names = set(mf.family_names())
    assert BUILTIN <= names
    for name in BUILTIN:
        family = mf.chat_family(name)
        assert family.template.strip() and family.stops
        assert '"""' not in family.template
        on_disk = json.loads((Path(mf.__file__).parents[1] / "Modelfiles" / f"{name}.json").read_text())
        assert family.stops == on_disk["stop"]


@pytest.mark.parametrize("family", sorted(BY_FAMILY))
def test_match_family_from_hf_templates(family):
    assert mf.match_family(BY_FAMILY[family]) == family


def test_smollm2_template_is_chatml(smollm2_template):
    assert mf.match_family(smollm2_template) == "chatml"


@pytest.mark.parametrize("template", [LLAMA2, ALPACA, "", None])
def test_no_family_for_foreign_templates(template):
    assert mf.match_family(template) is None


def test_default_system_prompts(smollm2_template):
    assert mf.default_system(smollm2_template) == "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
    assert mf.default_system(QWEN25) == "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
    assert mf.default_system(LLAMA3) is None


def test_modelfile_for_smollm2_reads_template_from_gguf(smollm2_gguf, smollm2_template, tmp_path):
    text = mf.write_modelfile_text(smollm2_gguf, None, parameters={"num_ctx": 2048, "temperature": 0.2})
    assert f"FROM {Path(smollm2_gguf).resolve()}\n" in text
    assert 'PARAMETER stop "<|im_end|>"' in text
    path = tmp_path / "Modelfile"
    path.write_text(text)
    spec = mf.parse_modelfile(path)
    chatml = mf.chat_family("chatml")
    assert spec.from_path == Path(smollm2_gguf).resolve()
    assert spec.template == chatml.template
    assert spec.system == mf.default_system(smollm2_template)
    assert spec.parameters == {"stop": chatml.stops, "num_ctx": 2048, "temperature": 0.2}


def test_parameters_system_and_extra_stops(smollm2_gguf, tmp_path):
    path = mf.write_modelfile(
        smollm2_gguf, tmp_path / "Modelfile.Q4_1", QWEN25,
        system="Answer in one word.\nNo more.", parameters={"stop": ["###"], "top_k": 20, "seed": 7},
    )
    spec = mf.parse_modelfile(path)
    assert spec.template == mf.chat_family("qwen2.5").template
    assert spec.system == "Answer in one word.\nNo more."
    assert spec.parameters["stop"] == [*mf.chat_family("qwen2.5").stops, "###"]
    assert spec.parameters["top_k"] == 20 and spec.parameters["seed"] == 7
    assert [p.name for p in tmp_path.iterdir()] == ["Modelfile.Q4_1"]


def test_explicit_family_wins_over_matching(smollm2_gguf):
    text = mf.write_modelfile_text(smollm2_gguf, QWEN25, family="llama3")
    assert "<|start_header_id|>" in text and "<|im_start|>" not in text.split("PARAMETER")[0]


def test_no_family_is_a_user_error_listing_families(smollm2_gguf, tmp_path):
    out = tmp_path / "Modelfile.Q4_1"
    with pytest.raises(UserError) as err:
        mf.write_modelfile(smollm2_gguf, out, ALPACA)
    message = str(err.value)
    assert "ollama.template" in message and "\n" not in message
    for name in BUILTIN:
        assert name in message
    assert list(tmp_path.iterdir()) == []


def test_unknown_family_and_bad_values(smollm2_gguf):
    with pytest.raises(UserError, match="unknown chat template family 'vicuna'.*chatml"):
        mf.write_modelfile_text(smollm2_gguf, None, family="vicuna")
    with pytest.raises(UserError, match='"""'):
        mf.write_modelfile_text(smollm2_gguf, None, system='say """hi"""')
    with pytest.raises(UserError, match="parameter name"):
        mf.write_modelfile_text(smollm2_gguf, None, parameters={"Num Ctx": 1})


def test_read_hf_chat_template_variants(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3}))
    assert mf.read_hf_chat_template(tmp_path / "a") == LLAMA3
    (tmp_path / "b").mkdir()
    named = [{"name": "tool_use", "template": QWEN25}, {"name": "default", "template": LLAMA3}]
    (tmp_path / "b" / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert mf.read_hf_chat_template(tmp_path / "b") == LLAMA3
    (tmp_path / "b" / "chat_template.jinja").write_text(QWEN25)
    assert mf.read_hf_chat_template(tmp_path / "b") == QWEN25
    (tmp_path / "c").mkdir()
    assert mf.read_hf_chat_template(tmp_path / "c") is None


@pytest.mark.parametrize(
    "text, expected",
    [
        ("TEMPLATE x\n", "no FROM"),
        ("FROM a.gguf\nADAPTER b.gguf\n", "ADAPTER is not supported"),
        ('FROM a.gguf\nTEMPLATE """never closed\n', "never closes"),
    ],
)
def test_parse_modelfile_rejects_what_it_cannot_register(tmp_path, text, expected):
    path = tmp_path / "Modelfile"
    path.write_text(text)
    with pytest.raises(UserError, match=expected):
        mf.parse_modelfile(path)


def test_relative_from_is_resolved_against_the_modelfile(tmp_path):
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "Modelfile"
    path.write_text('# comment\nFROM ../model.gguf\nPARAMETER stop "<|end|>"\nPARAMETER num_ctx 4096\n')
    spec = mf.parse_modelfile(path)
    assert spec.from_path == (tmp_path / "model.gguf").resolve()
    assert spec.parameters == {"stop": ["<|end|>"], "num_ctx": 4096}


def test_stage_hook_writes_one_modelfile_per_quant(smollm2_gguf, tmp_path):
    from ollama_compress.context import StageContext
    from ollama_compress.plugins import get_plugin_manager
    from ollama_compress.recipe import validate

    recipe = validate(recipe_dict(smollm2_gguf, "t", ollama={"system": "Be brief.", "parameters": {"num_ctx": 1024}}))
    model_dir = tmp_path / "hf"
    model_dir.mkdir()
    (model_dir / "tokenizer_config.json").write_text(json.dumps({"chat_template": LLAMA3}))
    ctx = StageContext(stage="ollama", recipe=recipe, run_dir=tmp_path, out_dir=tmp_path / "out")
    ctx.out_dir.mkdir()
    out = get_plugin_manager().hook.write_modelfile(ctx=ctx, gguf_path=smollm2_gguf, quant="Q4_1", model_dir=model_dir)
    assert out == ctx.out_dir / "Modelfile.Q4_1"
    spec = mf.parse_modelfile(out)
    assert spec.template == mf.chat_family("llama3").template
    assert spec.system == "Be brief." and spec.parameters["num_ctx"] == 1024
    assert ctx.metrics["modelfiles"]["Q4_1"]["family"] == "llama3"
