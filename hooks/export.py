"""Export: a Hugging Face directory -> one GGUF file (F32, F16 or BF16) that llama.cpp and Ollama load.

The layout follows what llama.cpp's own ``convert_hf_to_gguf.py`` writes for each supported family
(metadata keys, tensor names, Q/K row order, tied embeddings, norm offsets), written with gguf-py.

Memory stays bounded: a first pass plans every tensor from the safetensors headers only (name,
shape, type), the header and tensor index are written, then each tensor is read, converted and
appended on its own. The file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from hashlib import sha256
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import click
import numpy as np

from ollama_compress.context import RunOptions, StageContext
from ollama_compress.errors import NotAvailable, StageFailed, UserError
from ollama_compress.fsutil import atomic_path, check_free_space, tree_sha256
from ollama_compress.hookspecs import hookimpl

OUTTYPES = ("F32", "F16", "BF16")
META_PREFIX = "ollama_compress."
QK_K = 256  # block size of llama.cpp's k-quants and 256-wide i-quants
QK_SMALL = 32  # block size of the legacy quants (Q4_0, Q5_0, Q8_0, IQ4_NL)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------- architectures
@dataclass(frozen=True)
class ArchSpec:
    """How one HF family maps onto a llama.cpp architecture."""

    arch: str  # gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's llama ropes interleaved pairs; HF stores rotate-half rows
    norm_shift: float = 0.0  # gemma RMSNorm computes x * (1 + w); llama.cpp computes x * w
    always_tied: bool = False  # llama.cpp's gemma2 has no output tensor: it always reuses token_embd


ARCHS: dict[str, ArchSpec] = {
    "llama": ArchSpec("LLAMA", permute_qk=True),
    "mistral": ArchSpec("LLAMA", permute_qk=True),  # llama.cpp converts Mistral as llama
    "qwen2": ArchSpec("QWEN2"),
    "qwen3": ArchSpec("QWEN3"),
    "gemma2": ArchSpec("GEMMA2", norm_shift=1.0, always_tied=True),
    "gemma3_text": ArchSpec("GEMMA3", norm_shift=1.0),  # Gemma3ForCausalLM
    "phi3": ArchSpec("PHI3"),
}
SUPPORTED = "llama, mistral, qwen2, qwen3, gemma2, gemma3 (text-only, gemma3_text), phi3"

# llama.cpp special-cases the 27B gemmas' attention scale by their layer count (llama-model.cpp).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}

# Tensors HF keeps that llama.cpp recomputes.
_SKIP_SUFFIXES = (".rotary_emb.inv_freq", ".attention.masked_bias", ".attention.bias")


def _gguf():
    import gguf

    return gguf


def read_model_config(model_dir: Path):
    """(model_type, ArchSpec, transformers config) of ``model_dir``; UserError when unsupported."""
    from ollama_compress.modelio import read_config

    raw = read_config(model_dir)
    model_type = raw.get("model_type")
    spec = ARCHS.get(model_type or "")
    if spec is None:
        what = model_type or ", ".join(raw.get("architectures") or []) or "unknown"
        raise UserError(f"{model_dir}: architecture '{what}' cannot be exported to GGUF; supported: {SUPPORTED}")
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except (ValueError, OSError) as exc:
        raise UserError(f"cannot read {model_dir / 'config.json'}: {exc}") from None
    return model_type, spec, config


# ------------------------------------------------------------------------- safetensors index
def _weight_files(model_dir: Path) -> list[Path]:
    """The safetensors shards the index names (a repo may also hold e.g. consolidated.safetensors)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError) as exc:
            raise UserError(f"{index} is not a valid safetensors index: {exc}") from None
        missing = [s for s in sorted(shards) if not (model_dir / s).is_file()]
        if missing:
            raise UserError(f"{model_dir} lacks weight shards listed in its index: {', '.join(missing[:3])}")
        return [model_dir / s for s in sorted(shards)]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise UserError(f"{model_dir} has no *.safetensors weights; GGUF export reads safetensors only")
    return files


def _tensor_index(model_dir: Path) -> dict[str, tuple[Path, tuple[int, ...]]]:
    """HF tensor name -> (file, shape), read from the safetensors headers (no data)."""
    from safetensors import safe_open

    index: dict[str, tuple[Path, tuple[int, ...]]] = {}
    for path in _weight_files(model_dir):
        try:
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    index[name] = (path, tuple(f.get_slice(name).get_shape()))
        except Exception as exc:  # safetensors raises its own error types for bad headers
            raise UserError(f"{path} is not a readable safetensors file: {exc}") from None
    return index


def _read_tensor(path: Path, name: str):
    """One tensor as float32, read on its own (the file is mapped only while reading it)."""
    import torch
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return f.get_tensor(name).to(torch.float32)


def _block_id(name: str) -> int | None:
    for part in name.split("."):
        if part.isdecimal():
            return int(part)
    return None


# ------------------------------------------------------------------------- hyperparameters
def _rope_params(config, kind: str = "full_attention") -> dict[str, Any]:
    """Rope settings for one attention kind, from transformers 5 ``rope_parameters`` or 4's fields."""
    params = dict(getattr(config, "rope_parameters", None) or {})
    if kind in params or "full_attention" in params:
        params = dict(params.get(kind) or {})
    scaling = getattr(config, "rope_scaling", None)
    if isinstance(scaling, dict) and kind not in scaling:
        params = {**scaling, **params}
    if "rope_theta" not in params and getattr(config, "rope_theta", None) is not None:
        params["rope_theta"] = config.rope_theta
    if "rope_type" not in params and "type" in params:
        params["rope_type"] = params["type"]
    return params


def _head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _layer_is_swa(config) -> list[bool] | None:
    types = getattr(config, "layer_types", None)
    if not types:
        return None
    return [t == "sliding_attention" for t in types]


def _write_rope_scaling(w, rope: dict[str, Any], config) -> None:
    gguf = _gguf()
    kind = (rope.get("rope_type") or "default").lower()
    factor = rope.get("factor")
    if kind == "linear" and factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        orig = rope.get("original_max_position_embeddings") or getattr(config, "original_max_position_embeddings", None)
        if orig:
            w.add_rope_scaling_orig_ctx_len(orig)
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
    elif kind in ("su", "longrope"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    elif kind not in ("default", "llama3"):
        raise UserError(f"rope scaling '{kind}' is not supported by the GGUF export")


def _write_common(w, config, n_layers: int, ftype) -> None:
    w.add_block_count(n_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    rope = _rope_params(config)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    if getattr(config, "head_dim", None):
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    w.add_file_type(ftype)


def _write_hparams(w, model_type: str, config, n_layers: int, ftype) -> None:
    """The ``{arch}.*`` keys llama.cpp reads for this family."""
    _write_common(w, config, n_layers, ftype)
    rope = _rope_params(config)
    if model_type in ("llama", "mistral"):
        w.add_vocab_size(config.vocab_size)
        w.add_rope_dimension_count(_head_dim(config))
        _write_rope_scaling(w, rope, config)
    elif model_type in ("qwen2", "qwen3"):
        _write_rope_scaling(w, rope, config)
    elif model_type == "gemma2":
        if config.attn_logit_softcapping:
            w.add_attn_logit_softcapping(config.attn_logit_softcapping)
        if config.final_logit_softcapping:
            w.add_final_logit_softcapping(config.final_logit_softcapping)
        w.add_sliding_window(config.sliding_window)
        if (pattern := _layer_is_swa(config)) is not None:
            w.add_sliding_window_pattern(pattern[:n_layers])
    elif model_type == "gemma3_text":
        local = _rope_params(config, "sliding_attention").get("rope_theta") or getattr(config, "rope_local_base_freq", None)
        if local is not None:
            w.add_rope_freq_base_swa(float(local))
            w.add_float32(f"{w.arch}.rope.local.freq_base", float(local))  # the key Ollama's own engine reads
        if getattr(config, "final_logit_softcapping", None):
            w.add_final_logit_softcapping(config.final_logit_softcapping)
        pattern = _layer_is_swa(config)
        if config.sliding_window and (pattern is None or any(pattern)):
            w.add_sliding_window(config.sliding_window)
            if pattern is not None:
                w.add_sliding_window_pattern(pattern[:n_layers])
        _write_rope_scaling(w, rope, config)
    elif model_type == "phi3":
        orig = getattr(config, "original_max_position_embeddings", None) or rope.get("original_max_position_embeddings")
        if orig:
            w.add_rope_scaling_orig_ctx_len(orig)
        w.add_rope_dimension_count(_phi3_rope_dims(config))
        w.add_sliding_window(getattr(config, "sliding_window", None) or 0)
        _write_rope_scaling(w, rope, config)
        if rope.get("long_factor"):
            w.add_rope_scaling_attn_factors(_phi3_attn_factor(config, rope))


def _phi3_rope_dims(config) -> int:
    factor = _rope_params(config).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", 1.0) or 1.0
    return int(factor * config.hidden_size) // config.num_attention_heads


def _phi3_attn_factor(config, rope: dict[str, Any]) -> float:
    orig = getattr(config, "original_max_position_embeddings", None) or rope["original_max_position_embeddings"]
    scale = config.max_position_embeddings / orig
    if scale <= 1.0:
        return 1.0
    if (rope.get("rope_type") or "").lower() == "yarn":
        return 0.1 * math.log(scale) + 1.0
    return math.sqrt(1 + math.log(scale) / math.log(orig))


# ------------------------------------------------------------------------- tensor plan
@dataclass
class PlannedTensor:
    """One GGUF tensor: where its data comes from and what it becomes."""

    name: str
    shape: tuple[int, ...]  # numpy order (rows, cols); GGUF stores it reversed
    qtype: Any  # gguf.GGMLQuantizationType
    load: Callable[[], Any]  # -> float32 torch tensor with the final values
    source: str = ""

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * (4 if self.qtype.name == "F32" else 2)


def _permute_rows(t, n_head: int):
    """HF rotate-half row order -> llama.cpp's interleaved (GPT-J) order, per head."""
    rows = t.shape[0]
    return t.reshape(n_head, 2, rows // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def _gemma_query_scale(model_type: str, config, n_layers: int) -> float:
    """Factor folded into the queries so llama.cpp's fixed attention scale equals HF's.

    HF scales scores by ``query_pre_attn_scalar ** -0.5``; llama.cpp by ``head_dim ** -0.5``, or by
    ``(n_embd / n_head) ** -0.5`` when the layer count says 27B (which pruning changes).
    """
    scalar = getattr(config, "query_pre_attn_scalar", None)
    if model_type not in _GEMMA_27B_LAYERS or not scalar:
        return 1.0
    if n_layers == _GEMMA_27B_LAYERS[model_type]:
        cpp = (config.hidden_size / config.num_attention_heads) ** -0.5
    else:
        cpp = _head_dim(config) ** -0.5
    factor = scalar ** -0.5 / cpp
    return 1.0 if abs(factor - 1.0) < 1e-7 else factor


def _transform(hf_name: str, model_type: str, spec: ArchSpec, config, query_scale: float):
    """The value changes one HF tensor needs (returns a function of the float32 tensor)."""
    n_head = config.num_attention_heads
    n_kv = getattr(config, "num_key_value_heads", None) or n_head
    steps: list[Callable] = []
    if spec.permute_qk and hf_name.endswith(("q_proj.weight", "q_proj.bias")):
        steps.append(lambda t: _permute_rows(t, n_head))
    if spec.permute_qk and hf_name.endswith(("k_proj.weight", "k_proj.bias")):
        steps.append(lambda t: _permute_rows(t, n_kv))
    if spec.norm_shift and hf_name.endswith("norm.weight"):
        steps.append(lambda t: t + spec.norm_shift)
    if query_scale != 1.0:
        # gemma3 normalizes q after the projection, so the factor goes on q_norm; gemma2 on q_proj
        target = "q_norm.weight" if model_type.startswith("gemma3") else ("q_proj.weight", "q_proj.bias")
        if hf_name.endswith(target):
            steps.append(lambda t: t * query_scale)

    def apply(t):
        for step in steps:
            t = step(t)
        return t

    return apply


def _tensor_qtype(gguf_name: str, shape: Sequence[int], outtype: str):
    """llama.cpp's rule: 1-D tensors and norms stay F32, every other weight gets ``outtype``."""
    gguf = _gguf()
    if len(shape) <= 1 or gguf_name.endswith("_norm.weight") or not gguf_name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    return getattr(gguf.GGMLQuantizationType, outtype)


def _is_tied(spec: ArchSpec, config) -> bool:
    if spec.always_tied:
        return True
    return bool(getattr(config, "tie_word_embeddings", False))


def plan_tensors(model_dir: Path, outtype: str = "F16") -> tuple[list[PlannedTensor], dict[str, Any]]:
    """Every GGUF tensor of ``model_dir`` with its name, shape and type, from the headers only."""
    gguf = _gguf()
    model_type, spec, config = read_model_config(model_dir)
    arch = getattr(gguf.MODEL_ARCH, spec.arch)
    n_layers = config.num_hidden_layers
    name_map = gguf.get_tensor_name_map(arch, n_layers)
    query_scale = _gemma_query_scale(model_type, config, n_layers)
    tied = _is_tied(spec, config)
    index = _tensor_index(model_dir)
    planned: list[PlannedTensor] = []
    unknown: list[str] = []
    for hf_name, (path, shape) in index.items():
        if hf_name.endswith(_SKIP_SUFFIXES):
            continue
        if hf_name == "lm_head.weight" and tied:
            continue  # llama.cpp reuses token_embd when there is no output tensor
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            unknown.append(hf_name)
            continue
        fix = _transform(hf_name, model_type, spec, config, query_scale)
        planned.append(PlannedTensor(
            gguf_name, shape, _tensor_qtype(gguf_name, shape, outtype),
            lambda p=path, n=hf_name, f=fix: f(_read_tensor(p, n)), hf_name,
        ))
    if unknown:
        shown = ", ".join(unknown[:5]) + (" ..." if len(unknown) > 5 else "")
        raise UserError(f"{model_dir}: {len(unknown)} tensor(s) have no llama.cpp {spec.arch.lower()} name ({shown}); "
                        f"this {model_type} variant is not supported")
    planned.extend(_extra_tensors(model_type, config))
    _check_layers(planned, n_layers, model_dir)
    planned.sort(key=_tensor_order)
    info = {"model_type": model_type, "arch": gguf.MODEL_ARCH_NAMES[arch], "spec": spec, "config": config,
            "n_layers": n_layers, "tied": tied, "query_scale": query_scale}
    return planned, info


def _tensor_order(t: PlannedTensor) -> tuple[int, int, str]:
    """token_embd and friends, then blk.0 .. blk.N, then output_norm/output."""
    bid = _block_id(t.name)
    if bid is not None:
        return (1, bid, t.name)
    return (2 if t.name.startswith("output") else 0, 0, t.name)


def _check_layers(planned: list[PlannedTensor], n_layers: int, model_dir: Path) -> None:
    blocks = {_block_id(t.name) for t in planned} - {None}
    if blocks != set(range(n_layers)):
        raise UserError(f"{model_dir}: config.json says {n_layers} layers but the weights hold blocks "
                        f"{sorted(blocks)[:8]}...; the directory is inconsistent")
    if not any(t.name == "token_embd.weight" for t in planned):
        raise UserError(f"{model_dir}: no token embedding tensor found")


def _extra_tensors(model_type: str, config) -> Iterable[PlannedTensor]:
    """Tensors llama.cpp wants that HF computes on the fly: llama3 rope factors, phi3 longrope factors."""
    import torch

    gguf = _gguf()
    f32 = gguf.GGMLQuantizationType.F32
    rope = _rope_params(config)
    kind = (rope.get("rope_type") or "").lower()
    if model_type in ("llama", "mistral") and kind == "llama3":
        factors = _llama3_rope_factors(config, rope)
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        yield PlannedTensor(name, (len(factors),), f32, lambda: torch.tensor(factors, dtype=torch.float32), "rope")
    if model_type == "phi3" and rope.get("long_factor"):
        long_f, short_f = list(rope["long_factor"]), list(rope["short_factor"])
        if len(long_f) != len(short_f) or len(long_f) * 2 != _phi3_rope_dims(config):
            raise UserError("phi3 rope long/short factors do not match the rope dimension; config.json is inconsistent")
        for key, values in ((gguf.MODEL_TENSOR.ROPE_FACTORS_LONG, long_f), (gguf.MODEL_TENSOR.ROPE_FACTORS_SHORT, short_f)):
            yield PlannedTensor(gguf.TENSOR_NAMES[key] + ".weight", (len(values),), f32,
                                lambda v=values: torch.tensor(v, dtype=torch.float32), "rope")


def _llama3_rope_factors(config, rope: dict[str, Any]) -> list[float]:
    """Per-frequency divisors of Llama 3.x rope scaling (wavelength bands: keep, scale, blend)."""
    base = rope.get("rope_theta", 10000.0)
    dim = _head_dim(config)
    factor = rope.get("factor", 8.0)
    low, high = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    out = []
    for i in range(0, dim, 2):
        wavelen = 2 * math.pi * base ** (i / dim)
        if wavelen < high_wavelen:
            out.append(1.0)
        elif wavelen > low_wavelen:
            out.append(float(factor))
        else:
            smooth = (old_ctx / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return out


# ------------------------------------------------------------------------- tokenizer
# llama.cpp identifies a BPE pre-tokenizer by hashing the token ids of this text (the same string as
# convert_hf_to_gguf.py's get_vocab_base_pre, so the hashes below are comparable).
CHK_TEXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
# Known hashes of the supported families' BPE tokenizers -> llama.cpp's pre-tokenizer name.
KNOWN_PRE = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",  # SmolLM, SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3.x
    "c136ed14d01c2745d4f60a9596ae66800e2b61fa45643e72436041855ad4089d": "smaug-bpe",  # Llama 3 variants
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",  # Qwen1.5 / Qwen2 / Qwen2.5
    "d4540891389ea895b53b399da6ac824becc30f2fba0e9ddbb98f92e55ca0e97c": "qwen2",  # Qwen3
    "b3f499bb4255f8ca19fccd664443283318f2fd2414d5e0b040fbdd0cc195d6c5": "deepseek-r1-qwen",
    "63b97e4253352e6f357cc59ea5b583e3a680eaeaf2632188c2b952de2588485e": "tekken",  # Mistral Nemo
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "fcace8b9cac38ce847670c970cd5892031a753a1ef381abd1d9af00f713da085": "phi-2",
}
# When the hash is unknown (a retrained or edited tokenizer), the family's usual pre-tokenizer.
FAMILY_PRE = {"qwen2": "qwen2", "qwen3": "qwen2", "llama": "llama-bpe", "mistral": "tekken"}


@dataclass
class Vocab:
    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[Any]
    types: list[int]
    scores: list[float] | None = None
    notes: list[str] = field(default_factory=list)

    def approx_bytes(self, model_dir: Path) -> int:
        """Bytes the vocabulary takes in the GGUF (merges bounded by the tokenizer files' size)."""
        files = sum((model_dir / n).stat().st_size for n in ("tokenizer.json", "merges.txt") if (model_dir / n).is_file())
        return sum(len(t) + 16 for t in self.tokens) + files


def bpe_pre_name(tokenizer, model_type: str) -> tuple[str, str | None]:
    """(pre-tokenizer name, note) by llama.cpp's hash rule, with a family fallback (noted)."""
    ids = tokenizer.encode(CHK_TEXT)
    digest = sha256(str(ids).encode()).hexdigest()
    if digest in KNOWN_PRE:
        return KNOWN_PRE[digest], None
    pre = FAMILY_PRE.get(model_type, "default")
    return pre, (f"unknown BPE pre-tokenizer (hash {digest[:12]}); using '{pre}', the usual one for "
                 f"{model_type}: check that llama.cpp tokenizes like transformers")


def _bpe_vocab(tokenizer, n_vocab: int, model_type: str) -> Vocab:
    gguf = _gguf()
    T = gguf.TokenType
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise UserError(f"the tokenizer has ids up to {max(vocab.values())} but the embedding has only {n_vocab} rows")
    by_id = {i: tok for tok, i in vocab.items()}
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
            continue
        token = by_id[i]
        if i in added:
            entry = added[i]
            if not entry.normalized:  # llama.cpp expects added tokens in their normalized form
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            if entry.special or _looks_special(token):
                types.append(T.CONTROL)
            else:
                token = token.replace("\u2581", " ")
                types.append(T.USER_DEFINED)
        else:
            types.append(T.NORMAL)
        tokens.append(token)
    pre, note = bpe_pre_name(tokenizer, model_type)
    return Vocab("gpt2", pre, tokens, types, notes=[note] if note else [])


def _looks_special(token: str) -> bool:
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>") or \
        (token.startswith("<unused") and token.endswith(">"))


def _spm_vocab(model_dir: Path, n_vocab: int) -> Vocab:
    """SentencePiece tokens, scores and types from tokenizer.model, plus added tokens."""
    from sentencepiece import SentencePieceProcessor

    gguf = _gguf()
    T = gguf.TokenType
    sp = SentencePieceProcessor()
    sp.LoadFromFile(str(model_dir / "tokenizer.model"))
    if sp.vocab_size() > n_vocab:
        raise UserError(f"tokenizer.model has {sp.vocab_size()} pieces but the embedding has only {n_vocab} rows")
    tokens: list[bytes] = [f"[PAD{i}]".encode() for i in range(n_vocab)]
    scores = [-1000.0] * n_vocab
    types = [int(T.UNUSED)] * n_vocab
    for i in range(sp.vocab_size()):
        tokens[i] = sp.IdToPiece(i).encode("utf-8")
        scores[i] = sp.GetScore(i)
        types[i] = int(T.UNKNOWN if sp.IsUnknown(i) else T.CONTROL if sp.IsControl(i)
                       else T.UNUSED if sp.IsUnused(i) else T.BYTE if sp.IsByte(i) else T.NORMAL)
    for i, content, special in _added_tokens(model_dir):
        if i >= n_vocab:
            continue
        text = content if special or _looks_special(content) else content.replace("\u2581", " ")
        tokens[i], scores[i] = text.encode("utf-8"), -1000.0
        types[i] = int(T.CONTROL if special or _looks_special(content) else T.USER_DEFINED)
    return Vocab("llama", "default", tokens, types, scores=scores)


def _added_tokens(model_dir: Path) -> list[tuple[int, str, bool]]:
    found: dict[int, tuple[str, bool]] = {}
    cfg_file, tok_file = model_dir / "tokenizer_config.json", model_dir / "tokenizer.json"
    if tok_file.is_file():
        for entry in json.loads(tok_file.read_text(encoding="utf-8")).get("added_tokens", []):
            found[int(entry["id"])] = (entry["content"], bool(entry.get("special")))
    if cfg_file.is_file():
        for key, entry in (json.loads(cfg_file.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}).items():
            found[int(key)] = (entry["content"], bool(entry.get("special")))
    return [(i, c, s) for i, (c, s) in sorted(found.items())]


def _hf_spm_vocab(model_dir: Path, n_vocab: int) -> Vocab:
    """A SentencePiece-style BPE that only exists as tokenizer.json (byte_fallback BPE)."""
    gguf = _gguf()
    hf = gguf.LlamaHfVocab(model_dir)
    tokens, scores, types = [], [], []
    for text, score, kind in hf.all_tokens():
        tokens.append(text)
        scores.append(score)
        types.append(int(kind))
    if len(tokens) > n_vocab:
        raise UserError(f"the tokenizer has {len(tokens)} tokens but the embedding has only {n_vocab} rows")
    for i in range(len(tokens), n_vocab):
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return Vocab("llama", "default", tokens, types, scores=scores)


def _tokenizer_kind(model_dir: Path) -> str:
    if (model_dir / "tokenizer.model").is_file():
        return "spm"
    tok_file = model_dir / "tokenizer.json"
    if tok_file.is_file():
        model = json.loads(tok_file.read_text(encoding="utf-8")).get("model", {})
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            return "hf_spm"
        if model.get("type") == "BPE":
            return "bpe"
        raise UserError(f"{tok_file}: tokenizer model '{model.get('type')}' is not supported for GGUF export")
    if (model_dir / "vocab.json").is_file() and (model_dir / "merges.txt").is_file():
        return "bpe"
    raise UserError(f"{model_dir} has no tokenizer (tokenizer.json or tokenizer.model); copy it from the source model")


def build_vocab(model_dir: Path, model_type: str, n_vocab: int, tokenizer=None) -> Vocab:
    """The GGUF vocabulary of ``model_dir``, padded to the embedding's ``n_vocab`` rows."""
    kind = _tokenizer_kind(model_dir)
    if kind == "spm":
        return _spm_vocab(model_dir, n_vocab)
    if kind == "hf_spm":
        return _hf_spm_vocab(model_dir, n_vocab)
    if tokenizer is None:
        raise UserError(f"cannot load the tokenizer of {model_dir}")
    return _bpe_vocab(tokenizer, n_vocab, model_type)


def _load_tokenizer(model_dir: Path, options: RunOptions):
    from ollama_compress.modelio import load_tokenizer

    try:
        return load_tokenizer(model_dir, options)
    except Exception as exc:  # transformers raises many types for a broken tokenizer
        log.warning("cannot load the tokenizer of %s with transformers: %s", model_dir, exc)
        return None


def _write_vocab(w, vocab: Vocab, model_dir: Path, tokenizer, model_type: str) -> None:
    """Tokens, merges, special ids, add_bos/add_eos and chat template."""
    gguf = _gguf()
    w.add_tokenizer_model(vocab.model)
    w.add_tokenizer_pre(vocab.pre)
    w.add_token_list(vocab.tokens)
    w.add_token_types(vocab.types)
    if vocab.scores is not None:
        w.add_token_scores(vocab.scores)
    if model_type.startswith("gemma") and vocab.model == "llama":
        w.add_add_space_prefix(False)
    special = gguf.SpecialVocab(model_dir, load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    _fill_special_from_tokenizer(special, tokenizer, len(vocab.tokens))
    special.add_to_gguf(w, quiet=True)


def _fill_special_from_tokenizer(special, tokenizer, n_vocab: int) -> None:
    """Special ids and whether BOS/EOS are added, as the transformers tokenizer actually behaves."""
    if tokenizer is None:
        return
    for kind in ("bos", "eos", "unk", "pad"):
        tid = getattr(tokenizer, f"{kind}_token_id", None)
        if isinstance(tid, int) and 0 <= tid < n_vocab:
            special.special_token_ids[kind] = tid
    probe = "Hello world"
    with_special = tokenizer(probe)["input_ids"]
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    extra = len(with_special) > len(bare)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    special.add_special_token["bos"] = bool(extra and bos is not None and with_special[0] == bos)
    special.add_special_token["eos"] = bool(extra and eos is not None and with_special[-1] == eos)
    if special.chat_template is None and isinstance(getattr(tokenizer, "chat_template", None), str):
        special.chat_template = tokenizer.chat_template


# ------------------------------------------------------------------------- metadata
def _layer_map(model_dir: Path) -> dict[str, Any]:
    path = model_dir / "layer_map.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def layer_map_keys(model_dir: Path) -> dict[str, Any]:
    """Provenance keys from the prune stage's ``layer_map.json`` in ``model_dir`` (empty if none)."""
    out: dict[str, Any] = {}
    layer_map = _layer_map(model_dir)
    if isinstance(layer_map.get("removed"), list):
        out["removed_layers"] = [int(i) for i in layer_map["removed"]]
    if isinstance(layer_map.get("student_to_teacher"), list):
        out["layer_map"] = [int(i) for i in layer_map["student_to_teacher"]]
    if isinstance(layer_map.get("num_layers_before"), int):
        out["teacher_layers"] = layer_map["num_layers_before"]
    if isinstance(layer_map.get("metric"), str):
        out["prune_metric"] = layer_map["metric"]
    return out


def provenance(model_dir: Path, metadata: dict[str, Any] | None) -> dict[str, Any]:
    """Our own ``ollama_compress.*`` keys: source hash, layer map, recipe, plus the caller's."""
    out = layer_map_keys(model_dir)
    for key, value in (metadata or {}).items():
        if not key.startswith("general.") and key not in ("name", "license", "base_model", "description"):
            out[key.removeprefix(META_PREFIX)] = value
    out.setdefault("source_sha256", tree_sha256(model_dir))
    return out


def _add_value(w, key: str, value: Any) -> None:
    if isinstance(value, bool):
        w.add_bool(key, value)
    elif isinstance(value, int):
        w.add_int64(key, value)
    elif isinstance(value, float):
        w.add_float64(key, value)
    elif isinstance(value, str):
        if value:
            w.add_string(key, value)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        w.add_array(key, [int(v) for v in value])
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        w.add_array(key, list(value))
    elif value is not None and value != [] and value != {}:
        w.add_string(key, json.dumps(value, sort_keys=True, default=str))


# llama.cpp looks these tokens up (and fails to load) when general.name contains "phi3" or "phi-3".
_PHI3_NAME_TOKENS = ("</s>", "<unk>", "<s>", "<|endoftext|>")


def _loadable_name(name: str, tokens: Sequence[Any]) -> str:
    """``name``, unless it would make llama.cpp apply Phi-3 token rules to a vocabulary without them."""
    lowered = name.lower()
    if "phi3" not in lowered and "phi-3" not in lowered:
        return name
    texts = {t.decode("utf-8", "replace") if isinstance(t, bytes) else t for t in tokens}
    if all(tok in texts for tok in _PHI3_NAME_TOKENS):
        return name
    import re

    safe = re.sub(r"(?i)phi-?3", lambda m: m.group(0)[:3] + " 3", name)
    log.warning("model name %r renamed %r: llama.cpp expects Phi-3 tokens for such names", name, safe)
    return safe


def _write_general(w, model_dir: Path, metadata: dict[str, Any], total_params: int, tokens: Sequence[Any]) -> None:
    gguf = _gguf()
    meta = gguf.Metadata.load(None, model_dir, metadata.get("name") or metadata.get("general.name"), total_params)
    if meta.name is None:
        meta.name = model_dir.name
    meta.name = _loadable_name(meta.name, tokens)
    if metadata.get("license"):
        meta.license = metadata["license"]
    if metadata.get("description"):
        meta.description = metadata["description"]
    base = metadata.get("base_model")
    if base:
        names = [base] if isinstance(base, str) else list(base)
        meta.base_models = [{"name": n, **({"repo_url": f"https://huggingface.co/{n}"} if "/" in n and not Path(n).exists() else {})}
                            for n in names]
    if meta.size_label is None and total_params > 0:
        meta.size_label = gguf.size_label(total_params, total_params, 0, 0)
    w.add_type(gguf.GGUFType.MODEL)
    meta.set_gguf_meta_model(w)


# ------------------------------------------------------------------------- writing
def _ftype(outtype: str):
    gguf = _gguf()
    return {"F32": gguf.LlamaFileType.ALL_F32, "F16": gguf.LlamaFileType.MOSTLY_F16,
            "BF16": gguf.LlamaFileType.MOSTLY_BF16}[outtype]


def _to_numpy(t, qtype) -> np.ndarray:
    import torch

    if qtype.name == "F32":
        return t.contiguous().numpy()
    if qtype.name == "F16":
        return t.to(torch.float16).contiguous().numpy()
    return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()  # raw BF16 bits


def _check_output_dir(out_path: Path) -> None:
    parent = out_path.parent
    for p in (parent, *parent.parents):
        if p.exists():
            if not p.is_dir():
                raise UserError(f"{p} is a file, not a directory; choose another output directory")
            break
    if out_path.is_dir():
        raise UserError(f"{out_path} is a directory; give a .gguf file path")


def _check_disk(out_path: Path, needed: int) -> None:
    check_free_space(out_path.parent, needed, out_path.name)


def expected_size(planned: list[PlannedTensor], vocab_bytes: int = 0) -> int:
    """Bytes the GGUF will take: aligned tensor data plus header, metadata and vocabulary."""
    align = 32
    data = sum((t.nbytes + align - 1) // align * align for t in planned)
    index = sum(len(t.name) + 48 for t in planned)
    return data + index + vocab_bytes + (1 << 20)


def export_gguf(model_dir: Path, out_path: Path, outtype: str = "F16", metadata: dict | None = None,
                options: RunOptions | None = None) -> Path:
    """Write ``model_dir`` (an HF causal LM, safetensors) as one GGUF of ``outtype`` at ``out_path``.

    ``metadata`` may set ``name``, ``license``, ``base_model``, ``description`` (general.*) and any
    further keys, stored as ``ollama_compress.<key>`` next to the source hash and the prune stage's
    ``layer_map.json``. Tensors are streamed one at a time; the file appears only when complete.
    """
    from ollama_compress.modelio import check_causal_lm, check_model_dir

    options = options or RunOptions()
    outtype = outtype.upper()
    if outtype not in OUTTYPES:
        raise UserError(f"unknown outtype '{outtype}'; choose one of {', '.join(OUTTYPES)}")
    model_dir, out_path = Path(model_dir), Path(out_path)
    check_model_dir(model_dir, options)
    read_model_config(model_dir)  # names an unsupported architecture before anything else
    check_causal_lm(model_dir)
    _check_output_dir(out_path)
    metadata = dict(metadata or {})

    writer, planned = _prepare(model_dir, out_path, outtype, metadata, options)
    with atomic_path(out_path) as tmp:
        try:
            writer.write_header_to_file(tmp)
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in planned:
                _write_one(writer, t)
        finally:
            writer.close()
    return out_path


def _prepare(model_dir: Path, out_path: Path, outtype: str, metadata: dict[str, Any], options: RunOptions):
    """A GGUFWriter holding every key and tensor index entry, and the tensors to stream after them."""
    gguf = _gguf()
    planned, info = plan_tensors(model_dir, outtype)
    n_vocab = next(t.shape[0] for t in planned if t.name == "token_embd.weight")
    tokenizer = _load_tokenizer(model_dir, options)
    vocab = build_vocab(model_dir, info["model_type"], n_vocab, tokenizer)
    for note in vocab.notes:
        log.warning(note)
    _check_disk(out_path, expected_size(planned, vocab.approx_bytes(model_dir)))

    w = gguf.GGUFWriter(None, info["arch"])
    total_params = sum(int(np.prod(t.shape)) for t in planned)
    _write_general(w, model_dir, metadata, total_params, vocab.tokens)
    _write_hparams(w, info["model_type"], info["config"], info["n_layers"], _ftype(outtype))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _write_vocab(w, vocab, model_dir, tokenizer, info["model_type"])
    for key, value in provenance(model_dir, metadata).items():
        _add_value(w, META_PREFIX + key, value)
    for t in planned:
        w.add_tensor_info(t.name, t.shape, _np_dtype(t.qtype), t.nbytes, raw_dtype=t.qtype)
    return w, planned


def _np_dtype(qtype):
    return {"F32": np.float32, "F16": np.float16}.get(qtype.name, np.int16)


def _write_one(w, t: PlannedTensor) -> None:
    data = t.load()
    if tuple(data.shape) != tuple(t.shape):
        raise StageFailed(f"tensor {t.source or t.name} changed shape while exporting: {tuple(data.shape)} != {t.shape}")
    array = _to_numpy(data, t.qtype)
    del data
    w.write_tensor_data(array)


# ------------------------------------------------------------------------- width warning
# llama.cpp's quantizer (llama-quant.cpp, tensor_type_fallback) swaps a 256-block type for a 32-block
# one on a tensor whose rows are not a multiple of 256, and for F16 when not a multiple of 32 either.
def _weight_shapes(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    """(GGUF name, numpy shape) of each 2-D weight of an HF directory or a GGUF file."""
    if path.is_file() and path.suffix == ".gguf":
        from gguf import GGUFReader

        try:
            reader = GGUFReader(path)
        except Exception as exc:  # gguf-py raises ValueError and others for bad files
            raise UserError(f"{path} is not a readable GGUF file: {exc}") from None
        return [(t.name, tuple(int(d) for d in reversed(t.shape))) for t in reader.tensors]
    planned, _ = plan_tensors(path, "F16")
    return [(t.name, t.shape) for t in planned]


def width_warnings(model_dir: Path) -> list[str]:
    """One line per row width that is not a multiple of 256, saying which quant types fall back.

    ``model_dir`` may be an HF directory or a GGUF file. Empty when every quantizable row fits.
    """
    by_width: dict[int, list[str]] = {}
    for name, shape in _weight_shapes(Path(model_dir)):
        if len(shape) == 2 and name.endswith(".weight") and not name.endswith("_norm.weight"):
            width = shape[-1]
            if width % QK_K:
                by_width.setdefault(width, []).append(name)
    lines = []
    for widths, effect in (
        ([w for w in by_width if w % QK_SMALL == 0],
         "llama.cpp quantizes them with a 32-block type instead (Q2_K/Q3_K->Q4_0, Q4_K->Q5_0, Q5_K->Q5_1, "
         "Q6_K->Q8_0, IQ4_XS and other i-quants->IQ4_NL), so K and IQ quants come out larger than nominal"),
        ([w for w in by_width if w % QK_SMALL], "every block quant falls back to F16 for them"),
    ):
        if widths:
            count = sum(len(by_width[w]) for w in widths)
            what = ", ".join(f"{w} (e.g. {by_width[w][0]})" for w in sorted(widths))
            lines.append(f"{count} tensor(s) have rows not a multiple of {QK_K} values: {what}; {effect}")
    return lines


# ------------------------------------------------------------------------- stage and CLI
def _stage_metadata(ctx: StageContext) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": ctx.recipe.name, "recipe": ctx.recipe.name}
    source = getattr(ctx.recipe, "source", None)
    if source is not None and getattr(source, "model", None):
        meta["source_model"] = source.model
        if "/" in source.model and not Path(source.model).exists() and not source.model.endswith(".gguf"):
            meta["base_model"] = source.model
    pruned = ctx.inputs.get("pruned_dir")
    if pruned and Path(pruned).is_dir():  # a healed directory may not carry the prune stage's layer map
        meta.update(layer_map_keys(Path(pruned)))
    return meta


def _run_stage(ctx: StageContext, model_dir: Path, outtype: str) -> Path:
    outtype = (outtype or getattr(ctx.settings, "outtype", None) or "F16").upper()
    out_path = Path(ctx.out_dir) / f"{ctx.recipe.name}-{outtype}.gguf"
    start = time.perf_counter()
    export_gguf(Path(model_dir), out_path, outtype, _stage_metadata(ctx), ctx.options)
    warnings = width_warnings(out_path)
    for line in warnings:
        ctx.log(f"[yellow]width warning:[/] {line}")
    ctx.metrics.update({
        "gguf": out_path.name, "outtype": outtype, "size_bytes": out_path.stat().st_size,
        "export_seconds": round(time.perf_counter() - start, 2), "width_warnings": warnings,
    })
    return out_path


# The stage hook shares its name with the Python API above, so it is bound by ``specname``.
@hookimpl(specname="export_gguf", trylast=True)
def export_gguf_stage(ctx: StageContext, model_dir: Path, outtype: str) -> Path:
    return _run_stage(ctx, model_dir, outtype)


def _parse_quants(quants: Iterable[str]) -> list[str]:
    from ollama_compress.recipe import QUANT_TYPES

    out: list[str] = []
    for q in quants:
        name = q.strip().upper()
        if name not in QUANT_TYPES:
            raise UserError(f"unknown quant '{q}'; known: {', '.join(QUANT_TYPES)}")
        if name not in out:
            out.append(name)
    return out


def _quantize_api():
    try:
        from ollama_compress.hooks import quantize
    except ImportError as exc:
        raise NotAvailable(f"the quantize plugin is not available ({exc}); export without --quant") from None
    return quantize


def export_model(model: Path, out_dir: Path, quants: Sequence[str] = (), outtype: str = "F16",
                 imatrix: Path | None = None, options: RunOptions | None = None,
                 metadata: dict | None = None, texts: list[str] | None = None) -> dict[str, Any]:
    """The ``export`` command: an unquantized GGUF, then each quant, measured against it.

    Writes ``{name}-{outtype}.gguf``, ``{name}-{quant}.gguf`` and ``quants.json`` into ``out_dir``
    (``name`` is the model directory's name). Everything is checked before anything is written.
    """
    from ollama_compress.modelio import check_causal_lm, check_model_dir

    options = options or RunOptions()
    outtype = outtype.upper()
    if outtype not in OUTTYPES:
        raise UserError(f"unknown outtype '{outtype}'; choose one of {', '.join(OUTTYPES)}")
    wanted = [q for q in _parse_quants(quants) if q != outtype]
    model, out_dir = Path(model), Path(out_dir)
    check_model_dir(model, options)
    read_model_config(model)
    check_causal_lm(model)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"{out_dir} is a file; --out must be a directory")
    if imatrix is not None and not Path(imatrix).is_file():
        raise UserError(f"importance matrix {imatrix} does not exist")
    quantize = _quantize_api() if wanted else None
    name = model.resolve().name
    start = time.perf_counter()
    reference = export_gguf(model, out_dir / f"{name}-{outtype}.gguf", outtype, {"name": name, **(metadata or {})}, options)
    result: dict[str, Any] = {"gguf": str(reference), "outtype": outtype, "size_bytes": reference.stat().st_size,
                              "export_seconds": round(time.perf_counter() - start, 2),
                              "width_warnings": width_warnings(reference), "quants": {}}
    if quantize is None:
        return result
    for quant in wanted:
        dst = out_dir / f"{name}-{quant}.gguf"
        quantize.quantize_file(reference, quant, dst, imatrix=Path(imatrix) if imatrix else None)
        result["quants"][quant] = str(dst)
    rows = quantize.measure_quants(reference, {q: Path(p) for q, p in result["quants"].items()}, texts)
    result["report"] = str(quantize.write_quants_report(rows, out_dir))
    result["rows"] = rows
    return result


def _print_rows(rows: list[dict]) -> None:
    try:
        from rich.console import Console

        from ollama_compress.hooks.quantize import format_quants_table

        Console().print(format_quants_table(rows))
    except (ImportError, KeyError, TypeError):
        keys = list(rows[0]) if rows else []
        click.echo("\t".join(keys))
        for row in rows:
            click.echo("\t".join(str(row.get(k, "")) for k in keys))


def _read_heldout(path: Path) -> list[str]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read held-out text {path}: {exc}") from None
    if not text.strip():
        raise UserError(f"held-out text {path} is empty")
    return [text]


@hookimpl
def register_commands(cli: click.Group) -> None:
    from ollama_compress.cli import echo_json, make_options, run_options

    @cli.command("export")
    @click.argument("model", type=click.Path(path_type=Path))
    @click.option("--quant", "-q", "quants", multiple=True, help="llama.cpp quant to make (repeatable), e.g. Q4_K_M.")
    @click.option("--outtype", default="F16", show_default=True,
                  type=click.Choice(OUTTYPES, case_sensitive=False), help="Type of the unquantized GGUF.")
    @click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
    @click.option("--imatrix", type=click.Path(path_type=Path), help="Importance matrix for low-bit quants.")
    @click.option("--heldout", type=click.Path(path_type=Path),
                  help="UTF-8 text file to measure the quants on (default: the built-in held-out text).")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @run_options
    def export_command(model, quants, outtype, out_dir, imatrix, heldout, as_json, **opts):
        """Convert an HF model directory to GGUF, then quantize it with llama.cpp."""
        texts = _read_heldout(heldout) if heldout else None
        result = export_model(model, out_dir, quants, outtype, imatrix, make_options(**opts), texts=texts)
        if as_json:
            echo_json(result)
            return
        click.echo(f"wrote {result['gguf']} ({result['size_bytes'] / 2**20:.1f} MiB)")
        for line in result["width_warnings"]:
            click.echo(f"warning: {line}", err=True)
        for quant, path in result["quants"].items():
            click.echo(f"wrote {path} ({quant})")
        if result.get("rows"):
            _print_rows(result["rows"])
            click.echo(f"report: {result['report']}")
