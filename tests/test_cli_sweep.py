"""One sweep of the whole CLI over bad inputs: every command, every kind of argument.

Each case must exit 2 (bad input), print exactly one line on stderr ("Error: ..."), no traceback,
and write nothing anywhere but (at most an empty) --out directory. The commands run in this
process through ``ollama_compress.cli.main``, exactly as the console script does; an uncaught
exception fails the case just as a traceback would.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from ollama_compress.errors import StageFailed, run_as_script
from ollama_compress.fsutil import JOURNAL, MARKER

from gguf_samples import write_llama_gguf, write_small_gguf
from helpers import make_deep_tree, remove_deep_tree

GOOD = """\
recipe_version: 1
name: sweep
source: {{model: {model}}}
prune: {{remove: 1}}
export: {{quants: [Q8_0]}}
"""


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("inputs")
    made = {"dir": root / "adir", "empty_dir": root / "empty"}
    for d in made.values():
        d.mkdir()
    (made["dir"] / "notes.txt").write_text("hello")
    made["small_gguf"] = write_small_gguf(root / "small.gguf")
    made["junk_gguf"] = root / "junk.gguf"
    made["junk_gguf"].write_bytes(b"PK\x03\x04 a zip, not a gguf" * 8)
    made["empty_file"] = root / "empty.gguf"
    made["empty_file"].write_bytes(b"")
    made["text"] = root / "notes.txt"
    made["text"].write_text("not a model\n")
    made["binary_yaml"] = root / "binary.yaml"
    made["binary_yaml"].write_bytes(b"\xff\xfe\x00garbage\x80")
    fake = root / "fake-model"
    fake.mkdir()
    (fake / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    (fake / "model.safetensors").write_bytes(b"\0" * 16)
    made["fake_model"] = fake
    pickle_dir = root / "pickle-model"
    pickle_dir.mkdir()
    (pickle_dir / "config.json").write_text((fake / "config.json").read_text())
    (pickle_dir / "pytorch_model.bin").write_bytes(b"\0" * 16)
    made["pickle_model"] = pickle_dir
    escaping = root / "escaping-model"
    escaping.mkdir()
    (escaping / "config.json").write_text((fake / "config.json").read_text())
    (escaping / "model.safetensors").symlink_to(made["small_gguf"])
    made["escaping_model"] = escaping
    no_config = root / "no-config"
    no_config.mkdir()
    (no_config / "model.safetensors").write_bytes(b"\0")
    made["no_config"] = no_config
    for name, text in {
        "good": GOOD.format(model="/nowhere/model"),
        "junk_source": GOOD.format(model=made["junk_gguf"]),
        "dir_source": GOOD.format(model=made["empty_dir"]),
        "pickle_source": GOOD.format(model=pickle_dir),
        "bad_key": GOOD.format(model=fake) + "colour: red\n",
        "bad_name": GOOD.format(model=fake) + "ollama: {name: 'a b'}\n",
        "bad_quant": GOOD.format(model=fake).replace("Q8_0", "Q9_X"),
        "remote_host": GOOD.format(model=fake) + "ollama: {host: 'http://203.0.113.9:11434'}\n",
        "trust": GOOD.format(model=fake).replace("source: {", "source: {trust_remote_code: true, "),
        "bomb": "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
            f"a{i}: &a{i} [{', '.join([f'*a{i - 1}' if i > 1 else '*a'] * 10)}]\n" for i in range(1, 8)),
        "not_mapping": "- just\n- a list\n",
    }.items():
        made[f"recipe_{name}"] = root / f"{name}.yaml"
        made[f"recipe_{name}"].write_text(text)
    return made


def _model_copy(src: Path, dst: Path, config: dict | None = None, files: dict | None = None) -> Path:
    import shutil

    shutil.copytree(src, dst)
    if config is not None:
        (dst / "config.json").write_text(json.dumps({**json.loads((dst / "config.json").read_text()), **config}))
    for name, content in (files or {}).items():
        (dst / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return dst


def _poisoned(path: Path) -> Path:
    from safetensors.torch import load_file, save_file

    tensors = load_file(path / "model.safetensors")
    tensors["model.layers.1.mlp.down_proj.weight"][0, 0] = float("nan")
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


def _gguf_with(path: Path, skip: tuple = (), nested: bool = False, **keys) -> Path:
    def nested_array(w) -> None:
        w.add_array("general.tags", [["a", "b"], ["c"]])

    return write_llama_gguf(path, skip=skip, metadata=nested_array if nested else None, **keys)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_model_dir):
    """Malformed model files of every kind, each a copy of a good tiny llama (2 layers, SmolLM2 tokenizer)."""
    from tiny_models import tiny_model

    root = tmp_path_factory.mktemp("models")
    good = tiny_model_dir("llama", 2)
    made = {"good_model": good}
    made["more_layers"] = _model_copy(good, root / "more-layers", {"num_hidden_layers": 4})
    made["wider_config"] = _model_copy(good, root / "wider", {"hidden_size": 128})
    made["config_list"] = _model_copy(good, root / "config-list", files={"config.json": "[1, 2]"})
    bad_header = json.dumps({"w": {"dtype": 5, "shape": "2x2", "data_offsets": [0, 16]}}).encode()
    made["bad_header"] = _model_copy(good, root / "bad-header", files={
        "model.safetensors": len(bad_header).to_bytes(8, "little") + bad_header + bytes(16)})
    made["template_not_utf8"] = _model_copy(good, root / "template-latin1", files={"chat_template.jinja": b"\xff{{ x }}"})
    made["template_runaway"] = _model_copy(good, root / "template-runaway", files={
        "chat_template.jinja": "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}"})
    made["card_nested_tags"] = _model_copy(good, root / "card-nested", files={"README.md": "---\ntags: [[a, b]]\n---\n"})
    made["card_python_tag"] = _model_copy(good, root / "card-python", files={
        "README.md": "---\nlicense: !!python/object/apply:os.system ['true']\n---\n"})
    made["nan_weights"] = _poisoned(_model_copy(good, root / "nan-weights"))
    other = root / "layer-map-null"  # another student (seed 1), so only its layer map is wrong
    tiny_model("llama", 2, seed=1).save_pretrained(other)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (other / name).write_bytes((good / name).read_bytes())
    (other / "layer_map.json").write_text("null")
    made["layer_map_null"] = other
    made["mapped_student"] = _model_copy(other, root / "mapped-student", files={
        "layer_map.json": json.dumps({"student_to_teacher": [0, 1], "removed": [], "num_layers_before": 2})})
    tokenizer = json.loads((good / "tokenizer.json").read_text())
    made["deep_tokenizer"] = _model_copy(good, root / "deep-tokenizer", files={
        "tokenizer.json": json.dumps(tokenizer)[:-1] + ', "x": ' + "[" * 100000 + "]" * 100000 + "}"})
    made["fifo_tokenizer"] = _model_copy(good, root / "fifo-tokenizer")
    (made["fifo_tokenizer"] / "tokenizer.json").unlink()
    os.mkfifo(made["fifo_tokenizer"] / "tokenizer.json")
    made["deep_folders"] = _model_copy(good, root / "deep-folders")
    make_deep_tree(made["deep_folders"] / "notes", 1000)
    wide = root / "wide-teacher"
    tiny_model("llama", 2, hidden_size=128, intermediate_size=256).save_pretrained(wide)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (wide / name).write_bytes((good / name).read_bytes())
    made["wide_teacher"] = wide
    made["copy_of_good"] = _model_copy(good, root / "copy-of-good")
    made["head_count_zero"] = _gguf_with(root / "heads0.gguf", attention__head_count=0)
    made["missing_tensor"] = _gguf_with(root / "no-attn-q.gguf", skip=("attn_q",))
    made["nested_array"] = _gguf_with(root / "nested.gguf", nested=True)
    manifest = root / "ollama-models" / "manifests" / "registry.ollama.ai" / "library" / "broken" / "latest"
    manifest.parent.mkdir(parents=True)
    manifest.write_text(json.dumps({"schemaVersion": 2, "layers": ["sha256-00", 7, None]}))
    made["ollama_models"] = root / "ollama-models"
    for name, text in {
        "inf_lr": GOOD.format(model=good) + "heal: {lr: .inf}\n",
        "nan_nested": GOOD.format(model=good) + "heal: {loss: {kl: .nan}}\n",
        "template_source": GOOD.format(model=made["template_not_utf8"]),
        "more_layers_source": GOOD.format(model=made["more_layers"]),
        "manifest_source": GOOD.format(model="ollama:broken"),
    }.items():
        made[f"recipe_{name}"] = root / f"{name}.yaml"
        made[f"recipe_{name}"].write_text(text)
    yield made
    remove_deep_tree(made["deep_folders"] / "notes")  # pytest's own recursive cleanup could not


# Malformed model files (issue 15, item 5): each kind through every command that reads it.
MODEL_CASES = [
    ("analyze_more_layers_than_weights", ["analyze", "{more_layers}", "--out", "{out}"]),
    ("prune_more_layers_than_weights", ["prune", "{more_layers}", "--layers", "1", "--out", "{out}"]),
    ("export_more_layers_than_weights", ["export", "{more_layers}", "--out", "{out}"]),
    ("heal_more_layers_than_weights", ["heal", "{more_layers}", "--teacher", "{good_model}", "--out", "{out}"]),
    ("run_more_layers_than_weights", ["run", "{recipe_more_layers_source}", "--out", "{out}"]),
    ("export_wider_config", ["export", "{wider_config}", "--out", "{out}"]),
    ("analyze_config_list", ["analyze", "{config_list}", "--out", "{out}"]),
    ("export_config_list", ["export", "{config_list}", "--out", "{out}"]),
    ("prune_config_list", ["prune", "{config_list}", "--layers", "1", "--out", "{out}"]),
    ("analyze_safetensors_bad_types", ["analyze", "{bad_header}", "--out", "{out}"]),
    ("export_safetensors_bad_types", ["export", "{bad_header}", "--out", "{out}"]),
    ("prune_safetensors_bad_types", ["prune", "{bad_header}", "--layers", "1", "--out", "{out}"]),
    ("analyze_template_not_utf8", ["analyze", "{template_not_utf8}", "--out", "{out}"]),
    ("run_template_not_utf8", ["run", "{recipe_template_source}", "--out", "{out}"]),
    ("analyze_template_runaway", ["analyze", "{template_runaway}", "--out", "{out}"]),
    ("export_card_nested_tags", ["export", "{card_nested_tags}", "--out", "{out}"]),
    ("export_card_python_tag", ["export", "{card_python_tag}", "--out", "{out}"]),
    ("export_nan_weights", ["export", "{nan_weights}", "--out", "{out}"]),
    ("prune_nan_weights", ["prune", "{nan_weights}", "--layers", "0", "--out", "{out}"]),
    ("export_layer_map_null", ["export", "{layer_map_null}", "--out", "{out}"]),
    ("heal_layer_map_null", ["heal", "{layer_map_null}", "--teacher", "{good_model}", "--out", "{out}"]),
    ("analyze_deep_tokenizer", ["analyze", "{deep_tokenizer}", "--out", "{out}"]),
    ("analyze_fifo_tokenizer", ["analyze", "{fifo_tokenizer}", "--out", "{out}"]),
    ("export_fifo_tokenizer", ["export", "{fifo_tokenizer}", "--out", "{out}"]),
    ("analyze_deep_folders", ["analyze", "{deep_folders}", "--out", "{out}"]),
    ("heal_student_is_teacher", ["heal", "{good_model}", "--teacher", "{good_model}", "--steps", "1",
                                 "--set", "heal.loss={{kl: 1.0}}", "--out", "{out}"]),
    ("heal_student_copy_of_teacher", ["heal", "{copy_of_good}", "--teacher", "{good_model}", "--steps", "1",
                                      "--set", "heal.loss={{kl: 1.0}}", "--out", "{out}"]),
    ("heal_teacher_of_another_width", ["heal", "{mapped_student}", "--teacher", "{wide_teacher}", "--steps", "1",
                                       "--out", "{out}"]),
    ("heal_lr_inf", ["heal", "{more_layers}", "--teacher", "{good_model}", "--lr", "inf", "--out", "{out}"]),
    ("heal_set_nan", ["heal", "{good_model}", "--teacher", "{good_model}", "--set", "heal.lr=.nan", "--out", "{out}"]),
    ("run_recipe_lr_inf", ["run", "{recipe_inf_lr}", "--out", "{out}"]),
    ("run_recipe_nan_in_a_map", ["run", "{recipe_nan_nested}", "--out", "{out}"]),
    ("run_set_lr_inf", ["run", "{recipe_good}", "--set", "heal.lr=.inf", "--out", "{out}"]),
    ("run_set_temperature_nan", ["run", "{recipe_good}", "--set", "heal.temperature=nan", "--out", "{out}"]),
    ("validate_lr_inf", ["validate", "{recipe_inf_lr}"]),
    ("verify_head_count_zero", ["verify", "{head_count_zero}"]),
    ("import_head_count_zero", ["import-gguf", "{head_count_zero}", "--out", "{out}"]),
    ("quantize_head_count_zero", ["quantize", "{head_count_zero}", "-q", "Q8_0", "--out", "{out}"]),
    ("register_head_count_zero", ["register", "{head_count_zero}", "--name", "m", "--template", "chatml"]),
    ("verify_missing_tensor", ["verify", "{missing_tensor}"]),
    ("analyze_missing_tensor", ["analyze", "{missing_tensor}", "--out", "{out}"]),
    ("verify_nested_array", ["verify", "{nested_array}"]),
    ("analyze_manifest_layers_not_objects", ["analyze", "ollama:broken", "--out", "{out}"]),
    ("run_manifest_layers_not_objects", ["run", "{recipe_manifest_source}", "--out", "{out}"]),
]


# (case id, argv with {names} of inputs, or {out}/{file_as_dir} for the output)
CASES = [
    ("no_command", ["nosuch"]),
    ("unknown_option", ["verify", "--bogus"]),
    ("run_missing_argument", ["run"]),
    ("run_missing_recipe", ["run", "missing.yaml", "--out", "{out}"]),
    ("run_dir_as_recipe", ["run", "{dir}", "--out", "{out}"]),
    ("run_binary_recipe", ["run", "{binary_yaml}", "--out", "{out}"]),
    ("run_not_mapping", ["run", "{recipe_not_mapping}", "--out", "{out}"]),
    ("run_bad_key", ["run", "{recipe_bad_key}", "--out", "{out}"]),
    ("run_bad_name", ["run", "{recipe_bad_name}", "--out", "{out}"]),
    ("run_bad_quant", ["run", "{recipe_bad_quant}", "--out", "{out}"]),
    ("run_remote_host", ["run", "{recipe_remote_host}", "--out", "{out}"]),
    ("run_trust_in_recipe", ["run", "{recipe_trust}", "--out", "{out}"]),
    ("run_bomb", ["run", "{recipe_bomb}", "--out", "{out}"]),
    ("run_set_bad_key", ["run", "{recipe_good}", "--set", "prune.remvoe=1", "--out", "{out}"]),
    ("run_set_no_equals", ["run", "{recipe_good}", "--set", "prune.remove", "--out", "{out}"]),
    ("run_set_bad_quant", ["run", "{recipe_good}", "--set", "export.quants=[Q9_X]", "--out", "{out}"]),
    ("run_set_escaping_gguf", ["run", "{recipe_good}", "--set", "source.gguf_file=../../x.gguf", "--out", "{out}"]),
    ("run_set_bad_name", ["run", "{recipe_good}", "--set", "ollama.name=../evil", "--out", "{out}"]),
    ("run_missing_source", ["run", "{recipe_good}", "--out", "{out}"]),
    ("run_junk_gguf_source", ["run", "{recipe_junk_source}", "--out", "{out}"]),
    ("run_dir_source_no_config", ["run", "{recipe_dir_source}", "--out", "{out}"]),
    ("run_pickle_source", ["run", "{recipe_pickle_source}", "--out", "{out}"]),
    ("run_out_is_a_file", ["run", "{recipe_good}", "--out", "{text}"]),
    ("run_dry_bad_key", ["run", "{recipe_bad_key}", "--dry-run"]),
    ("validate_missing", ["validate", "missing.yaml"]),
    ("validate_bad_key", ["validate", "{recipe_bad_key}"]),
    ("recipes_show_missing", ["recipes", "show", "nosuch"]),
    ("import_missing", ["import-gguf", "missing.gguf", "--out", "{out}"]),
    ("import_dir", ["import-gguf", "{dir}", "--out", "{out}"]),
    ("import_junk", ["import-gguf", "{junk_gguf}", "--out", "{out}"]),
    ("import_empty", ["import-gguf", "{empty_file}", "--out", "{out}"]),
    ("import_no_out", ["import-gguf", "{small_gguf}"]),
    ("analyze_missing", ["analyze", "missing-model", "--out", "{out}"]),
    ("analyze_junk", ["analyze", "{junk_gguf}", "--out", "{out}"]),
    ("analyze_no_config", ["analyze", "{no_config}", "--out", "{out}"]),
    ("analyze_hub_offline", ["analyze", "some-org/some-model", "--out", "{out}"]),
    ("analyze_bad_metric", ["analyze", "{fake_model}", "--metric", "nosuch", "--out", "{out}"]),
    ("prune_missing", ["prune", "missing-model", "--remove", "1", "--out", "{out}"]),
    ("prune_no_choice", ["prune", "{fake_model}", "--out", "{out}"]),
    ("prune_bad_layers", ["prune", "{fake_model}", "--layers", "a,b", "--out", "{out}"]),
    ("prune_pickle", ["prune", "{pickle_model}", "--remove", "1", "--out", "{out}"]),
    ("prune_symlink_out", ["prune", "{escaping_model}", "--remove", "1", "--out", "{out}"]),
    ("prune_text_model", ["prune", "{text}", "--remove", "1", "--out", "{out}"]),
    ("export_missing", ["export", "missing-model", "--out", "{out}"]),
    ("export_bad_quant", ["export", "{fake_model}", "--quant", "Q9_X", "--out", "{out}"]),
    ("export_bad_outtype", ["export", "{fake_model}", "--outtype", "F8", "--out", "{out}"]),
    ("export_junk", ["export", "{junk_gguf}", "--out", "{out}"]),
    ("export_pickle", ["export", "{pickle_model}", "--out", "{out}"]),
    ("quantize_missing", ["quantize", "missing.gguf", "-q", "Q8_0", "--out", "{out}"]),
    ("quantize_junk", ["quantize", "{junk_gguf}", "-q", "Q8_0", "--out", "{out}"]),
    ("quantize_dir", ["quantize", "{dir}", "-q", "Q8_0", "--out", "{out}"]),
    ("quantize_bad_quant", ["quantize", "{small_gguf}", "-q", "Q9_X", "--out", "{out}"]),
    ("quantize_lowercase_quant", ["quantize", "{small_gguf}", "-q", "q8_0", "--out", "{out}"]),
    ("quantize_out_is_file", ["quantize", "{small_gguf}", "-q", "Q8_0", "--out", "{text}"]),
    ("verify_missing", ["verify", "missing.gguf"]),
    ("verify_dir", ["verify", "{dir}"]),
    ("verify_junk", ["verify", "{junk_gguf}"]),
    ("verify_empty", ["verify", "{empty_file}"]),
    ("verify_text", ["verify", "{text}"]),
    ("register_bad_name", ["register", "{small_gguf}", "--name", "a b"]),
    ("register_dotdot_name", ["register", "{small_gguf}", "--name", "../x"]),
    ("register_missing", ["register", "missing.gguf", "--name", "m"]),
    ("register_junk", ["register", "{junk_gguf}", "--name", "m"]),
    ("register_text", ["register", "{text}", "--name", "m"]),
    ("register_empty_dir", ["register", "{empty_dir}", "--name", "m"]),
    ("register_bad_family", ["register", "{small_gguf}", "--name", "m", "--template", "nosuch"]),
    ("register_bad_host", ["register", "{small_gguf}", "--name", "m", "--template", "chatml", "--host", "http://x:notaport"]),
]


@pytest.mark.parametrize("case, argv", CASES, ids=[c for c, _ in CASES])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(case, argv, inputs, tmp_path, capfd, monkeypatch):
    _sweep_case(case, argv, inputs, tmp_path, capfd, monkeypatch)


@pytest.mark.parametrize("case, argv", MODEL_CASES, ids=[c for c, _ in MODEL_CASES])
def test_malformed_model_files_are_one_line_exit_2_and_write_nothing(case, argv, inputs, models, tmp_path, capfd,
                                                                     monkeypatch):
    monkeypatch.setenv("OLLAMA_MODELS", str(models["ollama_models"]))
    # export hashes its source while it plans (the hash cache is not an output); nothing else may be cached
    _sweep_case(case, argv, {**inputs, **models}, tmp_path, capfd, monkeypatch, cache_allowed=("fingerprints.json",))


def _sweep_case(case, argv, inputs, tmp_path, capfd, monkeypatch, cache_allowed=()):
    from ollama_compress.cli import main

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setenv("OLLAMA_COMPRESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("OLLAMA_HOST", "127.0.0.1:9")  # nothing listens there: no request leaves
    out = work / "out"
    names = {k: str(v) for k, v in inputs.items()} | {"out": str(out)}
    args = [a.format(**names) for a in argv]
    before_inputs = _files(inputs["dir"].parent)
    with pytest.raises(SystemExit) as info:
        main(args)
    captured = capfd.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert info.value.code == 2, (case, info.value.code, captured.err[-2000:])
    prefix = args[1] if case.startswith(("validate_bad", "validate_lr")) else "Error: "  # validate: located errors
    assert len(lines) == 1 and lines[0].startswith(prefix), (case, lines)
    assert "Traceback" not in captured.err
    assert not out.exists() or _files(out) == set(), _files(out)
    assert _files(work) <= {out}, _files(work)
    assert _files(inputs["dir"].parent) == before_inputs
    cached = [p.name for p in _files(tmp_path / "cache") if p.is_file()] if (tmp_path / "cache").exists() else []
    assert set(cached) <= {*cache_allowed, MARKER, JOURNAL}, cached  # the cache is the tool's own folder


def test_a_setup_script_failure_is_one_line_and_exit_1(capsys):
    """What ``python -m ollama_compress.llama_tools`` / ``.ollama_server`` (.ci/setup) do on failure."""
    def build() -> str:
        raise StageFailed("go is not installed; install Go 1.24")

    with pytest.raises(SystemExit) as info:
        run_as_script("install-ollama", build)
    assert info.value.code == 1
    assert capsys.readouterr() == ("", "install-ollama: go is not installed; install Go 1.24\n")
    run_as_script("llama-tools", lambda: "/cache/llama-quantize")
    assert capsys.readouterr().out == "/cache/llama-quantize\n"
