"""Reading input files that strangers hand us, boundedly: one reader for every JSON, score file,
layer map, calibration text, tokenizer and config we open.

``read_bytes`` refuses what is not a regular file (a FIFO would block forever, a device never
ends) and files over a size cap for their kind, before reading a byte; ``read_json`` also bounds
the nesting depth (a 100k-deep ``tokenizer.json`` is one line, not a RecursionError);
``walk_files`` bounds a directory walk by depth and entry count.
"""
from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any, Iterator

from .errors import UserError

MiB = 1 << 20
# Largest file of each kind we read; real ones are far smaller (a 256k-token tokenizer.json is ~20 MiB).
MAX_BYTES = {
    "config": 4 * MiB,  # config.json, generation_config.json, tokenizer_config.json (chat templates inside)
    "tokenizer": 256 * MiB,  # tokenizer.json, vocab.json, merges.txt
    "index": 64 * MiB,  # model.safetensors.index.json
    "layer map": 4 * MiB,
    "scores": 16 * MiB,
    "state": 16 * MiB,  # our own run records (run.json, stage markers, trainer state)
    "manifest": 4 * MiB,  # Ollama manifests
    "data": 1024 * MiB,  # calibration / heal text and JSONL
    "template": 1 * MiB,  # chat_template.jinja and family files
}
MAX_JSON_DEPTH = 64  # real configs and tokenizers nest < 10 deep
MAX_WALK_DEPTH = 32  # a model directory or run directory is a few levels deep
MAX_WALK_ENTRIES = 200_000


def _kind_limit(kind: str) -> int:
    if kind not in MAX_BYTES:
        raise ValueError(f"unknown input kind {kind!r}")
    return MAX_BYTES[kind]


def check_regular_file(path: str | os.PathLike, kind: str, what: str | None = None) -> int:
    """The size of ``path`` if it is a regular file within the ``kind`` cap; a UserError otherwise
    (missing, a directory, a FIFO, a device or socket, too big). Nothing is opened."""
    path = Path(path)
    what = what or str(path)
    try:
        info = path.stat()
    except FileNotFoundError:
        raise UserError(f"{what} does not exist") from None
    except OSError as exc:
        raise UserError(f"cannot read {what}: {exc.strerror or exc}") from None
    if stat.S_ISDIR(info.st_mode):
        raise UserError(f"{what} is a directory; give a file")
    if not stat.S_ISREG(info.st_mode):
        raise UserError(f"{what} is not a regular file (a FIFO, device or socket); give a plain file")
    limit = _kind_limit(kind)
    if info.st_size > limit:
        raise UserError(f"{what} is {info.st_size / MiB:.1f} MiB, more than a {kind} file may be "
                        f"({limit / MiB:.0f} MiB); is it the right file?")
    return info.st_size


def read_bytes(path: str | os.PathLike, kind: str, what: str | None = None) -> bytes:
    """The bytes of ``path`` after ``check_regular_file``; never more than the cap (a file that
    grows while read is cut off and refused)."""
    limit = _kind_limit(kind)
    check_regular_file(path, kind, what)
    what = what or str(path)
    try:
        # O_NONBLOCK: a file swapped for a FIFO after the check cannot block the open
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise UserError(f"{what} is not a regular file; give a plain file")
            data = f.read(limit + 1)
    except OSError as exc:
        raise UserError(f"cannot read {what}: {exc.strerror or exc}") from None
    if len(data) > limit:
        raise UserError(f"{what} grew past {limit / MiB:.0f} MiB while being read")
    return data


def read_text(path: str | os.PathLike, kind: str, what: str | None = None) -> str:
    """``read_bytes`` decoded as UTF-8; a file that is not UTF-8 is one line."""
    what = what or str(path)
    try:
        return read_bytes(path, kind, what).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} is not UTF-8 text (byte {exc.start}); re-save it as UTF-8") from None


def check_json_depth(text: str, what: str, max_depth: int = MAX_JSON_DEPTH) -> None:
    """A UserError if brackets in ``text`` (outside strings) nest deeper than ``max_depth``.

    Linear, no recursion: run before ``json.loads`` (whose recursion a deep file exhausts)."""
    depth = 0
    for match in _JSON_TOKENS.finditer(text):
        char = match.group()
        if char in "[{":
            depth += 1
            if depth > max_depth:
                raise UserError(f"{what} nests deeper than {max_depth} levels; it is not a file this tool reads")
        elif char in "]}":
            depth -= 1


_JSON_TOKENS = re.compile(r'"(?:[^"\\]|\\.)*"?|[\[\]{}]')  # strings (skipped whole) and brackets


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(text: str, what: str) -> Any:
    """``text`` parsed as strict JSON (no NaN/Infinity), depth-bounded; one line when malformed."""
    check_json_depth(text, what)
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (ValueError, RecursionError) as exc:
        raise UserError(f"{what}: not valid JSON ({str(exc)[:200]}); fix or replace the file") from None


def read_json(path: str | os.PathLike, kind: str, what: str | None = None, expect: type | None = None) -> Any:
    """The JSON value of ``path`` (bounded as in ``read_text`` and ``check_json_depth``).

    ``expect`` (``dict``, ``list``) refuses a value of another type in one line."""
    what = what or str(path)
    value = parse_json(read_text(path, kind, what), what)
    if expect is not None and not isinstance(value, expect):
        raise UserError(f"{what} holds a JSON {_json_type(value)}, not a JSON {_json_type(expect())}; "
                        "fix or replace the file")
    return value


def _json_type(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", int: "number",
            float: "number", type(None): "null"}.get(type(value), type(value).__name__)


def walk_files(root: str | os.PathLike, what: str | None = None, max_depth: int = MAX_WALK_DEPTH,
               max_entries: int = MAX_WALK_ENTRIES) -> Iterator[Path]:
    """Every entry below ``root`` (files, folders, links; links not followed), breadth first.

    A UserError when the tree is deeper than ``max_depth`` or holds more than ``max_entries``."""
    root = Path(root)
    what = what or str(root)
    seen = 0
    level = [root]
    for depth in range(max_depth + 1):
        following: list[Path] = []
        for folder in level:
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                raise UserError(f"cannot list {folder}: {exc.strerror or exc}") from None
            for entry in entries:
                seen += 1
                if seen > max_entries:
                    raise UserError(f"{what} holds more than {max_entries} files; is it the right directory?")
                path = Path(entry.path)
                yield path
                if entry.is_dir(follow_symlinks=False):
                    following.append(path)
        if not following:
            return
        if depth == max_depth:
            raise UserError(f"{what} is nested more than {max_depth} folders deep; is it the right directory?")
        level = following
