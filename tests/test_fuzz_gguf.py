"""Fuzzing the GGUF verifier from real files: mutated magic, version, counts, string lengths, value
types, dimensions, tensor types and offsets, flipped bytes, cuts and splices.

Whatever the bytes, ``verify_gguf`` returns a summary or raises its own UserError (one line); it
never allocates much more than the file's size and its work is bounded by the file's size (counted
as reads, so no timing enters a test; bench/RESULTS.md has the run times).
The corpus is generated: ``seed_files`` (from tests/gguf_samples.py) plus the mutations below.
CI runs a fixed, derandomized set; ``OLLAMA_COMPRESS_FUZZ_EXAMPLES=20000`` runs a longer random one.
"""
from __future__ import annotations

import io
import os
import struct
import tracemalloc
from pathlib import Path

import pytest
from gguf import GGUFValueType, GGUFWriter
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ollama_compress.gguf_verify as gv
from gguf_samples import write_llama_gguf, write_small_gguf
from ollama_compress.errors import UserError

EXAMPLES = int(os.environ.get("OLLAMA_COMPRESS_FUZZ_EXAMPLES", "300"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, database=None,
                derandomize="OLLAMA_COMPRESS_FUZZ_EXAMPLES" not in os.environ,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
MEMORY_FACTOR, MEMORY_SLACK = 64, 4 << 20  # peak Python allocation <= 64 x file size + 4 MiB
INTERESTING = [0, 1, 2, 3, 4, 5, 31, 32, 63, 64, 255, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
               2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]


def _with_metadata(path: Path) -> Path:
    """A GGUF with every value kind: strings, string and number arrays, a chat template, a Q8_0-sized row."""
    def every_kind(w: GGUFWriter) -> None:
        w.add_name("fuzz")
        w.add_chat_template("{% for m in messages %}{{ m.content }}{% endfor %}")
        w.add_array("tokenizer.ggml.tokens", ["a", "b", "<s>"])
        w.add_array("tokenizer.ggml.scores", [0.5, 0.25, 0.0])
        w.add_uint64("fuzz.u64", 7)
        w.add_bool("fuzz.flag", True)
        w.add_float64("fuzz.f64", 1.5)

    return write_llama_gguf(path, embd_rows=3, metadata=every_kind)


@pytest.fixture(scope="module")
def seed_files(tmp_path_factory) -> list[tuple[bytes, list[tuple[int, int]]]]:
    """(bytes, structural fields) per seed; a field is (byte offset, width 4 or 8)."""
    root = tmp_path_factory.mktemp("seeds")
    seeds = [write_small_gguf(root / "small.gguf"), write_small_gguf(root / "aligned.gguf", 1, alignment=64),
             _with_metadata(root / "meta.gguf")]
    return [(p.read_bytes(), structural_fields(p.read_bytes())) for p in seeds]


def structural_fields(data: bytes) -> list[tuple[int, int]]:
    """Offsets of every count, length, type, dimension and offset field of a well-formed GGUF."""
    fields = [(0, 4), (4, 4), (8, 8), (16, 8)]
    n_tensors, n_kv = struct.unpack_from("<QQ", data, 8)
    pos = 24

    def string(at: int) -> int:
        fields.append((at, 8))
        return at + 8 + struct.unpack_from("<Q", data, at)[0]

    def value(at: int, vtype: int) -> int:
        if vtype == GGUFValueType.STRING:
            return string(at)
        if vtype == GGUFValueType.ARRAY:
            fields.extend([(at, 4), (at + 4, 8)])
            itype, count = struct.unpack_from("<IQ", data, at)
            at += 12
            for _ in range(count):
                at = value(at, itype)
            return at
        return at + struct.calcsize(gv._SCALARS[GGUFValueType(vtype).name])

    for _ in range(n_kv):
        pos = string(pos)
        fields.append((pos, 4))
        vtype = struct.unpack_from("<I", data, pos)[0]
        pos = value(pos + 4, vtype)
    for _ in range(n_tensors):
        pos = string(pos)
        fields.append((pos, 4))
        n_dims = struct.unpack_from("<I", data, pos)[0]
        pos += 4
        for _ in range(n_dims):
            fields.append((pos, 8))
            pos += 8
        fields.extend([(pos, 4), (pos + 4, 8)])
        pos += 12
    return fields


def mutate(data: bytes, fields: list[tuple[int, int]], draw) -> bytes:
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["field", "field", "field", "flip", "cut", "splice", "magic"]))
        if kind == "field" and fields:
            at, width = draw(st.sampled_from(fields))
            if at + width > len(buf):
                continue
            old = int.from_bytes(buf[at:at + width], "little")
            new = draw(st.one_of(st.sampled_from(INTERESTING), st.integers(0, 2**64 - 1),
                                 st.integers(-3, 3).map(lambda d: old + d)))
            buf[at:at + width] = (new % (1 << (8 * width))).to_bytes(width, "little")
        elif kind == "flip" and buf:
            at = draw(st.integers(0, len(buf) - 1))
            buf[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            buf = buf[:draw(st.integers(0, len(buf)))]
        elif kind == "splice":
            at = draw(st.integers(0, len(buf)))
            buf[at:at + draw(st.integers(0, 16))] = draw(st.binary(max_size=16))
        elif kind == "magic":
            buf[0:4] = draw(st.sampled_from([b"GGUF", b"GGUX", b"FUGG", b"\0\0\0\0", b"GGML", b"GGJT"]))
    return bytes(buf)


class CountingReader(io.BufferedReader):
    """The verifier's file, counting its reads and seeks to bound its work by the file's size."""

    operations = 0

    def read(self, *args):
        CountingReader.operations += 1
        return super().read(*args)

    def seek(self, *args):
        CountingReader.operations += 1
        return super().seek(*args)


def _counting_open(path, mode="rb", buffering=io.DEFAULT_BUFFER_SIZE):
    return CountingReader(io.FileIO(path, "rb"), buffer_size=max(buffering, 1))


def check_one(path: Path, monkeypatch) -> None:
    size = path.stat().st_size
    CountingReader.operations = 0
    monkeypatch.setattr(gv, "open", _counting_open, raising=False)
    tracemalloc.start()
    try:
        gv.verify_gguf(path)
    except UserError as exc:
        message = str(exc)
        assert message.startswith(f"{path}: not a valid GGUF file: "), message
        assert message.isprintable() and len(message) < 1000, message  # one line, no terminal escapes
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak <= MEMORY_FACTOR * size + MEMORY_SLACK, (peak, size)
    assert CountingReader.operations <= 2 * size + 16, (CountingReader.operations, size)


@FUZZ
@given(data=st.data())
def test_mutated_files_raise_only_our_error_in_bounded_memory_and_work(tmp_path, seed_files, monkeypatch, data):
    seed, fields = data.draw(st.sampled_from(seed_files))
    path = tmp_path / "fuzz.gguf"
    path.write_bytes(mutate(seed, fields, data.draw))
    check_one(path, monkeypatch)


@pytest.mark.parametrize("claim", ["tensor_count", "kv_count", "key_length", "array_count", "block_count"])
def test_huge_claims_in_a_small_file_cost_nothing(tmp_path, seed_files, monkeypatch, claim):
    """Counts and lengths claiming 2**40..2**63 items are refused without allocating for them."""
    seed, fields = seed_files[2]
    buf = bytearray(seed)
    if claim == "tensor_count":
        struct.pack_into("<Q", buf, 8, 2**62)
    elif claim == "kv_count":
        struct.pack_into("<Q", buf, 16, 2**62)
    elif claim == "key_length":
        struct.pack_into("<Q", buf, 24, 2**63)
    elif claim == "array_count":
        at = seed.find(b"tokenizer.ggml.scores") + len("tokenizer.ggml.scores") + 4 + 4
        struct.pack_into("<Q", buf, at, 2**61)
    else:
        at = seed.find(b"llama.block_count") + len("llama.block_count") + 4
        struct.pack_into("<I", buf, at, 10**6)  # the old verifier built set(range(block_count))
    path = tmp_path / f"{claim}.gguf"
    path.write_bytes(bytes(buf))
    with pytest.raises(UserError, match="not a valid GGUF file"):
        gv.verify_gguf(path)
    check_one(path, monkeypatch)


def test_the_seeds_themselves_verify(seed_files, tmp_path):
    for i, (seed, fields) in enumerate(seed_files):
        path = tmp_path / f"seed{i}.gguf"
        path.write_bytes(seed)
        assert gv.verify_gguf(path).tensor_count >= 2
        assert len(fields) > 10


def _readers():
    from ollama_compress.hooks import modelfile, quantize, registration, source

    return {
        "import (check_gguf)": source.check_gguf,
        "import (import_gguf)": lambda p: source.import_gguf(p, p.parent / "out"),
        "import (cached)": source.imported_gguf_dir,
        "analyze/prune source": lambda p: source.resolve_model_dir(str(p)),
        "modelfile chat template": modelfile.read_gguf_chat_template,
        "register (file)": registration.verify_gguf_file,
        "register (path)": lambda p: registration.register_path(p, "m", family="chatml", host="127.0.0.1:9"),
        "quantize": lambda p: quantize.quantize_file(p, "Q8_0", p.parent / "q.gguf"),
        "evaluate (measure_quants)": lambda p: quantize.measure_quants(p, {"Q8_0": p}, ["text"]),
    }


@pytest.mark.parametrize("reader", sorted(_readers()))
def test_every_gguf_reader_goes_through_the_verifier_first(reader, tmp_path, monkeypatch):
    """A GGUF whose last tensor is cut short: only the verifier notices (gguf-py and llama.cpp
    headers would read as fine), so its message proves it ran before anything else."""
    monkeypatch.setenv("OLLAMA_COMPRESS_CACHE", str(tmp_path / "cache"))
    good = write_small_gguf(tmp_path / "good.gguf")
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(good.read_bytes()[:-1])
    with pytest.raises(UserError, match="not a valid GGUF file: .*runs past the end"):
        _readers()[reader](bad)
    assert not (tmp_path / "out").exists() and not (tmp_path / "q.gguf").exists()


def test_names_from_the_file_cannot_break_the_message_line(tmp_path, seed_files):
    """A key named "general\\n\\x1b[31m..." with a bad value type: the message names it escaped."""
    seed = bytearray(seed_files[0][0])
    at = seed.find(b"general.name")
    seed[at + 7:at + 10] = b"\n\x1b["
    struct.pack_into("<I", seed, at + len(b"general.name"), 99)
    path = tmp_path / "named.gguf"
    path.write_bytes(bytes(seed))
    with pytest.raises(UserError, match="unknown value type 99") as info:
        gv.verify_gguf(path)
    assert str(info.value).isprintable() and "\\x0a\\x1b" in str(info.value)
