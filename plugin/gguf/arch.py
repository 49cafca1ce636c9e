"""Per-architecture facts: which llama.cpp architecture an HF family becomes, and its ``{arch}.*`` keys."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ollama_compress.errors import UserError
from ollama_compress.modelio import read_config


def gguf_py():
    """gguf-py, imported when first needed (the CLI starts without it)."""
    import gguf

    return gguf


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
SUPPORTED = ", ".join(ARCHS)

# llama.cpp special-cases the 27B gemmas' attention scale by their layer count (llama-model.cpp).
_GEMMA_27B_LAYERS = {"gemma2": 46, "gemma3_text": 62}


def read_model_config(model_dir: Path):
    """(model_type, ArchSpec, transformers config) of ``model_dir``; UserError when unsupported."""
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


# ------------------------------------------------------------------------- hyperparameters
def rope_params(config, kind: str = "full_attention") -> dict[str, Any]:
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


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def _layer_is_swa(config) -> list[bool] | None:
    types = getattr(config, "layer_types", None)
    if not types:
        return None
    return [t == "sliding_attention" for t in types]


def _write_rope_scaling(w, rope: dict[str, Any], config) -> None:
    gguf = gguf_py()
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
    rope = rope_params(config)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(float(rope["rope_theta"]))
    if getattr(config, "head_dim", None):
        w.add_key_length(config.head_dim)
        w.add_value_length(config.head_dim)
    w.add_file_type(ftype)


def write_hparams(w, model_type: str, config, n_layers: int, ftype) -> None:
    """The ``{arch}.*`` keys llama.cpp reads for this family."""
    _write_common(w, config, n_layers, ftype)
    rope = rope_params(config)
    if model_type in ("llama", "mistral"):
        w.add_vocab_size(config.vocab_size)
        w.add_rope_dimension_count(head_dim(config))
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
        local = rope_params(config, "sliding_attention").get("rope_theta") or getattr(config, "rope_local_base_freq", None)
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
        w.add_rope_dimension_count(phi3_rope_dims(config))
        w.add_sliding_window(getattr(config, "sliding_window", None) or 0)
        _write_rope_scaling(w, rope, config)
        if rope.get("long_factor"):
            w.add_rope_scaling_attn_factors(_phi3_attn_factor(config, rope))


def phi3_rope_dims(config) -> int:
    factor = rope_params(config).get("partial_rotary_factor") or getattr(config, "partial_rotary_factor", 1.0) or 1.0
    return int(factor * config.hidden_size) // config.num_attention_heads


def _phi3_attn_factor(config, rope: dict[str, Any]) -> float:
    orig = getattr(config, "original_max_position_embeddings", None) or rope["original_max_position_embeddings"]
    scale = config.max_position_embeddings / orig
    if scale <= 1.0:
        return 1.0
    if (rope.get("rope_type") or "").lower() == "yarn":
        return 0.1 * math.log(scale) + 1.0
    return math.sqrt(1 + math.log(scale) / math.log(orig))



def gemma_query_scale(model_type: str, config, n_layers: int) -> float:
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
        cpp = head_dim(config) ** -0.5
    factor = scalar ** -0.5 / cpp
    return 1.0 if abs(factor - 1.0) < 1e-7 else factor



# ------------------------------------------------------------------------- what llama.cpp can load
# Tensor kinds of gguf-py's MODEL_TENSORS[arch] that llama.cpp's loader does not require: the output
# head (tied to token_embd when absent), computed rope tables, and the fused / expert alternatives.
OPTIONAL_TENSORS = ("OUTPUT", "ROPE_FREQS", "ROPE_FACTORS_LONG", "ROPE_FACTORS_SHORT", "ATTN_ROT_EMBD", "ATTN_QKV",
                    "FFN_GATE_INP", "FFN_GATE_EXP", "FFN_DOWN_EXP", "FFN_UP_EXP", "FFN_EXP_PROBS_B")
_SEPARATE_QKV = ("ATTN_Q", "ATTN_K", "ATTN_V")  # needed unless a block has the fused ATTN_QKV
_DENSE_FFN = ("FFN_GATE", "FFN_DOWN", "FFN_UP")  # needed unless a block routes to experts (FFN_GATE_INP)
_POSITIVE_HPARAMS = ("block_count", "context_length", "embedding_length", "attention.head_count",
                     "attention.head_count_kv")  # when present as numbers, 0 makes llama.cpp divide by zero


def metadata_type_problem(key: str, item_types: set) -> str | None:
    """Why an array value of ``key`` whose items have GGUF ``item_types`` is one llama.cpp cannot
    read (nested arrays, mixed item types), or None. Used by the writer and by ``verify``."""
    gguf = gguf_py()
    if gguf.GGUFValueType.ARRAY in item_types:
        return f"metadata '{key}' is an array of arrays, which llama.cpp cannot read"
    if len(item_types) > 1:
        return f"metadata '{key}' is an array of mixed types ({', '.join(sorted(t.name for t in item_types))})"
    return None


def _model_arch(arch_name: str | None):
    gguf = gguf_py()
    by_name = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}
    return by_name.get(arch_name or "")


def loadability_problems(arch_name: str | None, metadata: dict[str, Any], tensor_names: set[str]) -> list[str]:
    """Why llama.cpp could not load a GGUF of ``arch_name`` with these keys and tensors: a hyper-
    parameter of 0, or a tensor its architecture needs missing (per block, from gguf-py's
    ``MODEL_TENSORS`` less ``OPTIONAL_TENSORS``). Files without tensors (vocabularies) and
    architectures gguf-py does not know are only checked for the keys."""
    problems = []
    for field in _POSITIVE_HPARAMS:
        value = metadata.get(f"{arch_name}.{field}")
        if isinstance(value, int) and not isinstance(value, bool) and value <= 0 and not (
                field == "block_count" and not tensor_names):
            problems.append(f"{arch_name}.{field} is {value}; llama.cpp needs a positive number")
    arch = _model_arch(arch_name)
    if arch is None or not tensor_names:
        return problems
    block_count = metadata.get(f"{arch_name}.block_count")
    blocks = range(block_count) if isinstance(block_count, int) and 0 < block_count <= len(tensor_names) else range(0)
    missing = [name for name in _required_tensor_names(arch, blocks, tensor_names) if name not in tensor_names]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        problems.append(f"llama.cpp's {arch_name} needs tensors this file lacks: {shown}")
    return problems


def _required_tensor_names(arch, blocks: range, present: set[str]) -> list[str]:
    gguf = gguf_py()
    kinds = [k for k in gguf.MODEL_TENSORS[arch] if k.name not in OPTIONAL_TENSORS]
    names = []
    for kind in kinds:
        pattern = gguf.TENSOR_NAMES[kind] + ".weight"
        if "{bid}" not in pattern:
            names.append(pattern)
            continue
        for bid in blocks:
            name = pattern.format(bid=bid)
            if kind.name in _SEPARATE_QKV and f"blk.{bid}.attn_qkv.weight" in present:
                continue
            if kind.name in _DENSE_FFN and f"blk.{bid}.ffn_gate_inp.weight" in present:
                continue
            names.append(name)
    return names


def check_loadable(what: str, arch_name: str | None, metadata: dict[str, Any], tensor_names: set[str]) -> None:
    """A UserError naming the first of ``loadability_problems``."""
    problems = loadability_problems(arch_name, metadata, tensor_names)
    if problems:
        raise UserError(f"{what}: {problems[0]}; llama.cpp and Ollama could not load it")
