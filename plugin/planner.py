"""Size and memory planning from a model's shape, read without loading any weight.

The shape comes from ``config.json`` and the safetensors headers of an HF directory, or from the
tensor table of a GGUF file. From it: the parameter count, the GGUF size of each quant, how many
layers a size target allows, and the heal's memory. Sizes are estimates: llama.cpp keeps some
tensors at other types (norms in F32, tensors whose rows don't divide into blocks fall back).
"""
from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import UserError

# Average bits per weight of llama.cpp's file types on llama-like models (the quantizer's own
# table of sizes for an 8B model, divided by its parameter count; block types by their layout).
BITS_PER_WEIGHT = {
    "F32": 32.0, "F16": 16.0, "BF16": 16.0, "Q8_0": 8.5, "Q6_K": 6.56, "Q5_K_M": 5.69, "Q5_K_S": 5.54,
    "Q5_0": 5.5, "Q5_1": 6.0, "Q4_K_M": 4.89, "Q4_K_S": 4.58, "Q4_0": 4.5, "Q4_1": 5.0, "IQ4_XS": 4.25,
    "IQ4_NL": 4.5, "Q3_K_L": 4.27, "Q3_K_M": 3.91, "Q3_K_S": 3.5, "Q2_K": 3.35, "Q2_K_S": 3.18,
    "IQ3_XXS": 3.06, "IQ3_XS": 3.3, "IQ3_S": 3.44, "IQ3_M": 3.66, "IQ2_XXS": 2.06, "IQ2_XS": 2.31,
    "IQ2_S": 2.5, "IQ2_M": 2.7, "IQ1_S": 1.56, "IQ1_M": 1.75,
}
LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|blk)\.(\d+)\.")
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                           "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a model: per decoder layer, and outside the layers."""

    layer_params: tuple[int, ...]
    other_params: int
    hidden_size: int
    vocab_size: int

    @property
    def num_layers(self) -> int:
        return len(self.layer_params)

    def params(self, removed: int = 0) -> int:
        """Parameters with ``removed`` average layers taken out."""
        per_layer = sum(self.layer_params) / max(1, self.num_layers)
        return int(self.other_params + sum(self.layer_params) - removed * per_layer)


def _count(shape: list[int]) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


def _add(counts: dict[int, int], name: str, params: int) -> int:
    """Add ``params`` to its layer's count; returns what is not in a layer."""
    found = LAYER_INDEX.search(name)
    if found is None:
        return params
    counts[int(found.group(1))] = counts.get(int(found.group(1)), 0) + params
    return 0


def _safetensors_header(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise UserError(f"{path} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > min(path.stat().st_size, 100 * 2**20):
            raise UserError(f"{path} has a corrupt safetensors header (length {size})")
        try:
            return json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{path} has a corrupt safetensors header") from None


def shape_of_hf_dir(model_dir: Path) -> ModelShape:
    """The shape of an HF directory from config.json and the safetensors headers only."""
    from .modelio import read_config

    config = read_config(model_dir)
    counts: dict[int, int] = {}
    other = 0
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        for name, info in _safetensors_header(file).items():
            if name != "__metadata__":
                other += _add(counts, name, _count(info["shape"]))
    text = config.get("text_config", config)
    return ModelShape(tuple(counts[i] for i in sorted(counts)), other, int(text.get("hidden_size", 0)),
                      int(text.get("vocab_size", 0)))


def shape_of_gguf(path: Path) -> ModelShape:
    """The shape of a GGUF file from its tensor table (the tensor data is not read)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    counts: dict[int, int] = {}
    other = 0
    hidden = vocab = 0
    for tensor in reader.tensors:
        other += _add(counts, tensor.name, int(tensor.n_elements))
        if tensor.name == "token_embd.weight":
            hidden, vocab = int(tensor.shape[0]), int(tensor.shape[1])
    return ModelShape(tuple(counts[i] for i in sorted(counts)), other, hidden, vocab)


def model_shape(path: Path) -> ModelShape:
    path = Path(path)
    return shape_of_gguf(path) if path.is_file() else shape_of_hf_dir(path)


def gguf_bytes(params: int, quant: str) -> int:
    """Estimated GGUF file size of ``params`` parameters at ``quant``."""
    return int(params * BITS_PER_WEIGHT[quant] / 8)


def parse_count(text: str | int) -> int:
    """``100M``, ``1.5B``, ``250k`` or a plain number -> an int; UserError otherwise."""
    if isinstance(text, int):
        return text
    found = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMbB]?)\s*", str(text))
    if not found:
        raise UserError(f"'{text}' is not a parameter count; write e.g. 100M or 1.5B")
    scale = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9}[found.group(2).lower()]
    return int(float(found.group(1)) * scale)


def layers_to_remove(shape: ModelShape, *, size_mb: float | None = None, params: int | None = None,
                     quant: str = "Q4_K_M", keep_at_least: int = 2) -> int:
    """The fewest layers to remove so the model fits the target; UserError when none fits."""
    for removed in range(0, shape.num_layers - keep_at_least + 1):
        count = shape.params(removed)
        fits = (params is None or count <= params) and (
            size_mb is None or gguf_bytes(count, quant) <= size_mb * 2**20)
        if fits:
            return removed
    smallest = shape.params(shape.num_layers - keep_at_least)
    what = f"{size_mb:g} MB at {quant}" if size_mb is not None else f"{params:,} parameters"
    raise UserError(f"no model of this source fits {what}: keeping {keep_at_least} of {shape.num_layers} layers "
                    f"still leaves {smallest:,} parameters (~{gguf_bytes(smallest, quant) / 2**20:.0f} MB at "
                    f"{quant}); choose a larger target or a smaller source model")


def trainable_params(shape: ModelShape, removed: int, train: str) -> int:
    """Weights the heal trains: the layers next to the cuts (about two per removed layer) for
    ``neighbours``, the whole student otherwise (an upper bound for lora)."""
    if train != "neighbours":
        return shape.params(removed)
    per_layer = sum(shape.layer_params) / max(1, shape.num_layers)
    return int(per_layer * min(2 * max(1, removed), shape.num_layers - removed))


def heal_memory_bytes(teacher: ModelShape, student_params: int, trainable_params: int, *, micro_batch: int,
                      seq_len: int, layers: int, hidden: int, teacher_bytes: int = 4,
                      checkpointing: bool = True, logits_chunk: int = 1024, shards: int = 1) -> dict[str, int]:
    """Estimated peak memory of a heal: weights, gradients and AdamW state, activations, logits.

    Per process: ``shards`` > 1 (FSDP full shard over that many processes) divides the weights,
    gradients and optimizer state; activations and logits are each process's own.

    Student weights and master copies are fp32 (4 bytes), gradients fp32, AdamW two fp32 moments;
    the frozen teacher is held at ``teacher_bytes`` per parameter. Activations: with gradient
    checkpointing one hidden state per layer boundary is kept (plus one layer's working set,
    about 16 hidden-sized tensors); without it about 16 per layer. Logits: a chunk of tokens
    times the vocabulary, for teacher and student, in fp32.
    """
    tokens = micro_batch * seq_len
    per_layer = (1 if checkpointing else 16) * tokens * hidden * 4
    working = 16 * tokens * hidden * 4
    estimate = {
        "teacher_weights": teacher.params() * teacher_bytes // shards,
        "student_weights": student_params * 4 // shards,
        "gradients_and_optimizer": trainable_params * 12 // shards,
        "activations": layers * per_layer + working,
        "logits": 2 * min(tokens, logits_chunk) * teacher.vocab_size * 4 * 2,
    }
    estimate["total"] = sum(estimate.values())
    return estimate
