"""Paths stay inside their root; leftovers of killed writers are cleaned; a full disk is one line."""
from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ollama_compress.errors import UserError
from ollama_compress.fsutil import atomic_path, remove_stale_temporaries, resolve_inside


def dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


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
def test_stale_temporaries_are_removed_and_an_interrupted_swap_is_undone(tmp_path):
    pid = dead_pid()
    stale_dir = tmp_path / f".40-gguf.tmp-{pid}"
    (stale_dir / "sub").mkdir(parents=True)
    (stale_dir / "sub" / "model-F16.gguf").write_bytes(b"GGUF" + b"\0" * 100)
    stale_file = tmp_path / "20-pruned" / f".config.json.tmp-{pid}"
    stale_file.parent.mkdir()
    stale_file.write_text("{")
    # killed between its two renames: 30-healed was moved aside, the new one never arrived
    moved_aside = tmp_path / f".30-healed.old-{pid}"
    moved_aside.mkdir()
    (moved_aside / ".stage.json").write_text("{}")
    # killed while removing the previous version after the swap: the new one is in place
    half_removed = tmp_path / f".run.json.old-{pid}"
    half_removed.write_text("old")
    (tmp_path / "run.json").write_text("new")
    live = tmp_path / f".50-ollama.tmp-{os.getpid()}"
    live.mkdir()

    removed = remove_stale_temporaries(tmp_path)

    assert not stale_dir.exists() and not stale_file.exists() and not half_removed.exists()
    assert (tmp_path / "30-healed" / ".stage.json").is_file() and not moved_aside.exists()
    assert (tmp_path / "run.json").read_text() == "new"
    assert live.is_dir()  # a live writer's temporary stays
    assert set(removed) == {stale_dir, stale_file, half_removed}


def test_atomic_path_cleans_what_a_killed_writer_of_the_same_output_left(tmp_path):
    pid = dead_pid()
    stale = tmp_path / f".40-gguf.tmp-{pid}"
    stale.mkdir()
    (stale / "big.gguf").write_bytes(b"x" * 1000)
    other = tmp_path / f".20-pruned.tmp-{pid}"  # another output's leftover: not this call's business
    other.mkdir()
    with atomic_path(tmp_path / "40-gguf", is_dir=True) as tmp:
        (tmp / "done").write_text("ok")
    assert not stale.exists()
    assert (tmp_path / "40-gguf" / "done").read_text() == "ok"
    assert other.is_dir()


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
    assert not out.exists() or list(out.rglob("*")) == []  # no GGUF, whole or half, and no temporary
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
