"""Small GGUF files written with gguf-py for the verifier and quantization tests."""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
from gguf import GGUFReader, GGUFValueType, GGUFWriter


LLAMA_BLOCK_TENSORS = ("attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up",
                       "ffn_down")  # what llama.cpp's llama loader needs in every block


def add_llama_block_tensors(w: GGUFWriter, block: int, width: int = 32, skip: tuple[str, ...] = (), seed: int = 0) -> None:
    """Every tensor llama.cpp's llama needs in block ``block``: norms of ``width`` ones (F32),
    matrices of 8 x ``width`` (F16); names in ``skip`` left out."""
    rng = np.random.default_rng(seed + block)
    for kind in LLAMA_BLOCK_TENSORS:
        if kind in skip:
            continue
        if kind.endswith("norm"):
            w.add_tensor(f"blk.{block}.{kind}.weight", np.ones(width, np.float32))
        else:
            w.add_tensor(f"blk.{block}.{kind}.weight", rng.standard_normal((8, width)).astype(np.float16))


def write_small_gguf(path: Path, block_count: int = 2, alignment: int | None = None) -> Path:
    """A minimal well-formed llama-style GGUF (no tokenizer): every tensor llama.cpp's llama needs,
    tiny (norms F32, matrices F16).

    The last tensor is 32 floats (128 bytes), a multiple of the alignment, so the file ends exactly
    at the end of its data: cutting one byte cuts tensor data.
    """
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(block_count)
    w.add_name("sample")
    w.add_file_type(0)
    if alignment is not None:
        w.add_custom_alignment(alignment)
    rng = np.random.default_rng(0)
    w.add_tensor("token_embd.weight", rng.standard_normal((16, 32), dtype=np.float32))
    for i in range(block_count):
        add_llama_block_tensors(w, i)
    w.add_tensor("output_norm.weight", np.ones(32, np.float32))
    finish(w)
    return Path(path)


def write_llama_gguf(path: Path, block_count: int = 1, skip: tuple[str, ...] = (), width: int = 32,
                     embd_rows: int = 4, metadata: Callable[[GGUFWriter], None] | None = None,
                     **uint32_keys: int) -> Path:
    """A llama-style GGUF llama.cpp's loader accepts (no tokenizer), all ones but the matrices:
    ``metadata(w)`` adds the test's own keys (and tensors, written first), ``uint32_keys`` become
    ``llama.<key>`` (``__`` for a dot: ``attention__head_count``); the names in ``skip`` are left out
    of the last block."""
    w = GGUFWriter(str(path), "llama")
    w.add_block_count(block_count)
    for key, value in uint32_keys.items():
        w.add_uint32(f"llama.{key.replace('__', '.')}", value)
    if metadata is not None:
        metadata(w)
    w.add_tensor("token_embd.weight", np.ones((embd_rows, width), np.float32))
    for i in range(block_count):
        add_llama_block_tensors(w, i, width, skip=skip if i == block_count - 1 else ())
    w.add_tensor("output_norm.weight", np.ones(width, np.float32))
    finish(w)
    return Path(path)


def finish(w: GGUFWriter) -> None:
    """Write the header, the key-values and the tensors of ``w`` to its file, and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _copy_tokenizer(w: GGUFWriter, source_gguf: Path) -> None:
    """Copy every ``tokenizer.*`` key of ``source_gguf`` (SmolLM2's BPE vocabulary)."""
    reader = GGUFReader(str(source_gguf))
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[1] if vtype == GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)


def write_tiny_llama_gguf(path: Path, tokenizer_gguf: Path, hidden: int = 256, layers: int = 2,
                          ffn: int = 512, heads: int = 4, kv_heads: int = 2, seed: int = 0,
                          dtype=np.float16) -> Path:
    """A random-weight llama GGUF llama.cpp can load and run, with SmolLM2's tokenizer.

    ``hidden`` and ``ffn`` multiples of 256 let the k-quants quantize every matrix (narrower
    rows fall back to Q5_0/Q8_0 in llama.cpp). Weights use std 0.05, so logits are neither flat
    nor one-hot. Matrices are written in ``dtype`` (F16 by default), norms in F32.
    """
    reader_vocab = len(GGUFReader(str(tokenizer_gguf)).fields["tokenizer.ggml.tokens"].data)
    head_dim = hidden // heads
    rng = np.random.default_rng(seed)

    def matrix(rows: int, cols: int) -> np.ndarray:
        return (rng.standard_normal((rows, cols), dtype=np.float32) * 0.05).astype(dtype)

    def norm(n: int) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n, dtype=np.float32)).astype(np.float32)

    w = GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(layers)
    w.add_context_length(512)
    w.add_embedding_length(hidden)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(reader_vocab)
    w.add_file_type(1 if dtype == np.float16 else 0)
    _copy_tokenizer(w, tokenizer_gguf)
    w.add_tensor("token_embd.weight", matrix(reader_vocab, hidden))
    for i in range(layers):
        w.add_tensor(f"blk.{i}.attn_norm.weight", norm(hidden))
        w.add_tensor(f"blk.{i}.attn_q.weight", matrix(hidden, hidden))
        w.add_tensor(f"blk.{i}.attn_k.weight", matrix(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_v.weight", matrix(kv_heads * head_dim, hidden))
        w.add_tensor(f"blk.{i}.attn_output.weight", matrix(hidden, hidden))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", norm(hidden))
        w.add_tensor(f"blk.{i}.ffn_gate.weight", matrix(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_up.weight", matrix(ffn, hidden))
        w.add_tensor(f"blk.{i}.ffn_down.weight", matrix(hidden, ffn))
    w.add_tensor("output_norm.weight", norm(hidden))
    finish(w)
    return Path(path)
