"""Atomic outputs and content hashes.

Every output is first written under a temporary name next to its final place and renamed when
complete, so an interrupted or failed step never leaves a half-written file or directory behind.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError


# ``.NAME.tmp-PID`` (being written) and ``.NAME.old-PID`` (the previous version, while swapping)
_SIBLING_RE = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>\d+)$")


def _tmp_name(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except OverflowError:
        return False
    return True


def _stale_siblings(directory: Path, name: str | None = None) -> list[tuple[Path, str, str]]:
    """(path, final name, kind) of atomic-write leftovers in ``directory`` whose writer is dead."""
    found = []
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return found
    for entry in entries:
        m = _SIBLING_RE.match(entry.name)
        if m and (name is None or m["name"] == name) and not _pid_alive(int(m["pid"])):
            found.append((Path(entry.path), m["name"], m["kind"]))
    return found


def _clean_siblings(directory: Path, name: str | None = None) -> list[Path]:
    removed = []
    leftovers = sorted(_stale_siblings(directory, name), key=lambda found: found[2] == "tmp")  # .old first
    for path, final_name, kind in leftovers:
        final = directory / final_name
        if kind == "old" and not final.exists() and not final.is_symlink():
            os.replace(path, final)  # killed between the two renames: the previous version comes back
            continue
        _remove(path)
        removed.append(path)
    return removed


def remove_stale_temporaries(directory: str | os.PathLike) -> list[Path]:
    """Remove what killed ``atomic_path`` writers left under ``directory`` (recursively).

    ``.NAME.tmp-PID`` is removed; ``.NAME.old-PID`` is put back as ``NAME`` when ``NAME`` is
    missing (the writer died between its two renames), else removed. Leftovers of a process
    that is still alive are kept. Symlinked directories are not followed. Returns what was removed.
    """
    root = Path(directory)
    if not root.is_dir() or root.is_symlink():
        return []
    removed = []
    for parent, dirs, _files in os.walk(root):
        removed += _clean_siblings(Path(parent))
        dirs[:] = [d for d in dirs if not _SIBLING_RE.match(d) and not os.path.islink(os.path.join(parent, d))]
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` only if the block succeeds.

    With ``is_dir=True`` the temporary directory is created for you. An existing ``final`` is
    replaced only once the new one is complete. Leftovers of a killed earlier writer of ``final``
    (``.NAME.tmp-PID`` / ``.NAME.old-PID`` of a dead PID) are cleaned first.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    _clean_siblings(final.parent, final.name)  # what a killed earlier writer of ``final`` left
    if final.exists() and is_dir != final.is_dir():
        kind = "a file" if final.is_file() else "a directory"
        raise UserError(f"{final} is {kind}; choose another output path")
    tmp = _tmp_name(final)
    _remove(tmp)
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
    else:
        os.replace(tmp, final)


def check_free_space(target: str | os.PathLike, needed: int, what: str) -> None:
    """UserError unless the filesystem holding ``target`` (or its nearest existing parent) has
    ``needed`` bytes free for ``what``."""
    probe = Path(target)
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise UserError(f"not enough disk space in {probe} for {what}: need about {needed / 2**20:.0f} MiB, "
                        f"{free / 2**20:.0f} MiB free; free some space or choose another output directory")


def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented JSON atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")
    return path


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def tree_sha256(path: str | os.PathLike) -> str:
    """Hash of a file, or of a directory's relative file names and contents (hidden files skipped)."""
    path = Path(path)
    if path.is_file():
        return file_sha256(path)
    h = hashlib.sha256()
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            h.update(str(rel).encode() + b"\0" + file_sha256(p).encode())
    return h.hexdigest()


def settings_hash(*parts: Any) -> str:
    """Stable hash of JSON-able settings."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _stat_entries(path: Path) -> list[list[Any]]:
    """(relative name, size, mtime_ns) of a file, or of every non-hidden file under a directory."""
    if path.is_file():
        st = path.stat()
        return [[path.name, st.st_size, st.st_mtime_ns]]
    rows = []
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path)
        if p.is_file() and not any(part.startswith(".") for part in rel.parts):
            st = p.stat()
            rows.append([str(rel), st.st_size, st.st_mtime_ns])
    return rows


class Fingerprints:
    """sha256 of model files and directories, hashed once and reused while sizes and mtimes stay.

    Kept in one JSON file (``cache_file``), keyed by absolute path.
    """

    def __init__(self, cache_file: str | os.PathLike):
        self.cache_file = Path(cache_file)

    def _load(self) -> dict[str, Any]:
        try:
            return json.loads(self.cache_file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def known(self, path: str | os.PathLike) -> str | None:
        """The cached sha256 of ``path`` if its files are unchanged since it was hashed, else None.

        Reads only file metadata, never contents."""
        path = Path(path).resolve()
        entry = self._load().get(str(path))
        if entry and entry.get("stat") == _stat_entries(path):
            return entry["sha256"]
        return None

    def sha256(self, path: str | os.PathLike) -> str:
        """sha256 of ``path`` (``tree_sha256``), from the cache when the files are unchanged."""
        path = Path(path).resolve()
        cached = self.known(path)
        if cached is not None:
            return cached
        stat = _stat_entries(path)
        digest = tree_sha256(path)
        table = self._load()
        table[str(path)] = {"stat": stat, "sha256": digest}
        self.cache_file.parent.mkdir(parents=True, exist_ok=True)
        write_json(self.cache_file, table)
        return digest


def resolve_inside(root: str | os.PathLike, relative: str | os.PathLike, what: str) -> Path:
    """``root/relative`` resolved, if it stays inside ``root``; else a UserError naming ``what``.

    Refuses NUL bytes, absolute paths, ``..`` parts and symlinks (anywhere on the way) that lead
    out of ``root``. ``relative`` need not exist yet.
    """
    text = os.fspath(relative)
    if "\0" in text:
        raise UserError(f"{what} {text!r} contains a NUL byte; give a plain relative path")
    rel = Path(text)
    if rel.is_absolute() or text.startswith("~"):
        raise UserError(f"{what} {text!r} is an absolute path; give a path relative to {root}")
    if ".." in rel.parts:
        raise UserError(f"{what} {text!r} contains '..'; give a path inside {root}")
    base = Path(root).resolve()
    target = (base / rel).resolve()
    if target != base and base not in target.parents:
        raise UserError(f"{what} {text!r} leads out of {root} (through a symlink); give a path inside it")
    return target

