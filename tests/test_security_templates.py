"""Chat templates from strangers: sandboxed, checked before they reach a Modelfile, a GGUF or an
imported model; Modelfile text can't break out of its triple quotes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat_templates import ALPACA, BY_FAMILY, LLAMA2
from helpers import assert_clean_error, cli
from ollama_compress.errors import UserError
from ollama_compress.hooks import modelfile as mf
from ollama_compress.templates import check_chat_template, render_chat_template

EXAMPLES = int(os.environ.get("OLLAMA_COMPRESS_FUZZ_EXAMPLES", "150"))
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]

# Server-side template injection payloads (Jinja): each leads to Python objects and then to os.
PAYLOADS = {
    "self_globals": "{{ self.__init__.__globals__ }}",
    "lipsum_os": "{{ lipsum.__globals__['os'].popen('id').read() }}",
    "cycler_os": "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
    "joiner": "{{ joiner.__init__ }}",
    "mro_subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "attr_filter": "{{ messages|attr('__class__') }}",
    "attr_built": "{% set n = '_' ~ '_class' ~ '__' %}{{ messages|attr(n) }}",
    "item_dunder": "{{ messages['__class__'] }}",
    "concat_dunder": "{% set k = '__cl' + 'ass__' %}{{ messages[k] }}",
    "private_attr": "{{ messages._private }}",
    "namespace_init": "{% set ns = namespace(a=1) %}{{ ns.__init__ }}",
    "config": "{{ config.items() }}",
    "request": "{{ request.environ }}",
    "include": "{% include 'secrets.txt' %}",
    "import": "{% import 'macros.j2' as m %}{{ m }}",
    "extends": "{% extends 'base.j2' %}",
    "nul": "{{ messages }}\0",
    "huge": "{{ messages }}" + " " * (300 * 1024),
}


@pytest.mark.parametrize("name", sorted(PAYLOADS))
def test_hostile_templates_are_refused(name):
    with pytest.raises(UserError, match="chat template refused") as info:
        check_chat_template(PAYLOADS[name])
    assert "\n" not in str(info.value)


def test_broken_jinja_is_a_user_error():
    with pytest.raises(UserError, match="not valid Jinja"):
        check_chat_template("{% for m in messages %}{{ m }}")


@pytest.mark.parametrize("name, template", [*sorted(BY_FAMILY.items()), ("alpaca", ALPACA), ("llama2", LLAMA2)])
def test_real_templates_pass_and_render_in_the_sandbox(name, template):
    check_chat_template(template)
    text = render_chat_template(template, MESSAGES, add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert "Hi" in text


def test_transformers_generation_tag_is_understood():
    template = "{% for m in messages %}{% generation %}{{ m.content }}{% endgeneration %}{% endfor %}"
    check_chat_template(template)
    assert render_chat_template(template, MESSAGES) == "Be brief.Hi"


def test_what_the_static_check_cannot_see_the_sandbox_stops():
    dunder_from_data = [{"role": "user", "content": "__class__"}]
    shown = "{% for m in messages %}[{{ messages[m.content] }}]{% endfor %}"
    check_chat_template(shown)  # no dunder in the template itself, only in the data it is given
    assert render_chat_template(shown, dunder_from_data) == "[]"  # never "<class 'list'>"
    called = "{% for m in messages %}{{ messages[m.content]() }}{% endfor %}"
    check_chat_template(called)
    with pytest.raises(UserError, match="sandbox stopped it"):
        render_chat_template(called, dunder_from_data)


@pytest.mark.slow
def test_smollm2_template_passes(smollm2_gguf):
    template = mf.read_gguf_chat_template(smollm2_gguf)
    assert isinstance(template, str) and "<|im_start|>" in template  # SmolLM2's ChatML template was read
    check_chat_template(template)


# ---------------------------------------------------------------- where templates enter
def write_gguf_with_template(path: Path, template: str) -> Path:
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(1)
    w.add_chat_template(template)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(32, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_gguf_import_refuses_a_hostile_template_before_anything_is_written(tmp_path):
    from ollama_compress.hooks.source import check_gguf

    evil = write_gguf_with_template(tmp_path / "evil.gguf", PAYLOADS["lipsum_os"])
    with pytest.raises(UserError, match="chat template refused"):
        check_gguf(evil)
    out = tmp_path / "out"
    proc = cli("import-gguf", evil, "--out", out)
    assert_clean_error(proc, "chat template refused")
    assert not out.exists()


def test_hf_directory_source_refuses_a_hostile_template(tmp_path):
    from ollama_compress.hooks.source import check_hf_chat_template

    model = tmp_path / "m"
    model.mkdir()
    (model / "tokenizer_config.json").write_text(json.dumps({"chat_template": PAYLOADS["cycler_os"]}))
    with pytest.raises(UserError, match="chat template refused"):
        check_hf_chat_template(model)
    (model / "chat_template.jinja").write_text(PAYLOADS["self_globals"])
    with pytest.raises(UserError, match="chat template refused"):
        check_hf_chat_template(model)


def test_modelfile_is_not_written_for_a_hostile_template(tmp_path):
    gguf = write_gguf_with_template(tmp_path / "m.gguf", PAYLOADS["mro_subclasses"])
    out = tmp_path / "Modelfile.Q8_0"
    with pytest.raises(UserError, match="chat template refused"):
        mf.write_modelfile(gguf, out, None)
    with pytest.raises(UserError, match="chat template refused"):
        mf.write_modelfile(gguf, out, PAYLOADS["attr_filter"], family="chatml")
    assert not out.exists()


# ---------------------------------------------------------------- Modelfile quoting
@pytest.mark.parametrize("system", [
    'hi"""\nFROM /etc/passwd\nSYSTEM """owned',
    'ends with a quote"',
    "nul\0byte",
])
def test_system_text_cannot_break_out_of_its_block(tmp_path, system):
    gguf = write_gguf_with_template(tmp_path / "m.gguf", BY_FAMILY["llama3"])
    with pytest.raises(UserError, match="Modelfile"):
        mf.write_modelfile(gguf, tmp_path / "Modelfile", None, system=system)
    assert not (tmp_path / "Modelfile").exists()


@pytest.mark.parametrize("value", ["a\nSYSTEM evil", 'a"b', "a\rb"])
def test_parameter_values_cannot_add_lines(tmp_path, value):
    gguf = write_gguf_with_template(tmp_path / "m.gguf", BY_FAMILY["llama3"])
    with pytest.raises(UserError, match="may not contain"):
        mf.write_modelfile_text(gguf, None, parameters={"stop": [value]})


def test_a_gguf_path_with_a_line_break_cannot_add_lines(tmp_path):
    folder = tmp_path / "x\nSYSTEM owned"
    folder.mkdir()
    gguf = write_gguf_with_template(folder / "m.gguf", BY_FAMILY["llama3"])
    with pytest.raises(UserError, match="line break"):
        mf.write_modelfile_text(gguf, None)


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          derandomize="OLLAMA_COMPRESS_FUZZ_EXAMPLES" not in os.environ,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(system=st.text(alphabet=st.sampled_from(['"', "\n", "a", " ", "#", "F", "R", "O", "M", "\\", "'"]),
                      max_size=24),
       stop=st.text(alphabet=st.sampled_from(['"', "\n", "a", "<", "|", " "]), max_size=8))
def test_accepted_modelfile_text_reads_back_exactly(tmp_path, system, stop):
    """Whatever system prompt and stop string are accepted come back unchanged, and nothing else
    (no extra instruction) comes back: the text stayed inside its quotes."""
    gguf = tmp_path / "m.gguf"
    if not gguf.exists():
        write_gguf_with_template(gguf, BY_FAMILY["llama3"])
    try:
        text = mf.write_modelfile_text(gguf, None, system=system or None, parameters={"stop": [stop]} if stop else None)
    except UserError:
        return
    path = tmp_path / "Modelfile"
    path.write_text(text, encoding="utf-8")
    spec = mf.parse_modelfile(path)
    assert spec.from_path == gguf.resolve()
    assert spec.template == mf.chat_family("llama3").template
    assert spec.system == (system or None)
    expected_stops = list(dict.fromkeys([*mf.chat_family("llama3").stops, *([stop] if stop else [])]))
    assert spec.parameters.get("stop") == expected_stops
    assert set(spec.parameters) == {"stop"}
