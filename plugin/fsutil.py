"""Atomic outputs, ownership of output folders, and content hashes.

Every output is first written under a temporary name next to its final place and renamed when
complete, so an interrupted or failed step never leaves a half-written file or directory behind.
The tool never deletes, replaces or renames what it did not make: directories it creates or
claims carry a marker file (``MARKER``), an existing output is replaced only inside them, and
cleanup removes only the temporaries recorded in their journal (``JOURNAL``), never by name.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from . import __version__
from .errors import UserError


MARKER = ".ollama-compress"  # in every directory this tool created or claimed: {"made_by", "version", "created"}
JOURNAL = ".ollama-compress.journal"  # in an owned directory: the temporaries made under it, one JSON line each
MADE_BY = "ollama-compress"
JOURNAL_COMPACT_BYTES = 1 << 16
_TEMP_RE = re.compile(r"\..+\.(?P<kind>tmp|old)-\d+-[0-9a-f]+")  # a journaled path must also be named so


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    except (OverflowError, ValueError):
        return False
    return True


# ---------------------------------------------------------------- what this tool made
def _marker(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / MARKER).read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("made_by") == MADE_BY else None


def is_owned_dir(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a directory this tool created or claimed (it holds the marker)."""
    path = Path(path)
    return path.is_dir() and _marker(path) is not None


def _mark(path: Path, created: bool) -> None:
    (path / MARKER).write_text(json.dumps({"made_by": MADE_BY, "version": __version__, "created": created}) + "\n")


def owned_root(path: str | os.PathLike) -> Path | None:
    """The nearest directory at or above ``path`` that this tool owns, or None."""
    probe = Path(path).resolve()
    for candidate in (probe, *probe.parents):
        if is_owned_dir(candidate):
            return candidate
    return None


def _made_by_tool(path: Path) -> bool:
    """A path this tool may replace: an owned directory, or anything inside one."""
    if path.is_dir() and not path.is_symlink() and is_owned_dir(path):
        return True
    return owned_root(path.parent) is not None


def _holds_cwd(path: Path) -> bool:
    here, target = Path.cwd().resolve(), path.resolve()
    return target == here or target in here.parents


def check_output_dir(path: str | os.PathLike, what: str = "--out", inputs: tuple = ()) -> Path:
    """``path`` if this tool may write into it (missing, empty, or marked as its own); else a UserError:
    a file, a directory holding other files, or one that holds one of ``inputs``. Writes nothing."""
    path = Path(path)
    if path.is_symlink() and not path.exists():
        raise UserError(f"{what} {path} is a broken symlink; choose an empty or new folder")
    if path.exists() and not path.is_dir():
        raise UserError(f"{what} {path} is a file; choose an empty or new folder")
    if not path.exists():
        return path
    for item in inputs:
        item = Path(item).resolve()
        if item == path.resolve() or path.resolve() in item.parents:
            raise UserError(f"{what} {path} holds the input {item}; choose an empty or new folder")
    if _marker(path) is None and any(os.scandir(path)):
        raise UserError(f"{what} {path} exists and holds files ollama-compress did not write; "
                        "choose an empty or new folder")
    return path


def claim_output_dir(path: str | os.PathLike, what: str = "--out", inputs: tuple = ()) -> Path:
    """``path`` as a directory this tool owns: created (and marked) when missing, marked when empty,
    accepted when marked earlier; refused as ``check_output_dir`` says otherwise."""
    return _claim_dir(check_output_dir(path, what, inputs))


@contextlib.contextmanager
def claimed_output_dir(path: str | os.PathLike, what: str = "--out", inputs: tuple = ()) -> Iterator[Path]:
    """``claim_output_dir`` for the length of a command's work: when the work fails, a folder the claim
    created goes again and a marker it added to an empty folder is taken back, so a command that
    stops on bad input leaves nothing behind."""
    path = Path(path)
    existed = path.exists() or path.is_symlink()
    marked_before = existed and _marker(path) is not None
    path = claim_output_dir(path, what, inputs)
    try:
        yield path
    except BaseException:
        if not existed:
            remove_made(path)
        elif not marked_before and {e.name for e in os.scandir(path)} <= {MARKER, JOURNAL}:
            for name in (MARKER, JOURNAL):
                with contextlib.suppress(FileNotFoundError):
                    (path / name).unlink()
        raise


def make_dir(path: str | os.PathLike) -> Path:
    """Create the new directory ``path`` (FileExistsError if anything is there) marked as this tool's."""
    path = Path(path)
    path.mkdir()
    _mark(path, created=True)
    return path


def move_made(src: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Rename the directory ``src`` this tool created to ``final``, which must be missing or made by it."""
    src, final = Path(src), Path(final)
    if src.is_symlink() or not (_marker(src) or {}).get("created"):
        raise UserError(f"{src} was not made by ollama-compress; it is not moved")
    if (final.exists() or final.is_symlink()) and not remove_made(final):
        raise UserError(f"{final} exists and was not written by ollama-compress; choose an empty or new folder")
    os.replace(src, final)
    return final


def make_temp_dir(prefix: str) -> Path:
    """A new directory in the system's temporary folder, marked as this tool's (``remove_made`` removes it)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    _mark(path, created=True)
    return path


def claim_cache_dir(path: Path) -> Path:
    """The tool's cache folder ``path``, created if needed and marked as its own."""
    return _claim_dir(path)


def _claim_dir(path: Path) -> Path:
    """``path`` created and marked as made by this tool, or, a folder already there, marked as claimed."""
    if not path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        _mark(path, created=True)
    elif _marker(path) is None:
        _mark(path, created=False)
    return path


def remove_made(path: str | os.PathLike) -> bool:
    """Remove the directory ``path`` if this tool created it (its marker says so). Of a directory it
    only claimed (an empty one it was given), remove just the directories inside that it created.
    Never follows symlinks; anything else is left alone. Returns whether ``path`` itself went."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    marker = _marker(path)
    if marker is None:
        return False
    if marker.get("created"):
        shutil.rmtree(path)
        return True
    remove_made_children(path)
    return False


def remove_made_children(path: str | os.PathLike) -> None:
    """Remove the directories directly inside the owned directory ``path`` that this tool created."""
    path = Path(path)
    if path.is_symlink() or not is_owned_dir(path):
        return
    for child in path.iterdir():
        if not child.is_symlink() and child.is_dir() and (_marker(child) or {}).get("created"):
            shutil.rmtree(child)


# ---------------------------------------------------------------- the journal of temporaries
def _journal(root: Path | None, op: str, path: Path, final: Path | None = None) -> None:
    if root is None:
        return
    entry = {"op": op, "path": os.path.relpath(path, root), "pid": os.getpid()}
    if final is not None:
        entry["final"] = os.path.relpath(final, root)
    with open(root / JOURNAL, "a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
    if op == "done" and (root / JOURNAL).stat().st_size > JOURNAL_COMPACT_BYTES:
        _clean_root(root)  # a long-lived owned folder (the cache): keep its journal short


def _pending(root: Path) -> dict[str, dict[str, Any]]:
    """Journaled temporaries under ``root`` not yet marked done, by relative path."""
    pending: dict[str, dict[str, Any]] = {}
    try:
        lines = (root / JOURNAL).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return pending
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("path"), str):
            continue
        if entry.get("op") == "add" and isinstance(entry.get("pid"), int):
            pending[entry["path"]] = entry
        elif entry.get("op") == "done":
            pending.pop(entry["path"], None)
    return pending


def _inside(root: Path, relative: Any) -> Path | None:
    """``root / relative`` when ``relative`` is a plain relative path whose folder lies inside ``root``
    (the last part is not followed: a symlink there is removed, never its target)."""
    if not isinstance(relative, str) or not relative or "\0" in relative:
        return None
    rel = Path(relative)
    if rel.is_absolute() or ".." in rel.parts:
        return None
    path, base = root / rel, root.resolve()
    folder = path.parent.resolve()
    return path if folder == base or base in folder.parents else None


def _clean_one(root: Path, entry: dict[str, Any]) -> Path | None:
    path = _inside(root, entry["path"])
    match = _TEMP_RE.fullmatch(path.name) if path is not None else None
    if match is None or not (path.exists() or path.is_symlink()):
        return None
    final = _inside(root, entry.get("final"))
    if match["kind"] == "old" and final is not None and not (final.exists() or final.is_symlink()):
        os.replace(path, final)  # killed between the two renames: the previous version comes back
        return None
    _remove(path)
    return path


def clean_journal(directory: str | os.PathLike) -> list[Path]:
    """Remove what killed writers left in the owned directory ``directory`` and the owned directories
    under it: only the temporaries their journals record (never anything found by its name). An
    ``.old`` version comes back when its final path is missing. A live writer's entries are kept."""
    root = Path(directory)
    if root.is_symlink() or not is_owned_dir(root):
        return []
    removed: list[Path] = []
    for parent, dirs, _files in os.walk(root):
        here = Path(parent)
        if is_owned_dir(here) and (here / JOURNAL).is_file():
            removed += _clean_root(here)
        dirs[:] = [d for d in dirs if not os.path.islink(os.path.join(parent, d)) and (here / d).exists()]
    return removed


def _clean_root(root: Path) -> list[Path]:
    removed, live = [], []
    for entry in _pending(root).values():
        if _pid_alive(entry["pid"]):
            live.append(entry)
            continue
        gone = _clean_one(root, entry)
        if gone is not None:
            removed.append(gone)
    fd, tmp = tempfile.mkstemp(prefix=f"{JOURNAL}.", dir=root)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(entry) + "\n" for entry in live)
    os.replace(tmp, root / JOURNAL)
    return removed


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _new_temp(final: Path, kind: str, make: str | None) -> Path:
    """A new path ``.NAME.KIND-PID-RANDOM`` beside ``final``; created exclusively as a "dir" or
    "file" when ``make`` says so, so it is certainly this process's."""
    while True:
        path = final.with_name(f".{final.name}.{kind}-{os.getpid()}-{secrets.token_hex(4)}")
        try:
            if make == "dir":
                path.mkdir()
            elif make == "file":
                os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
            elif path.exists() or path.is_symlink():
                continue
        except FileExistsError:
            continue
        return path


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, is_dir: bool = False) -> Iterator[Path]:
    """Yield a new temporary path beside ``final``; rename it to ``final`` only if the block succeeds.

    With ``is_dir=True`` the temporary directory is created (and marked as this tool's). An existing
    ``final`` is replaced only when this tool made it (an owned directory, or inside one), and only
    once the new one is complete. Temporaries are journaled in the nearest owned directory, so a
    later ``clean_journal`` removes what a killed writer left, and nothing else.
    """
    final = Path(final)
    if final.name in ("", ".", ".."):
        final = final.resolve()
    if is_dir and _holds_cwd(final):
        raise UserError(f"{final} is the current folder or holds it; choose an empty or new folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    exists = final.exists() or final.is_symlink()
    if exists and is_dir != final.is_dir():
        kind = "a file" if final.is_file() else "a directory"
        raise UserError(f"{final} is {kind}; choose an empty or new folder, or another file name")
    if exists and not _made_by_tool(final):
        raise UserError(f"{final} exists and was not written by ollama-compress; choose an empty or new folder")
    root = owned_root(final.parent)
    tmp = _new_temp(final, "tmp", "dir" if is_dir else "file")
    _journal(root, "add", tmp)
    if is_dir:
        _mark(tmp, created=True)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        _journal(root, "done", tmp)
        raise
    if exists:
        old = _new_temp(final, "old", None)
        _journal(root, "add", old, final)
        os.replace(final, old)
        os.replace(tmp, final)
        _remove(old)
        _journal(root, "done", old)
    else:
        os.replace(tmp, final)
    _journal(root, "done", tmp)


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



def file_in(root: str | os.PathLike, name: str, what: str) -> Path:
    """``root/name`` for a file name built from run data (a metric's plot): one plain name, checked
    like any other path (``resolve_inside``); a separator or a leading dot is refused."""
    if "/" in name or os.sep in name or name.startswith("."):
        raise UserError(f"{what} {name!r} cannot be a file name (a '/' or a leading dot); rename it")
    return resolve_inside(root, name, what)
