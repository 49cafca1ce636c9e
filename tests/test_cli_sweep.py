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

from gguf_samples import write_small_gguf

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
    prefix = inputs["recipe_bad_key"].as_posix() if case.startswith("validate_bad") else "Error: "  # validate: located errors
    assert len(lines) == 1 and lines[0].startswith(prefix), (case, lines)
    assert "Traceback" not in captured.err
    assert not out.exists() or _files(out) == set(), _files(out)
    assert _files(work) <= {out}, _files(work)
    assert _files(inputs["dir"].parent) == before_inputs
    assert not (tmp_path / "cache").exists() or not [p for p in _files(tmp_path / "cache") if p.is_file()]
