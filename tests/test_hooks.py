"""Every hook a plugin can implement reaches it: an observer plugin, registered in this process,
records each call and adds one capability of each kind, then a tiny run and the lookups use them.
(``test_meta.py`` checks that each hookspec is exercised by some test; these are those tests.)"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from ollama_compress import plugins
from ollama_compress.hookspecs import hookimpl

LONG_TEXT = " ".join(f"Line {i} of the observer's own text, about boats, bread and numbers." for i in range(400))


class Observer:
    """Implements every stage hook as a recorder that returns None (so the built-ins still run),
    and registers a source scheme, a data source, a chat family and a command."""

    def __init__(self, template_path: Path) -> None:
        self.calls: list[str] = []
        self.template_path = template_path

    @hookimpl
    def register_sources(self, register):
        self.calls.append("register_sources")
        register("octest", lambda rest, options: Path(rest), "a local path, through the observer")

    @hookimpl
    def register_data_sources(self, register):
        self.calls.append("register_data_sources")
        register("oc_text", lambda spec, tokenizer=None, ctx=None: [LONG_TEXT], "the observer's text")

    @hookimpl
    def register_chat_templates(self, register):
        self.calls.append("register_chat_templates")
        register("oc-chat", lambda template: "oc-chat-marker" in template, "the observer's family",
                 template_path=str(self.template_path), stops=["<oc-end>"])

    @hookimpl
    def register_commands(self, cli):
        self.calls.append("register_commands")

        @cli.command("oc-hello")
        def hello():
            print("hello from the observer")

    @hookimpl
    def load_source(self, ctx):
        self.calls.append("load_source")

    @hookimpl
    def score_layers(self, ctx, model_dir):
        self.calls.append("score_layers")

    @hookimpl
    def prune_layers(self, ctx, model_dir, scores):
        self.calls.append("prune_layers")

    @hookimpl
    def heal(self, ctx, student_dir, teacher_dir):
        self.calls.append("heal")

    @hookimpl
    def export_gguf(self, ctx, model_dir, outtype):
        self.calls.append("export_gguf")

    @hookimpl
    def quantize_gguf(self, ctx, gguf_path, quant):
        self.calls.append("quantize_gguf")


@pytest.fixture
def observer(tmp_path):
    template = tmp_path / "oc-chat.tmpl"
    template.write_text("{{ .Prompt }}<oc-end>")
    seen = Observer(template)
    plugins.register_plugin(seen, name="test-observer")
    try:
        yield seen
    finally:
        plugins.get_plugin_manager().unregister(name="test-observer")
        plugins.reset()


def test_a_run_calls_every_stage_hook_and_uses_the_registered_source_and_text(observer, tiny_model_dir,
                                                                                 recipe_file, tmp_path):
    from ollama_compress.pipeline import run

    recipe = recipe_file(f"octest:{tiny_model_dir('llama', 4)}", "observed",
                         data={"calibration": {"samples": 2, "seq_len": 32},
                               "heldout": {"split": "heldout", "samples": 2, "seq_len": 32},
                               "heal": {"from": "oc_text"}},
                         prune={"remove": 1}, heal={"steps": 1, "batch_size": 1, "seq_len": 32},
                         export={"outtype": "F32", "quants": ["Q8_0"]})
    lock = run(str(recipe), out=tmp_path / "run")
    assert [lock["stages"][s]["status"] for s in ("source", "importance", "prune", "heal", "export")] == ["done"] * 5
    stage_hooks = ["load_source", "score_layers", "prune_layers", "heal", "export_gguf", "quantize_gguf"]
    # load_source first answers where the source is (for the stage cache), then loads it
    assert [c for c in observer.calls if c in stage_hooks] == ["load_source", *stage_hooks]
    assert "register_sources" in observer.calls and "register_data_sources" in observer.calls
    healed = json.loads((tmp_path / "run" / "30-healed" / "model" / "heal.json").read_text())
    assert healed["heal_tokens"] > 1000  # trained on the observer's text, not the default corpus


def test_a_registered_chat_family_is_found_by_name(observer):
    from ollama_compress.hooks.modelfile import chat_family, match_family

    assert match_family("{{ bos }}oc-chat-marker{% for m in messages %}<|im_start|>{% endfor %}") == "oc-chat"
    family = chat_family("oc-chat")
    assert family.stops == ["<oc-end>"] and family.template == "{{ .Prompt }}<oc-end>"
    assert observer.calls.count("register_chat_templates") == 1  # looked up once, then cached


def test_a_registered_command_runs(observer, capsys):
    from ollama_compress.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["oc-hello"])
    assert exit_.value.code == 0
    assert "hello from the observer" in capsys.readouterr().out
    assert "register_commands" in observer.calls
