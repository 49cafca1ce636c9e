"""Paths stay inside their root; leftovers of killed writers are cleaned; a full disk is one line."""
from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import dead_pid, recipe_dict
from ollama_compress.errors import UserError
from ollama_compress.fsutil import (JOURNAL, MARKER, atomic_path, claim_output_dir, clean_journal, remove_made,
                                   resolve_inside)


# ---------------------------------------------------------------- resolve_inside
@pytest.mark.parametrize("relative", ["a", "a/b.gguf", "./a", "a/./b"])
def test_plain_relative_paths_resolve_inside(tmp_path, relative):
    assert tmp_path.resolve() in resolve_inside(tmp_path, relative, "x").parents


@pytest.mark.parametrize("relative, words", [
    ("../x", "'..'"),
    ("a/../../x", "'..'"),
    ("..", "'..'"),
    ("/etc/passwd", "absolute"),
    ("~/x", "absolute"),
    ("a\0b", "NUL"),
])
def test_escapes_are_refused(tmp_path, relative, words):
    with pytest.raises(UserError, match=words):
        resolve_inside(tmp_path, relative, "output")


def test_symlink_leading_out_is_refused_and_one_inside_is_not(tmp_path):
    root, outside = tmp_path / "run", tmp_path / "elsewhere"
    root.mkdir(), outside.mkdir()
    (root / "out").symlink_to(outside)
    (root / "real").mkdir()
    (root / "alias").symlink_to(root / "real")
    with pytest.raises(UserError, match="leads out of"):
        resolve_inside(root, "out/file.gguf", "output")
    assert resolve_inside(root, "alias/file.gguf", "output") == (root / "real" / "file.gguf").resolve()


# ---------------------------------------------------------------- leftovers of killed writers
KILLED_WRITER = """
import os, sys
from pathlib import Path
from ollama_compress import fsutil
root = Path(sys.argv[1])
writers = [fsutil.atomic_path(root / "40-gguf", is_dir=True), fsutil.atomic_path(root / "20-pruned" / "config.json")]
stage, inner = (writer.__enter__() for writer in writers)  # still open when the process dies
(stage / "big.gguf").write_bytes(b"x" * 1000)
inner.write_text("{")
real_replace = os.replace
def replace_then_die(src, dst):  # killed between the two renames of a swap
    real_replace(src, dst)
    os._exit(9)
os.replace = replace_then_die
with fsutil.atomic_path(root / "30-healed", is_dir=True) as tmp:
    (tmp / "new").write_text("new")
"""


def killed_writer(root: Path) -> None:
    done = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(root)], capture_output=True, text=True)
    assert done.returncode == 9, done.stderr


def test_a_killed_writers_journaled_temporaries_go_and_an_interrupted_swap_is_undone(tmp_path):
    root = claim_output_dir(tmp_path / "run")
    with atomic_path(root / "20-pruned", is_dir=True) as tmp:
        (tmp / "weights").write_text("w")
    with atomic_path(root / "30-healed", is_dir=True) as tmp:
        (tmp / "old").write_text("previous")
    killed_writer(root)
    leftovers = [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert len(leftovers) >= 3 and not (root / "30-healed").exists()

    removed = clean_journal(root)

    assert (root / "30-healed" / "old").read_text() == "previous"  # the previous version came back
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert len(removed) == 3 and (root / "20-pruned" / "weights").read_text() == "w"  # the new 30-healed too


def test_cleanup_never_touches_lookalikes_or_a_live_writers_temporaries(tmp_path):
    root = claim_output_dir(tmp_path / "run")
    pid = dead_pid()
    lookalikes = [root / f".40-gguf.tmp-{pid}", root / f".notes.old-{pid}", root / "sub" / f".x.tmp-{pid}-00ab"]
    for path in lookalikes:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("the user's")
    with atomic_path(root / "50-ollama", is_dir=True) as live:
        assert clean_journal(root) == []
        assert live.is_dir()
    assert all(p.read_text() == "the user's" for p in lookalikes) and not (root / "notes").exists()


def test_a_poisoned_journal_removes_nothing_outside_its_temporaries(tmp_path):
    root = claim_output_dir(tmp_path / "run")
    outside = tmp_path / "precious.txt"
    outside.write_text("mine")
    inside = root / "model.safetensors"
    inside.write_text("weights")
    (root / "link").symlink_to(tmp_path)
    entries = [{"op": "add", "path": rel, "pid": dead_pid()}
               for rel in ("../precious.txt", str(outside), "model.safetensors", "link/precious.txt", "link")]
    (root / JOURNAL).write_text("".join(json.dumps(e) + "\n" for e in entries) + "not json\n")
    assert clean_journal(root) == []
    assert outside.read_text() == "mine" and inside.read_text() == "weights" and (root / "link").is_symlink()


@pytest.mark.parametrize("is_dir", [False, True])
def test_atomic_path_never_replaces_what_the_tool_did_not_make(tmp_path, is_dir):
    final = tmp_path / "mine"
    if is_dir:
        final.mkdir()
        (final / "precious.txt").write_text("mine")
    else:
        final.write_text("mine")
    with pytest.raises(UserError, match="not written by ollama-compress"):
        with atomic_path(final, is_dir=is_dir) as tmp:
            (tmp / "x").write_text("new") if is_dir else tmp.write_text("new")
    assert (final / "precious.txt" if is_dir else final).read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_output_folders_are_claimed_only_when_empty_or_marked(tmp_path):
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "precious.txt").write_text("mine")
    with pytest.raises(UserError, match="empty or new folder"):
        claim_output_dir(tmp_path / "user")
    made = claim_output_dir(tmp_path / "new" / "out")
    assert json.loads((made / MARKER).read_text())["made_by"] == "ollama-compress"
    (made / "result").write_text("ours")
    assert claim_output_dir(made) == made  # an earlier output of the tool
    assert remove_made(made) and not made.exists()
    given = tmp_path / "given"
    given.mkdir()
    claim_output_dir(given)
    assert not remove_made(given) and given.is_dir()  # the user made it: it stays


# ---------------------------------------------------------------- full disk
def test_free_space_is_checked_before_a_gguf_import_writes_anything(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from gguf_samples import write_small_gguf
    from ollama_compress.hooks.source import import_gguf

    gguf = write_small_gguf(tmp_path / "small.gguf")
    out = tmp_path / "out"
    out.mkdir()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - 4096, 4096))
    with pytest.raises(UserError, match="not enough disk space"):
        import_gguf(gguf, out)
    assert list(out.iterdir()) == []


def test_free_space_is_checked_before_model_weights_are_saved(tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    from ollama_compress.modelio import save_model
    from tiny_models import tiny_model

    model = tiny_model("llama", 1)
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(1 << 30, (1 << 30) - (1 << 20), 1 << 20))
    with pytest.raises(UserError, match="not enough disk space .* model weights"):
        save_model(model, None, tmp_path)
    assert list(tmp_path.iterdir()) == []


FULL_DISK_CHILD = """
import resource, sys
limit = int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # CPython ignores SIGXFSZ: writes fail with EFBIG
from ollama_compress.cli import main
main(sys.argv[2:])
"""


def test_a_disk_that_fills_mid_write_is_one_line_and_leaves_nothing(tmp_path, tiny_model_dir):
    model = tiny_model_dir("llama", 4)
    out = tmp_path / "out"
    args = ["export", model, "--outtype", "F32", "--out", out]
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_CHILD, str(2 << 20), *map(str, args)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 1, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert lines[-1].startswith("Error: no space left"), lines
    assert len([line for line in lines if line.startswith("Error")]) == 1
    assert not out.exists() or {p.name for p in out.rglob("*")} <= {MARKER, JOURNAL}  # no GGUF, whole or half, nor a temporary
    assert not [p for p in tmp_path.rglob("*") if ".tmp-" in p.name]


def test_native_writers_disk_full_messages_are_recognised():
    """safetensors (Rust) reports a full disk only in its message; prune, heal and import write through it."""
    from safetensors import SafetensorError

    from ollama_compress.cli import _disk_full

    full = _disk_full(SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert full is not None and full.errno == errno.ENOSPC
    assert _disk_full(OSError("3145728 requested and 81344 written")).errno == errno.ENOSPC
    assert _disk_full(SafetensorError("Error while deserializing header: InvalidHeaderDeserialization")) is None
    assert _disk_full(FileNotFoundError(errno.ENOENT, "No such file")) is None


# ---------------------------------------------------------------- file names built from run data
@pytest.mark.parametrize("metric", ["../escape", "a/b", ".hidden", "x\0y"])
def test_a_metric_name_that_is_not_a_plain_file_name_is_refused(tmp_path, metric):
    from ollama_compress.hooks.importance import write_scores

    with pytest.raises(UserError, match="metric name"):
        write_scores(tmp_path / "out", {metric: [0.1, 0.2]}, {})
    assert not (tmp_path / "escape.png").exists() and not list(tmp_path.rglob("*.png"))


def test_a_report_with_a_hostile_metric_name_writes_no_file_outside(tmp_path):
    from ollama_compress.report import write_report

    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"../../outside": [0.5, 0.2]}))
    with pytest.raises(UserError, match="metric name"):
        write_report(tmp_path / "report", "demo", None, {"scores_file": str(scores)})
    assert not list(tmp_path.rglob("*.png"))


# ---------------------------------------------------------------- report.md escapes run data
HOSTILE = ["<img src=x onerror=alert(1)>", "# a heading\n## another", "a | b | c", "```\nrm -rf ~\n```",
           "[click](http://evil.example/x.png)", "![pixel](http://evil.example/p.png)", "`code` *bold*\r\n---"]


def test_report_md_escapes_every_value_from_run_data(tmp_path):
    from ollama_compress.report import write_report

    pruned = tmp_path / "pruned"
    pruned.mkdir()
    (pruned / "layer_map.json").write_text(json.dumps({"student_to_teacher": [0, "<b>x</b>"], "removed": [1],
                                                       "metric": HOSTILE[1], "num_layers_before": "```"}))
    rows = [{"name": text, "model": "pruned", "size_bytes": 1 << 20, "perplexity": 2.0, "answers": [text],
             "plugin_metric": text} for text in HOSTILE]
    evaluation = {"rows": rows, "prompts": [HOSTILE[0]], "heldout_tokens": HOSTILE[3]}
    inputs = {"pruned_dir": str(pruned), "ollama_models": {text: text for text in HOSTILE},
              "modelfiles": {text: text for text in HOSTILE}}
    path, _ = write_report(tmp_path / "report", HOSTILE[1], evaluation, inputs)
    lines = path.read_text().splitlines()
    assert "<" not in path.read_text()  # no raw HTML
    assert [line for line in lines if line.startswith("#")] == [
        line for line in lines if line.startswith(("# ", "## "))] and sum(line.startswith("# ") for line in lines) == 1
    assert sum(line.strip() == "```" for line in lines) == 2  # only the report's own code block
    assert not [line for line in lines if line.strip() in ("---", "rm -rf ~")]
    assert not re.search(r"(?<!\\)\]\(http", path.read_text())  # no link or image from run data
    table_rows = [line for line in lines if line.startswith("| ") and "evil" in line]
    assert table_rows and all(line.replace("\\|", "").count("|") in (3, 4, 10) for line in table_rows)


# ---------------------------------------------------------------- a lock must name its source's sha256
@pytest.mark.parametrize("inputs", [{}, {"source": {"path": "x"}}, {"source": {"sha256": ""}},
                                    {"source": {"sha256": "abc"}}, {"source": "sha256"}, None])
@pytest.mark.parametrize("force", [False, True])
def test_a_lock_without_the_source_sha256_is_refused(tmp_path, tiny_model_dir, inputs, force):
    from helpers import assert_clean_error, cli

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    lock = {"recipe": recipe_dict(tiny_model_dir("llama", 2), "locked"), "versions": {}, "stages": {}}
    if inputs is not None:
        lock["inputs"] = inputs
    (run_dir / "run.json").write_text(json.dumps(lock))
    proc = cli("run", run_dir / "run.json", *(["--force"] if force else []))
    assert_clean_error(proc, "records no sha256")
    assert sorted(p.name for p in run_dir.iterdir()) == ["run.json"]
