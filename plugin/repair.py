"""Linear repair of a depth cut (ReplaceMe, arXiv 2505.02819), fused into stock weights.

For a contiguous removed span ``[start, end)`` the *anchor* is the last kept layer before it,
``start - 1``. That layer's output is ``h = r + X``: ``r`` the residual stream after its
attention, ``X`` its MLP output. The pruned model feeds ``h`` straight to layer ``end``, where the
teacher fed ``h_end`` (the output of layer ``end - 1``). Repair fits a map ``T`` so that
``r + X T`` matches ``h_end`` on calibration tokens, i.e. ``X T ~ Y`` with ``Y = h_end - h + X``:

    T = (X^T X + lam I)^-1 (X^T Y + lam I),   lam = RIDGE * trace(X^T X) / hidden

a ridge toward the identity (``T = I`` is the plain cut), with ``X^T X`` and ``X^T Y`` summed in
float64 over all calibration tokens of the unpruned model. The MLP output is ``M = a W^T (+ b)``
with ``W`` the ``down_proj`` weight (``[out, in]``), so ``M T = a (T^T W)^T (+ b T)``: the fused
weight is ``T^T W`` and the bias ``b T``. The model keeps its stock architecture and tensor
shapes, so GGUF export, llama.cpp and Ollama see an ordinary model.

Gemma 2/3 normalise the MLP output (``post_feedforward_layernorm``, an RMSNorm) before the
residual add, so ``X`` is that norm's output and a dense ``T`` cannot pass through the norm.
The nearest exact map is a diagonal one: ``T = diag(d)`` fitted per channel (same ridge), fused
into the norm's scale (``scale <- scale * d``; Gemma stores ``scale - 1``).

Every span is fitted on the unpruned model's activations (not on the partly repaired student),
as in ReplaceMe. A span that starts at layer 0 has no kept layer before it: it is left as a
plain cut and ``SpanFit.skipped`` says why.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from .errors import UserError
from .gguf.arch import ARCHS
from .modelio import capture_outputs, decoder_stack
from .planner import index_runs

RIDGE = 1e-3  # ridge weight, relative to the mean diagonal of X^T X
REPAIR_MODES = ("linear", "none")
POST_MLP_NORM = "post_feedforward_layernorm"  # gemma2, gemma3: RMSNorm between the MLP and the residual add


def spans_of(removed: Sequence[int]) -> list[tuple[int, int]]:
    """The removed layers as contiguous ``[start, end)`` runs."""
    return index_runs(removed)


def _anchor_module(layer) -> tuple[Any, str]:
    """(module whose output is X, "dense" or "diagonal") for a decoder layer."""
    norm = getattr(layer, POST_MLP_NORM, None)
    if norm is not None:
        return norm, "diagonal"
    down = getattr(getattr(layer, "mlp", None), "down_proj", None)
    if not isinstance(down, torch.nn.Linear):
        raise UserError(f"prune.repair: linear needs an MLP with a down_proj layer and {type(layer).__name__} has "
                        "none; use prune.repair: none (or --repair none)")
    return layer.mlp, "dense"


@dataclass
class Stats:
    """Float64 sums over calibration tokens for one span."""

    xtx: torch.Tensor  # [H, H] (dense) or [H] (diagonal); shared by spans with the same anchor
    xty: torch.Tensor
    xtx_trace: float = 0.0
    xty_trace: float = 0.0
    yy: float = 0.0  # sum of |Y|^2
    tokens: int = 0


@dataclass
class SpanFit:
    start: int
    end: int
    anchor: int | None
    mode: str | None = None  # "dense" or "diagonal"
    map: torch.Tensor | None = None  # T (dense, [H, H]) or d (diagonal, [H]), float64
    tokens: int = 0
    error_plain: float | None = None  # |X - Y|^2 / |Y|^2: the plain cut's residual error
    error_fit: float | None = None  # |X T - Y|^2 / |Y|^2
    skipped: str | None = None

    def summary(self) -> dict[str, Any]:
        out = {"span": [self.start, self.end], "anchor": self.anchor, "mode": self.mode, "tokens": self.tokens,
               "error_plain": self.error_plain, "error_fit": self.error_fit}
        return {**out, "skipped": self.skipped} if self.skipped else out


@torch.no_grad()
def collect(model, batches: list, spans: Sequence[tuple[int, int]]) -> dict[tuple[int, int], Stats]:
    """Sums for every span with an anchor, from forward passes of the unpruned ``model``."""
    _, layers = decoder_stack(model)
    spans = [s for s in dict.fromkeys(spans) if s[0] > 0]
    anchors = sorted({s - 1 for s, _ in spans})
    modes = {a: _anchor_module(layers[a]) for a in anchors}
    watched = {("x", a): modes[a][0] for a in anchors}
    watched.update({("h", i): layers[i] for i in sorted(set(anchors) | {e - 1 for _, e in spans})})
    shared: dict[int, torch.Tensor] = {}
    stats: dict[tuple[int, int], Stats] = {}
    device = next(model.parameters()).device
    with capture_outputs(watched) as out:
        for batch in batches:
            out.clear()
            model(input_ids=batch.to(device), use_cache=False)
            xs = {a: out[("x", a)].reshape(-1, out[("x", a)].shape[-1]).double() for a in anchors}
            for a in anchors:
                x = xs[a]
                part = x.T @ x if modes[a][1] == "dense" else (x * x).sum(0)
                shared[a] = part if a not in shared else shared[a] + part
            for start, end in spans:
                a = start - 1
                x = xs[a]
                y = (out[("h", end - 1)] - out[("h", a)]).reshape(x.shape).double() + x
                part = x.T @ y if modes[a][1] == "dense" else (x * y).sum(0)
                st = stats.get((start, end))
                if st is None:
                    st = stats[(start, end)] = Stats(shared[a], torch.zeros_like(part))
                st.xty += part
                st.xty_trace += float((x * y).sum())
                st.xtx_trace += float((x * x).sum())
                st.yy += float((y * y).sum())
                st.tokens += x.shape[0]
    for (start, _), st in stats.items():
        st.xtx = shared[start - 1]  # the final sum (the dict held the first batch's tensor)
    return stats


def solve(stats: Stats, mode: str) -> torch.Tensor:
    """The ridge solution T (dense) or d (diagonal), float64, ridge toward the identity."""
    if mode == "diagonal":
        lam = RIDGE * float(stats.xtx.mean())
        return (stats.xty + lam) / (stats.xtx + lam)
    hidden = stats.xtx.shape[0]
    lam = RIDGE * float(torch.diagonal(stats.xtx).mean())
    eye = torch.eye(hidden, dtype=torch.float64, device=stats.xtx.device)
    return torch.linalg.solve(stats.xtx + lam * eye, stats.xty + lam * eye)


def _fit_error(stats: Stats, mode: str, t: torch.Tensor) -> float:
    if mode == "diagonal":
        sq = float((t * t * stats.xtx).sum()) - 2 * float((t * stats.xty).sum()) + stats.yy
    else:
        sq = float(((t.T @ stats.xtx) * t.T).sum()) - 2 * float((t * stats.xty).sum()) + stats.yy
    return max(sq, 0.0) / max(stats.yy, 1e-30)


def fit_spans(model, stats: dict[tuple[int, int], Stats], removed: Sequence[int]) -> list[SpanFit]:
    """One ``SpanFit`` per contiguous run of ``removed``, from sums made by ``collect``."""
    _, layers = decoder_stack(model)
    fits = []
    for start, end in spans_of(removed):
        if start == 0:
            fits.append(SpanFit(start, end, None, skipped="starts at layer 0: no kept layer before it to carry "
                                                           "the map; left as a plain cut"))
            continue
        mode = _anchor_module(layers[start - 1])[1]
        st = stats[(start, end)]
        t = solve(st, mode)
        plain = (st.xtx_trace - 2 * st.xty_trace + st.yy) / max(st.yy, 1e-30)
        fits.append(SpanFit(start, end, start - 1, mode, t, st.tokens, plain, _fit_error(st, mode, t)))
    return fits


def _norm_shift(model) -> float:
    """1.0 when the RMSNorm scales by ``1 + weight`` (Gemma), 0.0 when by ``weight``."""
    spec = ARCHS.get(getattr(model.config, "model_type", ""))
    return float(getattr(spec, "norm_shift", 0.0) or 0.0)


def fused_tensors(model, fits: Sequence[SpanFit]) -> dict[str, torch.Tensor]:
    """``{parameter name in the unpruned model: repaired tensor}`` in each parameter's dtype."""
    _, layers = decoder_stack(model)
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, torch.Tensor] = {}
    for fit in fits:
        if fit.map is None:
            continue
        module, _ = _anchor_module(layers[fit.anchor])
        if fit.mode == "diagonal":
            shift = _norm_shift(model)
            w = module.weight
            scale = (w.double() + shift) * fit.map.to(w.device)
            out[names[id(w)]] = (scale - shift).to(w.dtype)
            continue
        down = module.down_proj
        t = fit.map.to(down.weight.device)
        out[names[id(down.weight)]] = (t.T @ down.weight.double()).to(down.weight.dtype)
        if down.bias is not None:
            out[names[id(down.bias)]] = (down.bias.double() @ t).to(down.bias.dtype)
    return out


@torch.no_grad()
def apply_tensors(model, tensors: dict[str, torch.Tensor]) -> None:
    """Copy ``tensors`` (names from ``fused_tensors``) into a model that still has all its layers."""
    params = dict(model.named_parameters())
    for name, value in tensors.items():
        params[name].copy_(value)


def repair(model, batches: list, removed: Sequence[int], log: Callable[[str], None] = lambda m: None
           ) -> tuple[dict[str, torch.Tensor], list[SpanFit]]:
    """Fit every span of ``removed`` on ``batches`` and return (fused tensors, fits); logs each span."""
    fits = fit_spans(model, collect(model, batches, spans_of(removed)), removed)
    for fit in fits:
        log(describe(fit))
    return fused_tensors(model, fits), fits


def describe(fit: SpanFit) -> str:
    where = f"repair of layers {fit.start}-{fit.end - 1}"
    if fit.skipped:
        return f"{where}: skipped, {fit.skipped}"
    into = "post_feedforward_layernorm scale (diagonal map: the norm follows the MLP)" if fit.mode == "diagonal" \
        else "mlp.down_proj"
    return (f"{where}: linear map fused into layer {fit.anchor}'s {into}; residual error "
            f"{fit.error_plain:.3f} -> {fit.error_fit:.3f} over {fit.tokens} calibration tokens")
