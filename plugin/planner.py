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
from typing import TYPE_CHECKING, Any, Iterable

from .errors import UserError
from .gguf_verify import ggml_type_size, verify_gguf
from .modelio import read_config
from .quant_names import LEGACY_QUANTS, QUANTS, quantizable

if TYPE_CHECKING:  # pragma: no cover - the recipe schema imports this module
    from .recipe import Heal

LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|h|blocks|blk)\.(\d+)\.")
SAFETENSORS_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1,
                           "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class Tensor:
    """One weight: its llama.cpp role, decoder layer (None outside the layers) and GGUF shape
    (row length first)."""

    name: str
    role: str  # token_embd, output, attn_v, ffn_down, attn_output, weight (another matrix) or vector (1-D)
    layer: int | None
    dims: tuple[int, ...]

    @property
    def count(self) -> int:
        return _count(list(self.dims))


@dataclass(frozen=True)
class ModelShape:
    """Parameter counts of a model: per decoder layer, and outside the layers; with its tensors
    and the bytes of GGUF metadata (vocabulary, tensor table) when known."""

    layer_params: tuple[int, ...]
    other_params: int
    hidden_size: int
    vocab_size: int
    tensors: tuple[Tensor, ...] = ()
    metadata_bytes: int = 0
    intermediate_size: int = 0

    @property
    def num_layers(self) -> int:
        return len(self.layer_params)

    def params(self, removed: int = 0) -> int:
        """Parameters with ``removed`` average layers taken out."""
        per_layer = sum(self.layer_params) / max(1, self.num_layers)
        return int(self.other_params + sum(self.layer_params) - removed * per_layer)

    def kept_tensors(self, removed: int = 0) -> list[Tensor]:
        """The tensors with the last ``removed`` layers taken out (the layers of these models
        share one shape, so which ones go does not change the size)."""
        kept = self.num_layers - removed
        return [t for t in self.tensors if t.layer is None or t.layer < kept]


def parameter_count(model: Path) -> int:
    """Parameters of an HF directory (safetensors headers) or a GGUF file (tensor table)."""
    return model_shape(model).params()


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


ROLES = (("token_embd", ("embed_tokens", "token_embd", "wte", "tok_embeddings")),
         ("output", ("lm_head",)),
         ("attn_v", ("v_proj", "attn_v", "qkv_proj", "attn_qkv", "query_key_value")),
         ("ffn_down", ("down_proj", "ffn_down", "fc2", "mlp.c_proj")),
         ("attn_output", ("o_proj", "attn_output", "attn.c_proj")))


def _tensor(name: str, dims: tuple[int, ...]) -> Tensor:
    found = LAYER_INDEX.search(name)
    layer = int(found.group(1)) if found else None
    if len([d for d in dims if d > 1]) < 2:
        return Tensor(name, "vector", layer, dims)
    role = "output" if name == "output.weight" else next(
        (r for r, keys in ROLES if any(k in name for k in keys)), "weight")
    return Tensor(name, role, layer, dims)


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


def _shape(tensors: list[tuple[str, tuple[int, ...]]], metadata_bytes: int, hidden: int, vocab: int,
           intermediate: int) -> ModelShape:
    counts: dict[int, int] = {}
    other = 0
    for name, dims in tensors:
        other += _add(counts, name, _count(list(dims)))
    return ModelShape(tuple(counts[i] for i in sorted(counts)), other, hidden, vocab,
                      tuple(_tensor(name, dims) for name, dims in tensors), metadata_bytes, intermediate)


def _vocab_bytes(model_dir: Path) -> int:
    """GGUF bytes of the tokenizer in ``tokenizer.json``: each token and merge as a string (8-byte
    length + UTF-8), each token's type and score (4 + 4 bytes)."""
    try:
        model = json.loads((Path(model_dir) / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
    except (OSError, ValueError):
        return 0
    vocab = model.get("vocab") or {}
    tokens = list(vocab) if isinstance(vocab, dict) else [v[0] for v in vocab if v]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    return sum(16 + len(t.encode()) for t in tokens) + sum(8 + len(m.encode()) for m in merges)


GGUF_TENSOR_INFO = 48  # bytes per tensor-table entry besides its name (dims, type, offset, alignment)
GGUF_OTHER_METADATA = 8192  # architecture keys, chat template, general.*


def shape_of_hf_dir(model_dir: Path) -> ModelShape:
    """The shape of an HF directory from config.json and the safetensors headers only."""
    config = read_config(model_dir)
    tensors = []
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        for name, info in _safetensors_header(file).items():
            if name != "__metadata__":
                tensors.append((name, tuple(int(d) for d in reversed(info["shape"]))))
    text = config.get("text_config", config)
    table = sum(GGUF_TENSOR_INFO + len(name) for name, _ in tensors)
    return _shape(tensors, _vocab_bytes(model_dir) + table + GGUF_OTHER_METADATA, int(text.get("hidden_size", 0)),
                  int(text.get("vocab_size", 0)), int(text.get("intermediate_size", 0)))


def shape_of_gguf(path: Path) -> ModelShape:
    """The shape of a GGUF file from its header and tensor table (the tensor data is not read)."""
    summary = verify_gguf(path)
    meta, arch = summary.metadata, summary.architecture
    embed = next((t for t in summary.tensors if t.name == "token_embd.weight"), None)
    hidden, vocab = (int(embed.shape[0]), int(embed.shape[1])) if embed is not None else (0, 0)
    return _shape([(t.name, tuple(t.shape)) for t in summary.tensors], summary.data_offset, hidden, vocab,
                  int(meta.get(f"{arch}.feed_forward_length", 0) or 0))


def model_shape(path: Path) -> ModelShape:
    path = Path(path)
    return shape_of_gguf(path) if path.is_file() else shape_of_hf_dir(path)


def _more_bits(layer: int, layers: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth, and every third layer between."""
    return layer < layers // 8 or layer >= 7 * layers // 8 or (layer - layers // 8) % 3 == 2


def tensor_type(quant: str, tensor: Tensor, layers: int, tied: bool) -> str:
    """The ggml type llama-quantize gives ``tensor`` at ``quant`` (llama-quant.cpp's
    ``llama_tensor_get_type`` for dense models without an imatrix: the output matrix and tied
    embeddings at Q6_K, more bits on some attn_v / ffn_down / attn_output layers, then the
    fallback for rows that don't fit the type's blocks)."""
    if tensor.role == "vector":
        return "F32"
    chosen = QUANTS[quant].main_type
    if chosen in ("F32", "F16", "BF16"):
        return chosen
    role, layer = tensor.role, tensor.layer or 0
    if role == "output" or (tied and role == "token_embd"):
        if tensor.dims[0] % ggml_type_size(chosen)[0]:
            return "Q8_0"
        if quant in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            return "Q5_K"
        return _fallback(chosen if chosen == "Q8_0" else "Q6_K", tensor.dims[0])
    if role == "token_embd":
        chosen = {"IQ2_XXS": "Q2_K", "IQ2_XS": "Q2_K", "IQ1_S": "Q2_K", "IQ1_M": "Q2_K", "IQ2_S": "IQ3_S",
                  "IQ2_M": "IQ3_S", "IQ3_XXS": "IQ3_S"}.get(quant, chosen)
    elif role == "attn_v":
        chosen = {"Q2_K": "Q3_K", "Q3_K_M": "Q5_K" if layer < 2 else "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K",
                  "Q4_K_S": "Q5_K" if layer < 4 else chosen}.get(quant, chosen)
        if quant in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, layers):
            chosen = "Q6_K"
    elif role == "ffn_down":
        if quant == "Q2_K":
            chosen = "Q3_K"
        elif quant == "Q3_K_M":
            chosen = "Q5_K" if layer < layers // 16 else "Q4_K"
        elif quant == "Q3_K_L":
            chosen = "Q5_K"
        elif quant in ("Q4_K_M", "Q5_K_M") and _more_bits(layer, layers):
            chosen = "Q6_K"
        elif quant == "Q4_K_S" and layer < layers // 8:
            chosen = "Q5_K"
    elif role == "attn_output":
        chosen = {"Q2_K": "Q3_K", "IQ3_XXS": "IQ3_S", "Q3_K_M": "Q4_K", "Q3_K_L": "Q5_K", "IQ3_M": "Q4_K"}.get(
            quant, chosen)
    return _fallback(chosen, tensor.dims[0])


FALLBACK = {"IQ1_S": "IQ4_NL", "IQ1_M": "IQ4_NL", "IQ2_XXS": "IQ4_NL", "IQ2_XS": "IQ4_NL", "IQ2_S": "IQ4_NL",
            "IQ3_XXS": "IQ4_NL", "IQ3_S": "IQ4_NL", "IQ4_XS": "IQ4_NL", "Q2_K": "Q4_0", "Q3_K": "Q4_0",
            "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0"}


def _fallback(chosen: str, row: int) -> str:
    """llama.cpp's ``tensor_type_fallback``: a type of 32-element blocks when the row does not
    divide into 256, F16 when it does not divide into 32 either."""
    if row % ggml_type_size(chosen)[0] == 0:
        return chosen
    chosen = FALLBACK.get(chosen, chosen)
    return chosen if row % ggml_type_size(chosen)[0] == 0 else "F16"


def tensor_bytes(type_name: str, tensor: Tensor) -> int:
    block, size = ggml_type_size(type_name)
    return tensor.count // block * size


def gguf_size(shape: ModelShape, quant: str, removed: int = 0) -> int:
    """Estimated bytes of the GGUF file of ``shape`` (less ``removed`` layers) at ``quant``:
    each tensor at the type llama-quantize gives it, aligned to 32 bytes, plus the metadata."""
    tensors = shape.kept_tensors(removed)
    layers = shape.num_layers - removed
    tied = not any(t.role == "output" for t in tensors)
    data = sum(-(-tensor_bytes(tensor_type(quant, t, layers, tied), t) // 32) * 32 for t in tensors)
    return data + shape.metadata_bytes


def fewest_layers_removed(shape: ModelShape, *, size_mb: float | None = None, params: int | None = None,
                          quant: str = "Q4_K_M", most: int) -> int | None:
    """The fewest layers, at most ``most``, to remove so the model fits the target; None when none fits."""
    for removed in range(0, max(-1, most) + 1):
        fits = (params is None or shape.params(removed) <= params) and (
            size_mb is None or gguf_size(shape, quant, removed) <= size_mb * 2**20)
        if fits:
            return removed
    return None


def layers_to_remove(shape: ModelShape, *, size_mb: float | None = None, params: int | None = None,
                     quant: str = "Q4_K_M", keep_at_least: int = 2) -> int:
    """The fewest layers to remove so the model fits the target; UserError when none fits."""
    most = shape.num_layers - keep_at_least
    removed = fewest_layers_removed(shape, size_mb=size_mb, params=params, quant=quant, most=most)
    if removed is not None:
        return removed
    what = f"{size_mb:g} MB at {quant}" if size_mb is not None else f"{params:,} parameters"
    raise UserError(f"no model of this source fits {what}: keeping {keep_at_least} of {shape.num_layers} layers "
                    f"still leaves {shape.params(most):,} parameters (~{gguf_size(shape, quant, most) / 2**20:.0f} MB "
                    f"at {quant}); choose a larger target or a smaller source model")


RUNTIME_BYTES = 700 * 2**20  # Python, torch and transformers loaded, before any model (CPU resident set)
LAYER_SAVED_HIDDEN = 10  # hidden-sized tensors autograd keeps per decoder layer (norms, q/k/v, attention out, residuals)
LAYER_SAVED_INTERMEDIATE = 5  # intermediate-sized ones (gate, up, activation, product, down's input)
LOGITS_COPIES = 6  # vocabulary-sized fp32 tensors alive per chunk: both models' logits, log-softmaxes, the gradient


def trainable_params(shape: ModelShape, removed: int, train: str, lora_rank: int = 16) -> int:
    """Parameters the heal trains: every kept decoder layer (``all``), the two layers beside each
    cut (``neighbours``), or LoRA adapters of rank ``lora_rank`` on the layers' matrices (``lora``)."""
    kept = shape.layer_params[:shape.num_layers - removed]
    if train == "lora":
        matrices = [t for t in shape.kept_tensors(removed) if t.layer is not None and t.role != "vector"]
        return sum(lora_rank * (t.dims[0] + t.dims[1]) for t in matrices)
    if train == "neighbours":
        per_layer = sum(kept) / max(1, len(kept))
        return int(per_layer * min(2 * max(1, removed), len(kept))) + shape.hidden_size
    return sum(kept) + shape.hidden_size


def heal_memory_bytes(teacher: ModelShape, removed: int, settings: Heal, *, device: str = "cpu",
                      autocast: bool = False, chunk_tokens: int = 1024, shards: int = 1) -> dict[str, int]:
    """Estimated peak memory of a heal of ``teacher`` less ``removed`` layers with the ``Heal``
    section ``settings``: the one estimate behind ``--dry-run`` and heal's refusal check.

    Teacher weights (bf16 under autocast on CUDA, fp32 otherwise) and fp32 student weights; per
    trained parameter its gradient, AdamW's two moments and the foreach update's temporary (16
    bytes), plus a bf16 copy under autocast; what autograd keeps per decoder layer for one
    micro-batch (with gradient checkpointing only each layer's input, plus one layer's working
    set; SDPA keeps no attention probabilities); the teacher's layer outputs the losses compare; one
    chunk of vocabulary-sized logits; and, on a CPU, the process itself (``RUNTIME_BYTES``).
    Per process: ``shards`` > 1 (FSDP full shard over that many processes) divides the weights,
    gradients and optimizer state; activations and logits are each process's own.
    """
    micro = settings.micro_batch or settings.batch_size
    seq_len = settings.seq_len
    tokens = micro * seq_len
    layers = teacher.num_layers - removed
    cuda = device.startswith("cuda")
    checkpointing = settings.gradient_checkpointing if settings.gradient_checkpointing is not None else cuda
    act_bytes = 2 if autocast else 4
    inter = teacher.intermediate_size or 4 * teacher.hidden_size
    per_layer = tokens * (LAYER_SAVED_HIDDEN * teacher.hidden_size + LAYER_SAVED_INTERMEDIATE * inter) * act_bytes
    trained = trainable_params(teacher, removed, settings.train, settings.lora_rank)
    estimate = {
        "runtime": 0 if cuda else RUNTIME_BYTES,
        "teacher_weights": teacher.params() * (2 if cuda and autocast else 4) // shards,
        "student_weights": (teacher.params(removed) * 4 + (2 * trained if autocast else 0)) // shards,
        "gradients_and_optimizer": trained * 16 // shards,
        "activations": (layers * tokens * teacher.hidden_size * 4 + per_layer) if checkpointing
        else layers * per_layer + teacher.num_layers * tokens * teacher.hidden_size * 4,
        "logits": LOGITS_COPIES * min(tokens, chunk_tokens) * teacher.vocab_size * 4,
    }
    estimate["total"] = sum(estimate.values())
    return estimate


# ---------------------------------------------------------------- prune.select: measured
MEASURE_WINDOWS = 8  # calibration windows the finalist cuts are scored on (KL to the teacher)
SCREEN_WINDOWS = 2  # the first of them, on which every candidate is screened when there are more than FINALISTS
FINALISTS = 4  # the candidates with the lowest screen KL, scored again on all MEASURE_WINDOWS
MEASURED_AUTO_FLOPS = 5e13  # select: auto measures when the estimate is at most this (a few CPU minutes)


def index_runs(indices: Iterable[int]) -> list[tuple[int, int]]:
    """Layer indices as contiguous ``[start, end)`` runs, in order."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(indices)):
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def contiguous_starts(num_layers: int, n: int, protected: set[int]) -> list[int]:
    """Starts of the runs of ``n`` layers that avoid every protected layer."""
    return [s for s in range(num_layers - n + 1) if not protected.intersection(range(s, s + n))]


def screened(candidates: int, windows: int) -> bool:
    """Whether ``prune.select: measured`` screens its candidates on ``SCREEN_WINDOWS`` windows first."""
    return candidates > FINALISTS and windows > SCREEN_WINDOWS


def measured_select_cost(shape: ModelShape, n: int, protected: set[int], metrics: int, samples: int,
                         seq_len: int) -> dict[str, Any]:
    """Estimated work of ``prune.select: measured``: one teacher pass over the calibration text (the
    repair sums), then each candidate (every contiguous span plus each metric's pick) scored on
    ``SCREEN_WINDOWS`` windows and the ``FINALISTS`` lowest on ``MEASURE_WINDOWS`` (all candidates on
    ``MEASURE_WINDOWS`` when there are no more than ``FINALISTS``), with the teacher's logits computed
    once. A span starting at layer ``s`` runs from its repaired anchor ``s - 1`` on (the layers before
    it are replayed); a metric's pick is counted whole; a finalist counts as the average candidate.
    FLOPs: 2 x params per token."""
    starts = contiguous_starts(shape.num_layers, n, protected)
    candidates = len(starts) + metrics
    windows = min(MEASURE_WINDOWS, samples)
    scored = sum(shape.params(n + max(0, s - 1)) for s in starts) + metrics * shape.params(n)
    if screened(candidates, windows):  # the teacher runs on the screen's windows, then on all of them
        teacher_windows = SCREEN_WINDOWS + windows
        candidate_windows = candidates * SCREEN_WINDOWS + FINALISTS * windows
        scored_tokens = (scored * SCREEN_WINDOWS + scored / candidates * FINALISTS * windows) * seq_len
    else:
        teacher_windows = windows
        candidate_windows = candidates * windows
        scored_tokens = scored * windows * seq_len
    forwards = samples + teacher_windows + candidate_windows
    flops = 2 * shape.params() * (samples + teacher_windows) * seq_len + 2 * scored_tokens
    return {"candidates": candidates, "forward_passes": forwards, "tokens": forwards * seq_len, "flops": float(flops)}


# ---------------------------------------------------------------- prune.target.size_mb: cut + quant or quantize only
QUANTIZE_ONLY = "quantize only"  # the unpruned teacher at fewer bits
CUT_AND_QUANT = "cut + quant"  # layers removed, then quantized
QUANTIZE_ONLY_CANDIDATES = 2  # the teacher quants that fit, largest first
PLAN_WINDOWS = MEASURE_WINDOWS  # calibration windows each candidate's KL to the teacher is measured on


@dataclass(frozen=True)
class SizeCandidate:
    """One way to fit ``prune.target.size_mb``: ``removed`` layers cut (0 for quantize only), then ``quant``."""

    kind: str  # QUANTIZE_ONLY or CUT_AND_QUANT
    quant: str
    removed: int
    estimated_bytes: int

    @property
    def label(self) -> str:
        if self.kind == QUANTIZE_ONLY:
            return f"teacher {self.quant}"
        return f"{self.removed} layer{'s' if self.removed > 1 else ''} cut + {self.quant}"


def size_candidates(shape: ModelShape, size_mb: float, quant: str, *, imatrix: bool,
                    keep_at_least: int = 2) -> list[SizeCandidate]:
    """What ``prune.target: {size_mb, quant}`` compares, from the shape alone (``gguf_size``): the
    ``QUANTIZE_ONLY_CANDIDATES`` largest teacher quants of ``quantizable(imatrix)`` that fit, then
    ``quant`` with the fewest layers cut that fit, and the next quant with more bits than ``quant``
    with its own fewest cut while at least half the layers stay; never ``LEGACY_QUANTS`` but
    ``quant`` itself. A cut of 0 layers is a quantize-only candidate already. UserError when nothing
    fits."""
    limit = size_mb * 2**20
    quants = [q for q in quantizable(imatrix) if q not in LEGACY_QUANTS]
    whole = {q: gguf_size(shape, q) for q in quants}
    fitting = sorted((q for q in quants if whole[q] <= limit), key=lambda q: -whole[q])
    candidates = [SizeCandidate(QUANTIZE_ONLY, q, 0, whole[q]) for q in fitting[:QUANTIZE_ONLY_CANDIDATES]]
    own = gguf_size(shape, quant)
    larger = sorted((q for q in quants if whole[q] > own), key=lambda q: whole[q])[:1]
    most = shape.num_layers - keep_at_least
    for cut_quant, most_removed in ((quant, most), *((q, min(most, shape.num_layers // 2)) for q in larger)):
        removed = fewest_layers_removed(shape, size_mb=size_mb, quant=cut_quant, most=most_removed)
        if removed:
            candidates.append(SizeCandidate(CUT_AND_QUANT, cut_quant, removed, gguf_size(shape, cut_quant, removed)))
    if not candidates:
        layers_to_remove(shape, size_mb=size_mb, quant=quant, keep_at_least=keep_at_least)  # says what fits
    return candidates


def size_plan_cost(candidates: list[SizeCandidate], samples: int, seq_len: int) -> dict[str, Any]:
    """The work of measuring ``candidates``: an unquantized GGUF of the teacher and of each cut size, one
    quantization per candidate, the teacher's PyTorch pass over ``PLAN_WINDOWS`` calibration windows
    and each candidate's llama.cpp pass over them (each cut's own choice of layers comes on top:
    ``measured_select_cost``)."""
    windows = min(PLAN_WINDOWS, samples)
    cuts = len({c.removed for c in candidates if c.kind == CUT_AND_QUANT})  # quants of one cut share its export
    forwards = windows * (1 + len(candidates))
    return {"candidates": len(candidates), "gguf_exports": 1 + cuts, "quantizations": len(candidates),
            "windows": windows, "forward_passes": forwards, "tokens": forwards * seq_len}
