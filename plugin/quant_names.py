"""The llama.cpp quant names this tool knows: one table, used by recipe validation, the
``quantize`` and ``export`` commands and the export stage."""
from __future__ import annotations

from typing import NamedTuple


class QuantInfo(NamedTuple):
    nominal_bpw: float  # bits per weight of the main tensor type; only to check free disk space
    imatrix: str  # "required": llama.cpp refuses it without an importance matrix; "helps"; "no"


# llama-quantize stops without an imatrix on IQ1_S, IQ1_M, IQ2_XXS, IQ2_XS, IQ2_S and Q2_K_S; IQ2_M's
# main type is IQ2_S, which the library refuses to produce without one. llama.cpp applies an imatrix
# to the K-quants and every IQ quant (ggml_quantize_requires_imatrix / quantize_*_impl with
# quant_weights); the legacy Q4_0 ... Q8_0 use it too but gain little, so "auto" skips them.
QUANTS: dict[str, QuantInfo] = {
    "F32": QuantInfo(32, "no"), "F16": QuantInfo(16, "no"), "BF16": QuantInfo(16, "no"),
    "Q8_0": QuantInfo(8.5, "no"), "Q6_K": QuantInfo(6.6, "helps"), "Q5_K_M": QuantInfo(5.7, "helps"),
    "Q5_K_S": QuantInfo(5.5, "helps"), "Q5_0": QuantInfo(5.5, "no"), "Q5_1": QuantInfo(6.0, "no"),
    "Q4_K_M": QuantInfo(4.9, "helps"), "Q4_K_S": QuantInfo(4.6, "helps"), "Q4_0": QuantInfo(4.5, "no"),
    "Q4_1": QuantInfo(5.0, "no"), "IQ4_XS": QuantInfo(4.3, "helps"), "IQ4_NL": QuantInfo(4.5, "helps"),
    "Q3_K_L": QuantInfo(4.3, "helps"), "Q3_K_M": QuantInfo(3.9, "helps"), "Q3_K_S": QuantInfo(3.5, "helps"),
    "Q2_K": QuantInfo(3.0, "helps"), "Q2_K_S": QuantInfo(2.8, "required"),
    "IQ3_XXS": QuantInfo(3.1, "helps"), "IQ3_XS": QuantInfo(3.3, "helps"), "IQ3_S": QuantInfo(3.5, "helps"),
    "IQ3_M": QuantInfo(3.7, "helps"), "IQ2_XXS": QuantInfo(2.1, "required"), "IQ2_XS": QuantInfo(2.3, "required"),
    "IQ2_S": QuantInfo(2.5, "required"), "IQ2_M": QuantInfo(2.7, "required"),
    "IQ1_S": QuantInfo(1.6, "required"), "IQ1_M": QuantInfo(1.8, "required"),
}
QUANT_TYPES = tuple(QUANTS)
UNQUANTIZED = ("F32", "F16", "BF16")
NEEDS_IMATRIX = tuple(q for q, info in QUANTS.items() if info.imatrix == "required")
IMATRIX_HELPS = tuple(q for q, info in QUANTS.items() if info.imatrix != "no")


def quant_name_problem(quant: str) -> str | None:
    """Why ``quant`` is not a quant name this tool knows (with a did-you-mean), or None."""
    if quant in QUANTS:
        return None
    hint = f" (did you mean {quant.upper()}?)" if quant.upper() in QUANTS else ""
    return f"unknown quant '{quant}'{hint}; known: {', '.join(QUANT_TYPES)}"
