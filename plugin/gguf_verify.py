"""A strict, streaming GGUF verifier: our own struct-level parse, checked against the file size.

llama.cpp and Ollama trust a GGUF's header; a truncated or corrupted file can crash them or load
as garbage. ``verify_gguf`` reads the header and tensor table itself (never the tensor data, never
the whole file into memory) and applies the rules llama.cpp's ``gguf.cpp`` loader applies:

* magic ``GGUF``, little-endian, version 2 or 3;
* tensor and key/value counts plausible for the file size before anything is read for them;
* every string and array length inside the file; only known value types; no nested arrays;
  no duplicate keys or tensor names;
* ``general.alignment`` a UINT32 power of two (default 32); tensors of known ggml types, at most
  4 dimensions, rows a whole number of quant blocks;
* tensor data aligned, inside the file, not overlapping and packed in table order (llama.cpp
  refuses gaps too);
* ``{arch}.block_count`` equal to the ``blk.N`` tensor indices present;
* every tensor llama.cpp's loader needs for the architecture present, and no hyper-parameter
  (head count, width, ...) of 0 (``gguf.arch.loadability_problems``, which the writer runs too).

Any problem raises ``UserError("<path>: not a valid GGUF file: <reason>")``.
"""
from __future__ import annotations

import re
import struct
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from .errors import UserError
from .gguf.arch import gguf_py, loadability_problems, metadata_type_problem

if TYPE_CHECKING:  # pragma: no cover
    from gguf import GGUFValueType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_NAME = 64  # GGML_MAX_NAME: tensor names are shorter than this
HEADER_SIZE = 24  # magic, version, tensor count, kv count
MIN_KV_SIZE = 8 + 4 + 1  # empty key, value type, smallest value
MIN_TENSOR_INFO_SIZE = 8 + 4 + 4 + 8  # empty name, n_dims (0), type, offset
SMALL_ARRAY = 64  # numeric arrays up to this many items are kept in ``metadata``

_SCALARS = {"UINT8": "<B", "INT8": "<b", "UINT16": "<H", "INT16": "<h", "UINT32": "<I", "INT32": "<i",
            "FLOAT32": "<f", "BOOL": "<?", "UINT64": "<Q", "INT64": "<q", "FLOAT64": "<d"}  # by GGUFValueType name
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of the table. ``shape`` is in GGUF order (row size first); ``offset`` is
    relative to the data section."""

    name: str
    type: str
    shape: tuple[int, ...]
    offset: int
    nbytes: int

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


@dataclass(frozen=True)
class GGUFArray:
    """Stands in for a metadata array too long to keep (tokenizer vocabularies...)."""

    type: str
    count: int


@dataclass
class GGUFSummary:
    """What a verified GGUF holds, read from its header and tensor table."""

    path: Path
    version: int
    tensor_count: int
    kv_count: int
    architecture: str | None
    block_count: int | None
    file_type: str | None  # llama.cpp spelling (Q4_K_M, F16, ...), from general.file_type
    alignment: int
    data_offset: int
    size: int
    tensors: list[TensorInfo] = field(repr=False, default_factory=list)
    metadata: dict[str, Any] = field(repr=False, default_factory=dict)

    @property
    def n_weights(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        """Tensor data bits over the number of weights (all tensors, norms included)."""
        n = self.n_weights
        return 8.0 * self.tensor_bytes / n if n else 0.0

    def type_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for t in self.tensors:
            counts[t.type] = counts.get(t.type, 0) + 1
        return counts

    def to_dict(self, tensors: bool = False) -> dict[str, Any]:
        """JSON-able summary; the tensor table only when asked for."""
        data = {k: v for k, v in asdict(self).items() if k not in ("tensors", "metadata")}
        data.update(path=str(self.path), n_weights=self.n_weights,
                    bits_per_weight=round(self.bits_per_weight, 4), tensor_types=self.type_counts())
        if tensors:
            data["tensors"] = [asdict(t) for t in self.tensors]
        return data

    def one_line(self) -> str:
        arch = self.architecture or "no architecture"
        blocks = f", {self.block_count} blocks" if self.block_count is not None else ""
        ftype = f", {self.file_type}" if self.file_type else ""
        return (f"{self.path}: GGUF v{self.version}, {arch}{blocks}, {self.tensor_count} tensors"
                f"{ftype}, {self.size / 2**20:.1f} MiB, {self.bits_per_weight:.2f} bits/weight")


class _Invalid(Exception):
    """A reason the file is not valid GGUF (turned into a UserError naming the file)."""


class _Reader:
    """Sequential little-endian reads that never go past the end of the file."""

    def __init__(self, f: BinaryIO, size: int):
        self.f, self.size, self.pos = f, size, 0

    @property
    def remaining(self) -> int:
        return self.size - self.pos

    def _need(self, n: int, what: str) -> None:
        if n > self.remaining:
            raise _Invalid(f"truncated: {what} needs {n} bytes at offset {self.pos}, "
                           f"only {self.remaining} left (file size {self.size})")

    def take(self, n: int, what: str) -> bytes:
        self._need(n, what)
        data = self.f.read(n)
        if len(data) != n:
            raise _Invalid(f"truncated: short read of {what} at offset {self.pos}")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)
        self.f.seek(n, 1)
        self.pos += n

    def scalar(self, fmt: str, what: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))[0]

    def u32(self, what: str) -> int:
        return self.scalar("<I", what)

    def u64(self, what: str) -> int:
        return self.scalar("<Q", what)

    def string(self, what: str) -> str:
        start = self.pos
        length = self.u64(f"length of {what}")
        if length > self.remaining:
            raise _Invalid(f"{what} at offset {start} claims {length} bytes, "
                           f"only {self.remaining} left in the file")
        return self.take(length, what).decode("utf-8", errors="replace")


# ---------------------------------------------------------------- public API
def verify_gguf(path: str | Path) -> GGUFSummary:
    """Check ``path`` is a complete, well-formed GGUF llama.cpp can load; return its summary.

    Raises ``UserError("<path>: not a valid GGUF file: <reason>")`` on any problem.
    """
    path = Path(path)
    try:
        if not path.is_file():
            raise _Invalid("no such file" if not path.exists() else "not a regular file")
        size = path.stat().st_size
        with open(path, "rb", buffering=1 << 20) as f:
            return _parse(path, _Reader(f, size))
    except _Invalid as exc:
        raise UserError(f"{path}: not a valid GGUF file: {_printable(str(exc))}") from None
    except OSError as exc:
        raise UserError(f"{path}: not a valid GGUF file: cannot read it ({exc.strerror or exc})") from None


def _printable(text: str, limit: int = 400) -> str:
    """Names read from the file, made safe for a one-line message: control characters escaped
    (no line breaks, no terminal escapes), cut to ``limit`` characters."""
    safe = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" if ord(c) < 256 else "?" for c in text)
    return safe if len(safe) <= limit else safe[:limit] + "..."


def ftype_name(value: int) -> str | None:
    """llama.cpp's name for a ``general.file_type`` value (``15`` -> ``Q4_K_M``)."""
    try:
        name = gguf_py().LlamaFileType(value).name
    except ValueError:
        return None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def ggml_type_size(type_name: str) -> tuple[int, int]:
    """(elements per block, bytes per block) of a ggml tensor type name (``Q4_K``...)."""
    gguf = gguf_py()
    return gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]


# ---------------------------------------------------------------- parsing
def _parse(path: Path, r: _Reader) -> GGUFSummary:
    version, tensor_count, kv_count = _header(r)
    metadata = _metadata(r, kv_count)
    alignment = _alignment(metadata)
    tensors = _tensor_table(r, tensor_count)
    data_offset = _pad(r.pos, alignment)
    if tensors and data_offset > r.size:
        raise _Invalid(f"truncated: data section would start at {data_offset}, file size {r.size}")
    _check_layout(tensors, data_offset, alignment, r.size)
    arch = metadata.get("general.architecture")
    if arch is not None and not isinstance(arch, str):
        raise _Invalid("general.architecture is not a string")
    block_count = _check_blocks(arch, metadata, tensors)
    problems = loadability_problems(arch, metadata, {t.name for t in tensors})
    if problems:
        raise _Invalid(problems[0])
    ftype = metadata.get("general.file_type")
    return GGUFSummary(
        path=path, version=version, tensor_count=tensor_count, kv_count=kv_count, architecture=arch,
        block_count=block_count, file_type=ftype_name(ftype) if isinstance(ftype, int) else None,
        alignment=alignment, data_offset=data_offset, size=r.size, tensors=tensors, metadata=metadata,
    )


def _header(r: _Reader) -> tuple[int, int, int]:
    magic = r.take(4, "magic")
    if magic != GGUF_MAGIC:
        raise _Invalid(f"bad magic {magic!r} (expected b'GGUF')")
    raw_version = r.take(4, "version")
    version = struct.unpack("<I", raw_version)[0]
    if version not in SUPPORTED_VERSIONS:
        if struct.unpack(">I", raw_version)[0] in SUPPORTED_VERSIONS:
            raise _Invalid("big-endian GGUF; llama.cpp and Ollama read little-endian files only")
        raise _Invalid(f"GGUF version {version} is not supported (llama.cpp reads versions 2 and 3)")
    tensor_count = r.u64("tensor count")
    kv_count = r.u64("key/value count")
    body = r.size - HEADER_SIZE
    if tensor_count * MIN_TENSOR_INFO_SIZE > body:
        raise _Invalid(f"tensor count {tensor_count} cannot fit in a file of {r.size} bytes (truncated or corrupted)")
    if kv_count * MIN_KV_SIZE > body:
        raise _Invalid(f"key/value count {kv_count} cannot fit in a file of {r.size} bytes (truncated or corrupted)")
    if tensor_count * MIN_TENSOR_INFO_SIZE + kv_count * MIN_KV_SIZE > body:
        raise _Invalid(f"{tensor_count} tensors and {kv_count} keys cannot fit in a file of {r.size} bytes (truncated or corrupted)")
    return version, tensor_count, kv_count


def _value_type(r: _Reader, what: str) -> GGUFValueType:
    start = r.pos
    raw = r.u32(f"value type of {what}")
    try:
        return gguf_py().GGUFValueType(raw)
    except ValueError:
        raise _Invalid(f"{what} has unknown value type {raw} (at offset {start})") from None


def _metadata(r: _Reader, kv_count: int) -> dict[str, Any]:
    metadata: dict[str, Any] = {}
    for i in range(kv_count):
        key = r.string(f"key #{i}")
        if not key:
            raise _Invalid(f"key #{i} is empty")
        if key in metadata:
            raise _Invalid(f"duplicate key '{key}'")
        vtype = _value_type(r, f"key '{key}'")
        metadata[key] = _value(r, vtype, key)
    return metadata


def _value(r: _Reader, vtype: GGUFValueType, key: str) -> Any:
    if vtype.name == "STRING":
        return r.string(f"string value of '{key}'")
    if vtype.name == "ARRAY":
        return _array(r, key)
    value = r.scalar(_SCALARS[vtype.name], f"value of '{key}'")
    if vtype.name == "BOOL":
        return bool(value)
    return value


def _array(r: _Reader, key: str) -> Any:
    itype = _value_type(r, f"items of array '{key}'")
    problem = metadata_type_problem(key, {itype})
    if problem:
        raise _Invalid(problem)
    count = r.u64(f"length of array '{key}'")
    item_size = 8 if itype.name == "STRING" else struct.calcsize(_SCALARS[itype.name])
    if count * item_size > r.remaining:
        raise _Invalid(f"array '{key}' claims {count} items, more than the {r.remaining} bytes left in the file")
    if itype.name == "STRING":
        for j in range(count):
            r.string(f"item {j} of '{key}'")
        return GGUFArray(itype.name, count)
    if count <= SMALL_ARRAY:
        fmt = "<" + _SCALARS[itype.name][1] * count
        return list(struct.unpack(fmt, r.take(count * item_size, f"array '{key}'")))
    r.skip(count * item_size, f"array '{key}'")
    return GGUFArray(itype.name, count)


def _alignment(metadata: dict[str, Any]) -> int:
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value = metadata["general.alignment"]
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0 or value & (value - 1):
        raise _Invalid(f"general.alignment {value!r} is not a positive power of two")
    return value


def _tensor_table(r: _Reader, tensor_count: int) -> list[TensorInfo]:
    tensors: list[TensorInfo] = []
    seen: set[str] = set()
    for i in range(tensor_count):
        name = r.string(f"name of tensor #{i}")
        if len(name.encode()) >= MAX_NAME:
            raise _Invalid(f"tensor name '{name[:80]}' is longer than {MAX_NAME - 1} bytes")
        if name in seen:
            raise _Invalid(f"duplicate tensor '{name}'")
        seen.add(name)
        tensors.append(_tensor_info(r, name))
    return tensors


def _tensor_info(r: _Reader, name: str) -> TensorInfo:
    n_dims = r.u32(f"dimension count of '{name}'")
    if n_dims > MAX_DIMS:
        raise _Invalid(f"tensor '{name}' has {n_dims} dimensions (at most {MAX_DIMS})")
    shape = tuple(r.u64(f"shape of '{name}'") for _ in range(n_dims))
    if any(d >= 2**63 for d in shape):
        raise _Invalid(f"tensor '{name}' has a negative dimension")
    raw_type = r.u32(f"type of '{name}'")
    try:
        gguf = gguf_py()
        qtype = gguf.GGMLQuantizationType(raw_type)
        block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        raise _Invalid(f"tensor '{name}' has unknown ggml type {raw_type}") from None
    offset = r.u64(f"offset of '{name}'")
    row = shape[0] if shape else 1
    if row % block:
        raise _Invalid(f"tensor '{name}' row size {row} is not a multiple of the {qtype.name} block size {block}")
    n = 1
    for d in shape:
        n *= d
    return TensorInfo(name, qtype.name, shape, offset, n // block * type_size)


def _pad(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def _check_layout(tensors: list[TensorInfo], data_offset: int, alignment: int, size: int) -> None:
    data_size = size - data_offset
    expected = 0
    previous = None
    for t in tensors:
        if t.offset % alignment:
            raise _Invalid(f"tensor '{t.name}' offset {t.offset} is not aligned to {alignment} bytes")
        if t.offset + t.nbytes > data_size:
            raise _Invalid(f"tensor '{t.name}' ({t.nbytes} bytes at data offset {t.offset}) runs past "
                           f"the end of the file (data section holds {max(data_size, 0)} bytes)")
        if t.offset < expected:
            raise _Invalid(f"tensor '{t.name}' at data offset {t.offset} overlaps '{previous}' "
                           f"(which ends at {expected})")
        if t.offset > expected:
            raise _Invalid(f"tensor '{t.name}' at data offset {t.offset} leaves a gap after "
                           f"'{previous}' (expected {expected}; llama.cpp needs tensors packed in order)")
        expected = t.offset + _pad(t.nbytes, alignment)
        previous = t.name


def _check_blocks(arch: str | None, metadata: dict[str, Any], tensors: list[TensorInfo]) -> int | None:
    indices = {int(m.group(1)) for t in tensors if (m := _BLOCK_RE.match(t.name))}
    key = f"{arch}.block_count" if arch else None
    block_count = metadata.get(key) if key else None
    if block_count is None:
        if indices and arch:
            raise _Invalid(f"{key} is missing but the file has blk.N tensors for {len(indices)} blocks")
        return None
    if not isinstance(block_count, int) or isinstance(block_count, bool) or block_count < 0:
        raise _Invalid(f"{key} is {block_count!r}, not a block count")
    if not tensors:  # vocabulary-only files carry the key without weights
        return block_count
    if block_count > len(tensors):  # each block has tensors; also keeps range() below small
        raise _Invalid(f"{key} is {block_count} but the file has only {len(tensors)} tensors")
    if indices != set(range(block_count)):
        missing = sorted(set(range(block_count)) - indices)
        extra = sorted(indices - set(range(block_count)))
        detail = "; ".join(
            part for part in (
                f"missing blocks {_ranges(missing)}" if missing else "",
                f"unexpected blocks {_ranges(extra)}" if extra else "",
            ) if part
        )
        raise _Invalid(f"{key} is {block_count} but the blk.N tensors disagree ({detail})")
    return block_count


def _ranges(numbers: list[int]) -> str:
    """``[0,1,2,5]`` -> ``0-2, 5`` (short, for messages)."""
    parts: list[str] = []
    start = prev = None
    for n in numbers + [None]:
        if n is not None and prev is not None and n == prev + 1:
            prev = n
            continue
        if start is not None:
            parts.append(str(start) if start == prev else f"{start}-{prev}")
        start = prev = n
    return ", ".join(parts[:6]) + (", ..." if len(parts) > 6 else "")
