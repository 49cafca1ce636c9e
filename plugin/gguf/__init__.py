"""The GGUF writer: a Hugging Face directory -> one GGUF file (F32, F16 or BF16) that llama.cpp and Ollama load.

The layout follows what llama.cpp's own ``convert_hf_to_gguf.py`` writes for each supported family
(metadata keys, tensor names, Q/K row order, tied embeddings, norm offsets), written with gguf-py.
Parts: ``arch`` (families and their hyper-parameters), ``tensors`` (the tensor plan and width
warnings), ``vocab`` (tokenizer keys), ``writer`` (general.* and provenance keys, the file itself).
"""
from .arch import ARCHS, SUPPORTED, read_model_config
from .tensors import PlannedTensor, plan_tensors, width_warnings, width_warnings_of
from .vocab import Vocab, build_vocab
from .writer import (META_PREFIX, OUTTYPES, GGUFExport, check_exportable, check_outtype, export_gguf,
                     layer_map_keys, provenance, write_gguf)

__all__ = [
    "ARCHS", "SUPPORTED", "read_model_config", "PlannedTensor", "plan_tensors", "width_warnings",
    "width_warnings_of", "Vocab", "build_vocab", "META_PREFIX", "OUTTYPES", "GGUFExport", "check_exportable",
    "check_outtype", "export_gguf", "layer_map_keys", "provenance", "write_gguf",
]
