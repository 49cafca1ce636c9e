"""The llama.cpp quant names this tool knows: one table, used by recipe validation, the
``quantize`` and ``export`` commands and the export stage."""
from __future__ import annotations

from typing import NamedTuple


class QuantInfo(NamedTuple):
    main_type: str  # the ggml type of most matrices (llama.cpp's default type for the file type)
    imatrix: str  # "required": llama.cpp refuses it without an importance matrix; "helps"; "no"


# llama-quantize stops without an imatrix on IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S and Q2_K_S; IQ2_M's
# main type is IQ2_S, which the library refuses to produce without one. llama.cpp applies an imatrix
# to the K-quants and every IQ quant (ggml_quantize_requires_imatrix / quantize_*_impl with
# quant_weights); the legacy Q4_0 ... Q8_0 use it too but gain little, so "auto" skips them.
# Which tensors get other types than the main one: ``planner.tensor_type``.
QUANTS: dict[str, QuantInfo] = {
    "F32": QuantInfo("F32", "no"), "F16": QuantInfo("F16", "no"), "BF16": QuantInfo("BF16", "no"),
    "Q8_0": QuantInfo("Q8_0", "no"), "Q6_K": QuantInfo("Q6_K", "helps"), "Q5_K_M": QuantInfo("Q5_K", "helps"),
    "Q5_K_S": QuantInfo("Q5_K", "helps"), "Q5_0": QuantInfo("Q5_0", "no"), "Q5_1": QuantInfo("Q5_1", "no"),
    "Q4_K_M": QuantInfo("Q4_K", "helps"), "Q4_K_S": QuantInfo("Q4_K", "helps"), "Q4_0": QuantInfo("Q4_0", "no"),
    "Q4_1": QuantInfo("Q4_1", "no"), "IQ4_XS": QuantInfo("IQ4_XS", "helps"), "IQ4_NL": QuantInfo("IQ4_NL", "helps"),
    "Q3_K_L": QuantInfo("Q3_K", "helps"), "Q3_K_M": QuantInfo("Q3_K", "helps"), "Q3_K_S": QuantInfo("Q3_K", "helps"),
    "Q2_K": QuantInfo("Q2_K", "helps"), "Q2_K_S": QuantInfo("Q2_K", "required"),
    "IQ3_XXS": QuantInfo("IQ3_XXS", "helps"), "IQ3_XS": QuantInfo("IQ3_S", "helps"), "IQ3_S": QuantInfo("IQ3_S", "helps"),
    "IQ3_M": QuantInfo("IQ3_S", "helps"), "IQ2_XXS": QuantInfo("IQ2_XXS", "required"),
    "IQ2_XS": QuantInfo("IQ2_XS", "required"), "IQ2_S": QuantInfo("IQ2_XS", "required"),
    "IQ2_M": QuantInfo("IQ2_S", "required"), "IQ1_S": QuantInfo("IQ1_S", "required"),
    "IQ1_M": QuantInfo("IQ1_M", "required"),
}
QUANT_TYPES = tuple(QUANTS)
UNQUANTIZED = ("F32", "F16", "BF16")
# llama.cpp's older 4- and 5-bit types: its K- and i-quants of about the same size lose less (the
# 90 MiB size plan of SmolLM2-135M: teacher Q4_0, 87.5 MiB, KL 0.33 to the teacher; Q3_K_M, 89.2 MiB,
# 0.10), so the size plan does not offer them.
LEGACY_QUANTS = ("Q4_0", "Q4_1", "Q5_0", "Q5_1")
NEEDS_IMATRIX = tuple(q for q, info in QUANTS.items() if info.imatrix == "required")
IMATRIX_HELPS = tuple(q for q, info in QUANTS.items() if info.imatrix != "no")


def quantizable(imatrix: bool) -> list[str]:
    """The quants a GGUF can be made at, in table order: every quantized type, those that need an
    importance matrix only when there is one (``export.imatrix`` set)."""
    return [q for q in QUANT_TYPES if q not in UNQUANTIZED and (imatrix or q not in NEEDS_IMATRIX)]


def quant_name_problem(quant: str, also: tuple[str, ...] = ()) -> str | None:
    """Why ``quant`` is not a quant name this tool knows (with a did-you-mean), or None; ``also``:
    further names the caller accepts (``auto``)."""
    if quant in QUANTS or quant in also:
        return None
    hint = f" (did you mean {quant.upper()}?)" if quant.upper() in QUANTS else ""
    return f"unknown quant '{quant}'{hint}; known: {', '.join((*also, *QUANT_TYPES))}"
