"""The GGUF verifier: accepts well-formed files, rejects each kind of corruption by name and reason."""
from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.quants import quantize as gguf_quantize

from gguf_samples import finish, write_llama_gguf, write_small_gguf
from ollama_compress.errors import UserError
from ollama_compress.gguf_verify import verify_gguf

LAST = "output_norm.weight"
MID = "blk.0.ffn_up.weight"


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> Path:
    return write_small_gguf(tmp_path_factory.mktemp("gguf") / "small.gguf")


def _tensor_info_pos(data: bytes, name: str) -> dict[str, int]:
    """Byte positions of one tensor-table entry, found from its name in the raw bytes."""
    start = data.find(struct.pack("<Q", len(name)) + name.encode())
    assert start > 0, name
    dims_at = start + 8 + len(name)
    n_dims = struct.unpack_from("<I", data, dims_at)[0]
    type_at = dims_at + 4 + 8 * n_dims
    return {"n_dims": dims_at, "type": type_at, "offset": type_at + 4}


def _offset(data: bytes, name: str) -> int:
    return struct.unpack_from("<Q", data, _tensor_info_pos(data, name)["offset"])[0]


def _put(data: bytes, at: int, fmt: str, value) -> bytes:
    buf = bytearray(data)
    struct.pack_into(fmt, buf, at, value)
    return bytes(buf)


def _first_key_end(data: bytes) -> int:
    return 24 + 8 + struct.unpack_from("<Q", data, 24)[0]


def _data_offset(path: Path) -> int:
    return int(GGUFReader(str(path)).data_offset)


# name -> (function(bytes, path) -> corrupted bytes, expected words in the reason)
CORRUPTIONS = {
    "bad_magic": (lambda d, p: b"GGUX" + d[4:], "bad magic"),
    "version_1": (lambda d, p: _put(d, 4, "<I", 1), "version 1"),
    "big_endian": (lambda d, p: _put(d, 4, ">I", 3), "big-endian"),
    "truncate_mid_header": (lambda d, p: d[:20], "truncated"),
    "truncate_mid_kv": (lambda d, p: d[: d.find(b"llama.block_count") + 5], "truncated"),
    "truncate_mid_tensor_table": (lambda d, p: d[: _tensor_info_pos(d, "blk.1.ffn_up.weight")["type"]], "truncated"),
    "truncate_all_data": (lambda d, p: d[: _data_offset(p)], "runs past the end"),
    "truncate_mid_data": (lambda d, p: d[:-1], "runs past the end"),
    "tensor_count_huge": (lambda d, p: _put(d, 8, "<Q", 2**40), "tensor count"),
    "tensor_count_plus_one": (lambda d, p: _put(d, 8, "<Q", struct.unpack_from("<Q", d, 8)[0] + 1), ""),
    "kv_count_huge": (lambda d, p: _put(d, 16, "<Q", 2**40), "key/value count"),
    "kv_count_plus_one": (lambda d, p: _put(d, 16, "<Q", struct.unpack_from("<Q", d, 16)[0] + 1), ""),
    "huge_string_length": (lambda d, p: _put(d, 24, "<Q", 2**50), "claims"),
    "unknown_value_type": (lambda d, p: _put(d, _first_key_end(d), "<I", 99), "unknown value type 99"),
    "unknown_tensor_type": (lambda d, p: _put(d, _tensor_info_pos(d, LAST)["type"], "<I", 99), "unknown ggml type"),
    "too_many_dims": (lambda d, p: _put(d, _tensor_info_pos(d, LAST)["n_dims"], "<I", 5), "dimensions"),
    "offset_past_end": (lambda d, p: _put(d, _tensor_info_pos(d, LAST)["offset"], "<Q", 1 << 30), "runs past the end"),
    "offset_misaligned": (lambda d, p: _put(d, _tensor_info_pos(d, LAST)["offset"], "<Q", _offset(d, LAST) + 4), "not aligned"),
    "offset_overlap": (lambda d, p: _put(d, _tensor_info_pos(d, LAST)["offset"], "<Q", 0), "overlaps"),
    "offset_gap": (lambda d, p: _put(d, _tensor_info_pos(d, MID)["offset"], "<Q", _offset(d, MID) + 32), "leaves a gap"),
    "block_count_mismatch": (lambda d, p: _put(d, d.find(b"llama.block_count") + 17 + 4, "<I", 3), "block_count is 3"),
    "block_count_too_small": (lambda d, p: _put(d, d.find(b"llama.block_count") + 17 + 4, "<I", 1), "unexpected blocks 1"),
}


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_rejects_corrupted(kind, small, tmp_path):
    corrupt, words = CORRUPTIONS[kind]
    bad = tmp_path / f"{kind}.gguf"
    bad.write_bytes(corrupt(small.read_bytes(), small))
    with pytest.raises(UserError) as info:
        verify_gguf(bad)
    message = str(info.value)
    assert message.startswith(f"{bad}: not a valid GGUF file: ")
    assert "\n" not in message
    assert words in message


@pytest.mark.parametrize("cut", [0, 3, 23, 100, 400])
def test_rejects_every_short_prefix(cut, small, tmp_path):
    bad = tmp_path / "short.gguf"
    bad.write_bytes(small.read_bytes()[:cut])
    with pytest.raises(UserError, match="not a valid GGUF file"):
        verify_gguf(bad)


def test_missing_and_directory(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        verify_gguf(tmp_path / "nope.gguf")
    with pytest.raises(UserError, match="not a regular file"):
        verify_gguf(tmp_path)


def _agrees_with_gguf_py(summary, path: Path) -> None:
    """Our parse gives the same tensor table as gguf-py's reader (an independent implementation)."""
    reader = GGUFReader(str(path))
    assert summary.tensor_count == len(reader.tensors)
    assert summary.data_offset == reader.data_offset
    for ours, theirs in zip(summary.tensors, reader.tensors):
        assert ours.name == theirs.name
        assert ours.type == theirs.tensor_type.name
        assert list(ours.shape) == [int(x) for x in theirs.shape]
        assert summary.data_offset + ours.offset == theirs.data_offset
        assert ours.nbytes == theirs.n_bytes


def test_accepts_small(small):
    summary = verify_gguf(small)
    assert (summary.version, summary.architecture, summary.block_count) == (3, "llama", 2)
    assert summary.alignment == 32 and summary.file_type == "F32"
    assert summary.size == small.stat().st_size
    _agrees_with_gguf_py(summary, small)


def test_accepts_custom_alignment_and_quantized_tensor(tmp_path):
    path = tmp_path / "q.gguf"

    def aligned_q8(w: GGUFWriter) -> None:
        w.add_custom_alignment(64)
        weights = np.random.default_rng(1).standard_normal((4, 64), dtype=np.float32)
        w.add_tensor("blk.0.ffn_up.weight", gguf_quantize(weights, GGMLQuantizationType.Q8_0),
                     raw_dtype=GGMLQuantizationType.Q8_0)

    write_llama_gguf(path, skip=("ffn_up",), width=64, metadata=aligned_q8)
    summary = verify_gguf(path)
    assert summary.alignment == 64 and summary.data_offset % 64 == 0
    q8 = summary.tensors[0]
    assert (q8.type, q8.shape, q8.nbytes) == ("Q8_0", (64, 4), 4 * 2 * 34)
    _agrees_with_gguf_py(summary, path)


def test_rejects_bad_alignment(tmp_path):
    path = tmp_path / "a.gguf"
    w = GGUFWriter(str(path), "llama")
    w.add_uint32("general.alignment", 48)
    w.add_tensor("x", np.ones(8, np.float32))
    finish(w)
    with pytest.raises(UserError, match="power of two"):
        verify_gguf(path)


@pytest.mark.slow
def test_accepts_real_smollm2(smollm2_gguf):
    summary = verify_gguf(smollm2_gguf)
    assert summary.architecture == "llama" and summary.block_count == 30
    assert summary.file_type == "Q4_1"
    assert 4.5 < summary.bits_per_weight < 8.5
    _agrees_with_gguf_py(summary, smollm2_gguf)


def _verify_group() -> click.Group:
    from ollama_compress.hooks import quantize

    @click.group()
    def group():
        pass

    quantize.register_commands(cli=group)
    return group


def test_verify_command_output(small, tmp_path):
    result = CliRunner().invoke(_verify_group(), ["verify", str(small)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{small}: GGUF v3, llama, 2 blocks")
    result = CliRunner().invoke(_verify_group(), ["verify", "--json", str(small), str(small)])
    rows = json.loads(result.output)
    assert [r["tensor_count"] for r in rows] == [20, 20]


def test_verify_command_exit_codes(small, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(small.read_bytes()[:-1])
    ok = subprocess.run([sys.executable, "-m", "ollama_compress", "verify", str(small)], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "2 blocks" in ok.stdout
    fail = subprocess.run([sys.executable, "-m", "ollama_compress", "verify", str(small), str(bad)],
                          capture_output=True, text=True)
    assert fail.returncode == 2
    assert fail.stderr.startswith(f"Error: {bad}: not a valid GGUF file: ")
    assert len(fail.stderr.strip().splitlines()) == 1
    assert "Traceback" not in fail.stderr
