"""The GGUF writer: a Hugging Face directory -> one GGUF file (F32, F16 or BF16) that llama.cpp and Ollama load.

The layout follows what llama.cpp's own ``convert_hf_to_gguf.py`` writes for each supported family
(metadata keys, tensor names, Q/K row order, tied embeddings, norm offsets), written with gguf-py.
Parts: ``arch`` (families and their hyper-parameters), ``tensors`` (the tensor plan and width
warnings), ``vocab`` (tokenizer keys), ``writer`` (general.* and provenance keys, the file itself).
"""
from __future__ import annotations

from importlib import import_module
from typing import Any

# The writer's API by name -> the part that defines it. Parts load on first use, so importing
# ``ollama_compress.gguf.arch`` (the command line does) does not load numpy and gguf-py.
_PARTS = {
    **dict.fromkeys(["ARCHS", "SUPPORTED", "read_model_config"], "arch"),
    **dict.fromkeys(["PlannedTensor", "plan_tensors", "width_warnings", "width_warnings_of"], "tensors"),
    **dict.fromkeys(["Vocab", "build_vocab"], "vocab"),
    **dict.fromkeys(["META_PREFIX", "OUTTYPES", "GGUFExport", "check_exportable", "check_outtype", "export_gguf",
                     "layer_map_keys", "provenance", "write_gguf"], "writer"),
}
__all__ = list(_PARTS)


def __getattr__(name: str) -> Any:
    if name not in _PARTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f"{__name__}.{_PARTS[name]}"), name)
