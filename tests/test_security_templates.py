"""Chat templates from strangers: sandboxed, checked before they reach a Modelfile, a GGUF or an
imported model; Modelfile text can't break out of its triple quotes."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chat_templates import ALPACA, BY_FAMILY, LLAMA2
from gguf_samples import write_llama_gguf
from helpers import assert_clean_error, cli, make_deep_tree, remove_deep_tree
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
    return write_llama_gguf(path, metadata=lambda w: w.add_chat_template(template))


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


# ---------------------------------------------------------------- rendering never hangs or floods
RUNAWAY = {
    "nested_loops": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
    "nested_loops_from_the_issue": "{% for a in range(10**9) %}{% for b in range(10**9) %}{% endfor %}{% endfor %}",
    "nested_loops_over_a_set_list": "{% set r = range(100000)|list %}{% for a in r %}{% for b in r %}"
                                    "{% endfor %}{% endfor %}",
    "big_string": "{{ 'x' * 10**10 }}",
    "big_power": "{{ 10 ** (10 ** 9) }}",
    "flood": "{% for a in range(100000) %}{% for b in range(1000) %}xxxxxxxxxx{% endfor %}{% endfor %}",
    "recursive_macro": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
}


@pytest.mark.parametrize("name", sorted(RUNAWAY))
def test_runaway_templates_stop_within_the_limits(name, tmp_path):
    """In a child process with its own deadline, so a hang fails the test instead of stalling it."""
    import subprocess
    import sys

    script = ("import sys, time\n"
              "from ollama_compress.errors import UserError\n"
              "from ollama_compress.templates import render_chat_template\n"
              "start = time.monotonic()\n"
              f"try:\n    render_chat_template({RUNAWAY[name]!r}, [{{'role': 'user', 'content': 'hi'}}])\n"
              "except UserError as exc:\n    print('REFUSED', round(time.monotonic() - start, 1), exc)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=90)
    assert done.stdout.startswith("REFUSED"), (done.stdout, done.stderr[-2000:])
    assert "chat template" in done.stdout and done.stdout.count("\n") == 1


def test_real_templates_render_the_same_in_the_bounded_renderer():
    template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}{% if add_generation_prompt %}<a>{% endif %}"
    assert render_chat_template(template, MESSAGES, add_generation_prompt=True) == "<system>Be brief.<user>Hi<a>"


def test_a_model_whose_template_runs_away_is_refused_before_the_tokenizer_is_used(tiny_model_dir, tmp_path):
    import shutil

    from ollama_compress.modelio import load_tokenizer

    path = shutil.copytree(tiny_model_dir("llama", 2), tmp_path / "m")
    (path / "chat_template.jinja").write_text(RUNAWAY["nested_loops"])
    with pytest.raises(UserError, match="did not finish rendering|chat template refused"):
        load_tokenizer(path)
    (path / "chat_template.jinja").write_bytes(b"{{ messages }}\xff\xfe")
    with pytest.raises(UserError, match="chat_template.jinja is not UTF-8"):
        load_tokenizer(path)
    with pytest.raises(UserError, match="chat_template.jinja is not UTF-8"):
        mf.read_hf_chat_template(path)
    (path / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    assert load_tokenizer(path).apply_chat_template(MESSAGES, tokenize=False) == "Be brief.Hi"


# ---------------------------------------------------------------- input files are read boundedly
def test_fifos_devices_and_huge_files_are_refused_before_reading(tmp_path):
    from ollama_compress.safe_read import read_json, read_text

    fifo = tmp_path / "config.json"
    os.mkfifo(fifo)
    with pytest.raises(UserError, match="not a regular file"):
        read_json(fifo, "config")  # a plain open() would block here forever
    with pytest.raises(UserError, match="not a regular file"):
        read_text("/dev/zero", "data")
    big = tmp_path / "tokenizer.json"
    with open(big, "wb") as f:
        f.truncate(3 << 30)  # sparse: 3 GiB claimed, nothing on disk
    with pytest.raises(UserError, match="more than a tokenizer file may be"):
        read_text(big, "tokenizer")


def test_a_tokenizer_file_that_is_a_fifo_is_one_line_not_a_hang(tiny_model_dir, tmp_path):
    """In a child process with a deadline: the tokenizers library would block on the FIFO forever."""
    import shutil
    import subprocess
    import sys

    path = shutil.copytree(tiny_model_dir("llama", 2), tmp_path / "m")
    (path / "tokenizer.json").unlink()
    os.mkfifo(path / "tokenizer.json")
    script = ("from ollama_compress.errors import UserError\n"
              "from ollama_compress.modelio import load_tokenizer\n"
              f"try:\n    load_tokenizer({str(path)!r})\n"
              "except UserError as exc:\n    print('REFUSED', exc)\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.stdout.startswith("REFUSED") and "not a regular file" in done.stdout, (done.stdout, done.stderr[-2000:])


def test_deep_json_and_deep_folders_are_one_line(tiny_model_dir, tmp_path):
    import shutil

    from ollama_compress.modelio import check_model_dir, load_tokenizer, read_config
    from ollama_compress.safe_read import parse_json

    with pytest.raises(UserError, match="nests deeper than"):
        parse_json("[" * 100000 + "]" * 100000, "deep.json")
    assert parse_json('{"a": ["[[[[", {"b": "]]"}]}', "ok.json") == {"a": ["[[[[", {"b": "]]"}]}
    path = shutil.copytree(tiny_model_dir("llama", 2), tmp_path / "m")
    tokenizer = json.loads((path / "tokenizer.json").read_text())
    deep = '{"x": ' * 100000 + "1" + "}" * 100000
    (path / "tokenizer.json").write_text(json.dumps(tokenizer)[:-1] + ', "extra": ' + deep + "}")
    with pytest.raises(UserError, match="tokenizer.json nests deeper than"):
        load_tokenizer(path)
    (path / "tokenizer.json").write_text(json.dumps(tokenizer))
    make_deep_tree(path / "notes", 1000)
    try:
        with pytest.raises(UserError, match="nested more than"):
            check_model_dir(path)
    finally:
        remove_deep_tree(path / "notes")
    assert check_model_dir(path) == path and read_config(path)["num_hidden_layers"] == 2
