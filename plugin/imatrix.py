"""Importance matrices for llama.cpp's low-bit quants, computed in PyTorch.

An importance matrix holds, for every weight matrix llama.cpp quantizes with one (each
``blk.N.*.weight`` used in a matrix multiplication), the per-column mean of the squared
activations that enter it: ``llama-imatrix`` accumulates exactly that while running text through
the model. ``compute_imatrix`` gets the same numbers from the HF model with forward pre-hooks on
its ``nn.Linear`` layers, names them with the GGUF tensor names (gguf-py's TensorNameMap for the
exported file's architecture) and writes the GGUF imatrix format that the bundled llama.cpp's
``llama-quantize --imatrix`` reads (tools/imatrix/imatrix.cpp ``save_imatrix``):

* tensors ``NAME.in_sum2`` (F32, row width x n_mat: the sums of squares) and ``NAME.counts``
  (F32, 1 x n_mat: how many activation rows were summed);
* keys ``general.type = "imatrix"``, ``imatrix.datasets``, ``imatrix.chunk_count``,
  ``imatrix.chunk_size``.

``read_imatrix`` reads that format and llama.cpp's legacy ``.dat`` one; ``check_imatrix``
checks a file against the GGUF it will quantize (names and widths), so a mismatch is one line
before llama-quantize starts.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import modelio
from .errors import UserError
from .fsutil import atomic_path
from .gguf_verify import GGUFSummary, verify_gguf
from .options import RunOptions

KEY_DATASETS = "imatrix.datasets"
KEY_CHUNK_COUNT = "imatrix.chunk_count"
KEY_CHUNK_SIZE = "imatrix.chunk_size"
SUMS, COUNTS = ".in_sum2", ".counts"


@dataclass
class Imatrix:
    """Per tensor name: column sums of squared activations and how many rows were summed."""

    sums: dict[str, Any] = field(default_factory=dict)  # name -> float64 array [width]
    counts: dict[str, int] = field(default_factory=dict)
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0

    def mean(self, name: str) -> Any:
        """What llama-quantize uses: the per-column mean of squared activations."""
        return self.sums[name] / max(self.counts[name], 1)


# ---------------------------------------------------------------- computing
def gguf_names(arch: str, n_blocks: int, hf_names: Iterable[str]) -> dict[str, str]:
    """HF module name -> GGUF weight name for the block matrices of ``arch`` (gguf-py's map)."""
    import gguf

    arch_ids = {name: arch_id for arch_id, name in gguf.MODEL_ARCH_NAMES.items()}
    if arch not in arch_ids:
        raise UserError(f"gguf-py does not know the architecture '{arch}'; cannot name an importance matrix for it")
    tmap = gguf.get_tensor_name_map(arch_ids[arch], n_blocks)
    names = {}
    for hf in hf_names:
        found = tmap.get_name(hf + ".weight", try_suffixes=(".weight",))
        if found is not None and found.startswith("blk."):
            names[hf] = found
    return names


def collect_imatrix(model: Any, batches: Iterable[Any], names: dict[str, str]) -> Imatrix:
    """Run ``batches`` (LongTensors [batch, seq]) through ``model`` and sum the squared inputs of
    each ``nn.Linear`` in ``names`` (HF module name -> GGUF name), column by column."""
    import torch

    result = Imatrix()
    modules = dict(model.named_modules())
    handles = []

    def hook_for(gguf_name: str):
        def accumulate(module, inputs):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float32)
            result.sums[gguf_name] = result.sums.get(gguf_name, 0) + (x * x).sum(0, dtype=torch.float64)
            result.counts[gguf_name] = result.counts.get(gguf_name, 0) + x.shape[0]
        return accumulate

    for hf_name, gguf_name in names.items():
        if isinstance(modules.get(hf_name), torch.nn.Linear):
            handles.append(modules[hf_name].register_forward_pre_hook(hook_for(gguf_name)))
    try:
        with torch.inference_mode():
            for batch in batches:
                result.chunk_size = int(batch.shape[-1])
                result.chunk_count += int(batch.shape[0])
                model(input_ids=batch, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    result.sums = {k: v.cpu().numpy() for k, v in result.sums.items()}
    return result


def compute_imatrix(model_dir: Path, gguf_path: Path, batches: list[Any], out: Path, dataset: str,
                    device: str = "cpu", options: RunOptions | None = None) -> Path:
    """The importance matrix of the HF model in ``model_dir`` over ``batches``, named for the GGUF
    ``gguf_path`` exported from it, checked against that file and written to ``out`` (atomically)."""
    summary = verify_gguf(gguf_path)
    model = modelio.load_model(model_dir, options, dtype="float32", device=device)
    names = gguf_names(summary.architecture or "", summary.block_count or 0, (n for n, _ in model.named_modules()))
    matrix = collect_imatrix(model, (b.to(device) for b in batches), names)
    del model
    matrix.datasets = [dataset]
    check_imatrix(matrix, summary)
    return write_imatrix(matrix, out)


# ---------------------------------------------------------------- the file format
def write_imatrix(matrix: Imatrix, path: Path) -> Path:
    """Write ``matrix`` in llama.cpp's GGUF imatrix format, atomically."""
    import gguf
    import numpy as np

    with atomic_path(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch="imatrix")
        # An imatrix file has no architecture (llama-imatrix writes none); GGUFWriter always adds one.
        writer.kv_data[0].pop(gguf.Keys.General.ARCHITECTURE, None)
        writer.add_type("imatrix")
        writer.add_array(KEY_DATASETS, list(matrix.datasets))
        writer.add_uint32(KEY_CHUNK_COUNT, matrix.chunk_count)
        writer.add_uint32(KEY_CHUNK_SIZE, matrix.chunk_size)
        for name in sorted(matrix.sums):
            writer.add_tensor(name + SUMS, np.asarray(matrix.sums[name], dtype=np.float32).reshape(1, -1))
            writer.add_tensor(name + COUNTS, np.array([[matrix.counts[name]]], dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return Path(path)


def read_imatrix(path: Path) -> Imatrix:
    """Read a GGUF (``*.gguf``, llama-imatrix's default) or legacy ``.dat`` importance matrix.

    UserError for a missing, truncated or malformed file, or one with non-finite values.
    """
    import numpy as np

    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: importance matrix file not found")
    with open(path, "rb") as f:
        magic = f.read(4)
    matrix = _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)
    if not matrix.sums:
        raise UserError(f"{path}: the importance matrix has no entries")
    for name, sums in matrix.sums.items():
        if not np.isfinite(sums).all() or not math.isfinite(matrix.counts[name]):
            raise UserError(f"{path}: non-finite values for {name}; recompute the importance matrix")
        if matrix.counts[name] <= 0:
            raise UserError(f"{path}: no activations were counted for {name}; recompute the importance matrix")
    return matrix


def _read_gguf(path: Path) -> Imatrix:
    import numpy as np
    from gguf import GGUFReader

    summary = verify_gguf(path)  # UserError "not a valid GGUF file: truncated ..." and the like
    if summary.metadata.get("general.type") != "imatrix":
        raise UserError(f"{path}: a GGUF file but not an importance matrix (general.type is not 'imatrix')")
    reader = GGUFReader(path)
    tensors = {t.name: np.asarray(t.data, dtype=np.float64).reshape(-1) for t in reader.tensors}
    datasets = reader.fields.get(KEY_DATASETS)
    matrix = Imatrix(datasets=[str(d) for d in datasets.contents()] if datasets is not None else [],
                     chunk_count=int(summary.metadata.get(KEY_CHUNK_COUNT, 0)),
                     chunk_size=int(summary.metadata.get(KEY_CHUNK_SIZE, 0)))
    for name in tensors:
        if not name.endswith(SUMS):
            continue
        base = name.removesuffix(SUMS)
        counts = tensors.get(base + COUNTS)
        if counts is None or counts.size != 1:
            raise UserError(f"{path}: {base} has no single count (expert-wise matrices are not supported)")
        matrix.sums[base], matrix.counts[base] = tensors[name], float(counts[0])
    return matrix


def _read_legacy(path: Path) -> Imatrix:
    """llama.cpp's old ``.dat``: entries of (name, ncall, values = mean * ncall)."""
    import numpy as np

    data = path.read_bytes()
    pos = 0

    def take(fmt: str) -> tuple:
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(data):
            raise UserError(f"{path}: truncated importance matrix (ends inside an entry); recompute it")
        values = struct.unpack_from(fmt, data, pos)
        pos += size
        return values

    (n_entries,) = take("<i")
    if not 0 < n_entries < 1_000_000:
        raise UserError(f"{path}: not an importance matrix (neither GGUF nor llama.cpp's legacy .dat)")
    matrix = Imatrix()
    for _ in range(n_entries):
        (length,) = take("<i")
        name = bytes(take(f"<{length}s")[0]).decode("utf-8", errors="replace")
        ncall, nval = take("<ii")
        values = np.array(take(f"<{nval}f"), dtype=np.float64)
        # legacy values are mean * ncall; keep (sums, counts) so that mean() is the mean
        matrix.sums[name], matrix.counts[name] = values, ncall if ncall > 0 else 1
    if pos + 4 <= len(data):
        (matrix.chunk_count,) = take("<i")
        if pos + 4 <= len(data):
            (length,) = take("<i")
            matrix.datasets = [bytes(take(f"<{length}s")[0]).decode("utf-8", errors="replace")]
    return matrix


# ---------------------------------------------------------------- checking against a model
def check_imatrix(matrix: Imatrix | Path, model: GGUFSummary | Path) -> Imatrix:
    """Check that an importance matrix fits a GGUF model: every entry names one of its block
    matrices with the same row width, and every block matrix has an entry. UserError otherwise."""
    source = matrix if isinstance(matrix, Path) else None
    matrix = read_imatrix(matrix) if isinstance(matrix, Path) else matrix
    summary = model if isinstance(model, GGUFSummary) else verify_gguf(model)
    where = f"{source}: " if source else ""
    widths = {t.name: t.shape[0] for t in summary.tensors
              if t.name.startswith("blk.") and t.name.endswith(".weight") and len(t.shape) == 2}
    unknown = sorted(set(matrix.sums) - set(widths))
    if unknown:
        raise UserError(f"{where}importance matrix entry {unknown[0]} (and {len(unknown) - 1} more) is not a "
                        f"matrix of {summary.path.name}; it was made for another model, recompute it")
    for name, sums in sorted(matrix.sums.items()):
        if len(sums) != widths[name]:
            raise UserError(f"{where}importance matrix entry {name} has {len(sums)} columns but "
                            f"{summary.path.name} has {widths[name]}; it was made for another model, recompute it")
    missing = sorted(set(widths) - set(matrix.sums))
    if missing:
        raise UserError(f"{where}importance matrix has no entry for {missing[0]} (and {len(missing) - 1} more) of "
                        f"{summary.path.name}; it was made for another model, recompute it")
    return matrix
