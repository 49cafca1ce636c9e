"""Never delete, replace or rename what the tool did not make.

For every command that writes and each of its output options, a folder of the user's (holding
``precious.txt``) survives byte for byte, whatever form the output option takes: that folder, ``.``
inside it, a file, a symlink to it, the folder holding the input, a folder holding files named like
the tool's temporaries, or one that looks like an earlier output (``layer_map.json``, ``run.json``).
Each is refused with one line and exit 2. Cleanup after a killed run removes only what the tool's
journal records, never a file for its name.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from pathlib import Path
from typing import Callable

import pytest

from helpers import dead_pid, write_recipe
from ollama_compress.fsutil import MARKER


def invoke(*args, cwd: Path | None = None) -> tuple[int, str]:
    """``ollama-compress ARGS`` in this process (torch is imported once): (exit code, stderr)."""
    from ollama_compress.cli import main

    err, here = io.StringIO(), os.getcwd()
    os.chdir(cwd or here)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main([str(a) for a in args])
                code = 0
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
    finally:
        os.chdir(here)
    return code, err.getvalue()


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path under ``root`` (symlinks not followed): file bytes, link targets, folders."""
    found: dict[str, bytes | str] = {}
    for parent, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(parent) / name
            rel = str(path.relative_to(root))
            if path.is_symlink():
                found[rel] = "link:" + os.readlink(path)
            elif path.is_file():
                found[rel] = path.read_bytes()
            else:
                found[rel] = "dir"
    return found


def user_area(tmp_path: Path) -> tuple[Path, dict[str, tuple[Path, Path | None]]]:
    """The user's files, and each hostile form of an output option: name -> (--out value, cwd)."""
    user = tmp_path / "user"
    precious = user / "precious"
    precious.mkdir(parents=True)
    (precious / "precious.txt").write_bytes(b"the user's data \x00\xff")
    pid = dead_pid()
    temps = user / "temp-names"
    temps.mkdir()
    (temps / "precious.txt").write_text("mine")
    (temps / f".out.tmp-{pid}").mkdir()
    (temps / f".out.tmp-{pid}" / "thesis.tex").write_text("mine too")
    (temps / f".precious.txt.old-{pid}").write_text("an old version I keep")
    (temps / f".run.json.tmp-{pid}").write_text("{}")
    earlier = user / "looks-like-output"
    earlier.mkdir()
    (earlier / "precious.txt").write_text("mine")
    (earlier / "layer_map.json").write_text(json.dumps({"removed": [1]}))
    (earlier / "run.json").write_text(json.dumps({"recipe": {}, "stages": {}}))
    (earlier / ".stage.json").write_text("{}")
    fake_marker = user / "fake-marker"
    fake_marker.mkdir()
    (fake_marker / "precious.txt").write_text("mine")
    (fake_marker / MARKER).write_text("not json: a user's file of that name")
    (user / "a-file.txt").write_text("not a folder")
    (user / "link").symlink_to(precious)
    forms = {
        "a folder with precious.txt": (precious, None),
        "'.' inside that folder": (Path("."), precious),
        "'..' of an empty folder in it": (Path(".."), _empty(precious / "sub")),
        "a file": (user / "a-file.txt", None),
        "a symlink to the folder": (user / "link", None),
        "a folder with files named like temporaries": (temps, None),
        "a folder that looks like an earlier output": (earlier, None),
        "a folder with a foreign marker-named file": (fake_marker, None),
    }
    return user, forms


def _empty(path: Path) -> Path:
    path.mkdir()
    return path


def assert_refused_and_intact(user: Path, forms: dict, command: Callable[[Path], list]) -> None:
    failures = []
    for label, (out, cwd) in forms.items():
        before = snapshot(user)
        code, err = invoke(*command(out), cwd=cwd)
        if snapshot(user) != before:
            failures.append(f"{label}: the user's files changed")
        if code != 2 or "Traceback" in err or "empty or new folder" not in err:
            failures.append(f"{label}: exit {code}, {err.strip()[-300:]!r}")
    assert not failures, "\n".join(failures)


@pytest.fixture(scope="module")
def model(tiny_model_dir) -> Path:
    return tiny_model_dir("llama", 3)


@pytest.fixture(scope="module")
def small_gguf(tmp_path_factory, model) -> Path:
    """A GGUF with a tokenizer, so that importing it works (the refusals must be the only failure)."""
    out = tmp_path_factory.mktemp("gguf") / "export"
    code, err = invoke("export", model, "--outtype", "F32", "--out", out)
    assert code == 0, err[-3000:]
    return next(out.glob("*-F32.gguf"))


@pytest.fixture(scope="module")
def recipe(tmp_path_factory, model) -> Path:
    return write_recipe(tmp_path_factory.mktemp("recipe") / "never.yaml", model, "never-destroy",
                        data={"calibration": {"samples": 2, "seq_len": 16}}, prune={"layers": [1]})


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, recipe) -> Path:
    out = tmp_path_factory.mktemp("runs") / "run"
    code, err = invoke("run", recipe, "--out", out)
    assert code == 0, err[-3000:]
    return out


# ---------------------------------------------------------------- every writing command, every form
WRITING_COMMANDS = {  # command: (the fixture it reads, its argv with --out OUT)
    "run": ("recipe", lambda recipe, out: ["run", recipe, "--out", out]),
    "prune": ("model", lambda model, out: ["prune", model, "--layers", "1", "--out", out]),
    "export": ("model", lambda model, out: ["export", model, "--outtype", "F32", "--out", out]),
    "quantize": ("small_gguf", lambda gguf, out: ["quantize", gguf, "-q", "Q8_0", "--out", out]),
    "import-gguf": ("small_gguf", lambda gguf, out: ["import-gguf", gguf, "--out", out]),
    "analyze": ("model", lambda model, out: ["analyze", model, "--samples", "2", "--seq-len", "16", "--out", out]),
    "evaluate": ("model", lambda model, out: ["evaluate", model, "--teacher", model, "--no-speed", "--no-knowledge",
                                              "--out", out]),
    "report": ("finished_run", lambda run, out: ["report", run, "--out", out]),
}


@pytest.mark.parametrize("command", list(WRITING_COMMANDS))
def test_out_refuses_what_the_tool_did_not_write(command, tmp_path, request):
    fixture, argv = WRITING_COMMANDS[command]
    given = request.getfixturevalue(fixture)
    user, forms = user_area(tmp_path)
    assert_refused_and_intact(user, forms, lambda out: argv(given, out))


def test_heal_out_and_checkpoints(tmp_path, model):
    user, forms = user_area(tmp_path)
    student = tmp_path / "student"
    code, err = invoke("prune", model, "--layers", "1", "--out", student)
    assert code == 0, err
    heal = ["heal", student, "--teacher", model, "--steps", "1", "--set", "heal.seq_len=16",
            "--set", "heal.batch_size=1"]
    assert_refused_and_intact(user, forms, lambda out: [*heal, "--out", out])
    assert_refused_and_intact(user, forms, lambda out: [*heal, "--out", tmp_path / "healed", "--checkpoints", out])
    assert not (tmp_path / "healed").exists()


# ---------------------------------------------------------------- the input's own folder
def test_import_gguf_into_the_folder_holding_the_gguf_keeps_it(tmp_path, small_gguf):
    folder = tmp_path / "models"
    folder.mkdir()
    gguf = folder / "small-F32.gguf"
    gguf.write_bytes(small_gguf.read_bytes())
    code, err = invoke("import-gguf", gguf, "--out", tmp_path / "fresh")
    assert code == 0, err  # the GGUF itself imports
    for out, cwd in ((folder, None), (Path("."), folder)):
        before = snapshot(tmp_path)
        code, err = invoke("import-gguf", gguf, "--out", out, cwd=cwd)
        assert code == 2 and "empty or new folder" in err, err
        assert snapshot(tmp_path) == before


def test_quantize_and_export_into_the_input_folder_are_refused(tmp_path, small_gguf, model):
    folder = tmp_path / "in"
    folder.mkdir()
    gguf = folder / "small-F32.gguf"
    gguf.write_bytes(small_gguf.read_bytes())
    before = snapshot(tmp_path)
    code, err = invoke("quantize", gguf, "-q", "Q8_0", "--out", folder)
    assert code == 2 and "empty or new folder" in err, err
    assert snapshot(tmp_path) == before
    before = snapshot(model)
    code, err = invoke("export", model, "--outtype", "F32", "--out", model)
    assert code == 2 and "empty or new folder" in err, err
    assert snapshot(model) == before


# ---------------------------------------------------------------- the tool's own outputs stay usable
def test_an_output_the_tool_wrote_is_replaced_by_a_rerun(tmp_path, small_gguf, model):
    out = tmp_path / "imported"
    for _ in range(2):
        code, err = invoke("import-gguf", small_gguf, "--out", out)
        assert code == 0, err
    assert (out / "config.json").is_file() and (out / MARKER).is_file()
    pruned = tmp_path / "pruned"
    for _ in range(2):
        code, err = invoke("prune", model, "--layers", "1", "--out", pruned)
        assert code == 0, err
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = invoke("import-gguf", small_gguf, "--out", empty)
    assert code == 0 and (empty / "config.json").is_file(), err


def test_a_rerun_leaves_files_named_like_temporaries_in_its_run_dir(recipe, finished_run):
    """Files the user put in a run directory, named like the tool's temporaries (of a dead PID),
    are not the tool's: the old cleanup removed or renamed every ``.X.tmp-PID``/``.X.old-PID``."""
    pid = dead_pid()
    planted = {
        finished_run / f".notes.tmp-{pid}": b"mine",
        finished_run / "20-pruned" / f".config.json.tmp-{pid}": b"mine too",
        finished_run / f".thesis.old-{pid}": b"an old draft",  # the old cleanup renamed it to 'thesis'
        finished_run / f".20-pruned.old-{pid}" / "data.bin": b"\x00\x01",
    }
    for path, data in planted.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    code, err = invoke("run", recipe, "--out", finished_run)
    assert code == 0, err[-3000:]
    assert {p: p.read_bytes() for p in planted if p.is_file()} == planted
    assert not (finished_run / "thesis").exists()


def test_recipes_copy_leaves_lookalike_temporaries(tmp_path):
    from ollama_compress.recipe import shipped_recipes

    name = sorted(shipped_recipes())[0]
    pid = dead_pid()
    lookalike = tmp_path / f".{name}.yaml.tmp-{pid}"
    lookalike.write_text("mine")
    code, err = invoke("recipes", "copy", name, tmp_path)
    assert code == 0, err
    assert lookalike.read_text() == "mine" and (tmp_path / f"{name}.yaml").is_file()
    before = snapshot(tmp_path)
    assert invoke("recipes", "copy", name, tmp_path)[0] == 2  # an existing file is never replaced
    assert snapshot(tmp_path) == before


def test_heal_removes_only_the_checkpoint_folder_it_created(tmp_path, model):
    student = tmp_path / "student"
    assert invoke("prune", model, "--layers", "1", "--out", student)[0] == 0
    given = tmp_path / "ckpt"
    given.mkdir()  # an empty folder of the user's: used, then left in place
    heal = ["heal", student, "--teacher", model, "--steps", "2", "--set", "heal.seq_len=16",
            "--set", "heal.batch_size=1", "--set", "heal.checkpoint_every=1"]
    code, err = invoke(*heal, "--out", tmp_path / "healed", "--checkpoints", given)
    assert code == 0, err[-3000:]
    assert given.is_dir() and not [p for p in given.iterdir() if p.name.startswith("step-")]
    code, err = invoke(*heal, "--out", tmp_path / "healed2")
    assert code == 0, err[-3000:]
    assert not (tmp_path / "healed2.checkpoints").exists()  # it made this one: it goes
