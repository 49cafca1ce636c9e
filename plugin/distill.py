"""Distillation losses for the heal stage, and how they combine.

A loss is a registered capability (``register_losses``): ``fn(student, teacher, batch) -> Tensor``,
a scalar. ``student`` and ``teacher`` are ``ForwardOut``s of the same token batch: the final
hidden states (after the final norm), the outputs of the decoder layers some loss asked for, and
the LM head. Logits are never materialised for the whole batch: ``head_loss`` walks the real
tokens in chunks, turns each chunk into logits through the head, and computes the loss and its
gradient for that chunk right away (in fp32), so only one chunk's logits exist at a time.

Built-ins:

* ``kl``: forward KL(teacher_T || student_T) of temperature-softened distributions, times T^2,
  averaged over real tokens.
* ``hidden_mse``: per matched student layer, the mean squared difference to the output of the
  teacher layer it came from (``layer_map.json``, original indices), divided by the mean square
  of that teacher output, averaged over the matched layers: the same scale for any hidden size
  or depth.
* ``ce``: next-token cross-entropy on the data.
* ``lens``: each matched student layer's output through the final norm and LM head against the
  teacher's mapped layer the same way, symmetric Jensen-Shannon divergence (DistillLens).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from .plugins import capability

DEFAULT_CHUNK_TOKENS = 1024


@dataclass
class Head:
    """The LM head as tensors: ``logits = softcap(hidden @ weight.T + bias)``, first ``vocab`` ids."""

    weight: torch.Tensor
    bias: torch.Tensor | None = None
    softcap: float | None = None  # gemma2-style final_logit_softcapping

    def sliced(self, vocab: int) -> "Head":
        bias = self.bias[:vocab] if self.bias is not None else None
        return Head(self.weight[:vocab], bias, self.softcap)

    def cast(self, dtype: torch.dtype | None) -> "Head":
        if dtype is None:
            return self
        return Head(self.weight.to(dtype), self.bias.to(dtype) if self.bias is not None else None, self.softcap)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Full logits in fp32 (for small inputs: evaluation and tests)."""
        z = F.linear(hidden, self.weight, self.bias).float()
        return self.softcap * torch.tanh(z / self.softcap) if self.softcap else z


@dataclass
class ForwardOut:
    """One model's forward pass over a batch, as the losses see it."""

    final: torch.Tensor  # [B, T, H] hidden states after the final norm
    head: Head
    layers: dict[int, torch.Tensor] = field(default_factory=dict)  # layer index -> its output [B, T, H]
    norm: Callable[[torch.Tensor], torch.Tensor] | None = None  # the final norm (for ``lens``)


@dataclass
class Batch:
    """The token batch and the settings every loss may use."""

    input_ids: torch.Tensor  # [B, T]
    mask: torch.Tensor  # [B, T] bool, True for real (non-padding) tokens
    temperature: float = 1.0
    student_to_teacher: list[int] = field(default_factory=list)  # student layer -> original teacher layer
    matched_layers: list[int] = field(default_factory=list)  # student layers that layer losses compare
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS


# ---------------------------------------------------------------- chunked head losses
ChunkLoss = Callable[[torch.Tensor, slice], tuple[torch.Tensor, torch.Tensor]]


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype active for ``tensor``'s device, if any."""
    kind = tensor.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else None


class _HeadLoss(torch.autograd.Function):
    """Sum over chunks of ``chunk_loss(logits_chunk, rows)``; gradients computed chunk by chunk.

    ``chunk_loss`` returns (loss of the chunk, d loss / d logits of the chunk), both fp32.
    The gradients for ``hidden`` and the head are kept from the forward pass, so backward only
    scales them: no chunk's logits outlive its own iteration. Under autocast the head is cast
    to the autocast dtype once, not once per chunk and matmul.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, softcap, chunk_loss, chunk_tokens):
        dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        compute = _compute_dtype(hidden)
        with torch.autocast(hidden.device.type, enabled=False):
            if compute is not None:
                hidden, weight = hidden.to(compute), weight.to(compute)
                bias = bias.to(compute) if bias is not None else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            grad_h = torch.zeros(hidden.shape, dtype=torch.float32, device=hidden.device) \
                if ctx.needs_input_grad[0] else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) \
                if ctx.needs_input_grad[1] else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) \
                if bias is not None and ctx.needs_input_grad[2] else None
            for start in range(0, hidden.shape[0], chunk_tokens):
                rows = slice(start, min(start + chunk_tokens, hidden.shape[0]))
                h = hidden[rows]
                z = F.linear(h, weight, bias).float()
                if softcap:
                    capped = torch.tanh(z / softcap)
                    z = softcap * capped
                loss, grad_z = chunk_loss(z, rows)
                total += loss
                del z
                if softcap:
                    grad_z = grad_z * (1 - capped * capped)
                if grad_h is not None:
                    grad_h[rows] = grad_z.to(weight.dtype) @ weight
                if grad_w is not None:
                    grad_w += grad_z.t().to(h.dtype) @ h
                if grad_b is not None:
                    grad_b += grad_z.sum(0)
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.which = (grad_h is not None, grad_w is not None, grad_b is not None)
        ctx.dtypes = dtypes
        return total

    @staticmethod
    def backward(ctx, grad_out):
        saved = iter(ctx.saved_tensors)
        grads = [(next(saved) * grad_out).to(dtype) if present else None
                 for present, dtype in zip(ctx.which, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None, None


def head_loss(hidden: torch.Tensor, head: Head, chunk_loss: ChunkLoss, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
              ) -> torch.Tensor:
    """Sum of ``chunk_loss`` over the rows of ``hidden`` [N, H], ``chunk_tokens`` rows at a time."""
    return _HeadLoss.apply(hidden, head.weight, head.bias, head.softcap, chunk_loss, max(1, chunk_tokens))


def chunked_kl(student_hidden: torch.Tensor, student_head: Head, teacher_hidden: torch.Tensor, teacher_head: Head,
               temperature: float = 1.0, chunk_tokens: int = DEFAULT_CHUNK_TOKENS) -> torch.Tensor:
    """Mean over rows of KL(softmax(t/T) || softmax(s/T)) * T^2 from hidden states [N, H]."""
    n = student_hidden.shape[0]
    scale = temperature ** 2 / max(1, n)
    compute = _compute_dtype(student_hidden)
    if compute is not None:  # the teacher's logits in the same precision, its head cast once
        teacher_head, teacher_hidden = teacher_head.cast(compute), teacher_hidden.to(compute)

    def chunk(z: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():  # in place where possible: these are [rows, vocab] fp32 tensors
            log_p = F.log_softmax(teacher_head.logits(teacher_hidden[rows]).div_(temperature), dim=-1)
            log_q = F.log_softmax(z.div_(temperature), dim=-1)
            p = log_p.exp()
            loss = torch.vdot(p.view(-1), log_p.sub_(log_q).view(-1)) * scale
            grad = log_q.exp_().sub_(p).mul_(scale / temperature)
        return loss, grad

    return head_loss(student_hidden, student_head, chunk, chunk_tokens)


def plain_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The same KL from full logits [N, V] (reference for tests and small evaluations)."""
    log_q = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1).mean() * temperature ** 2


def chunked_ce(hidden: torch.Tensor, head: Head, targets: torch.Tensor, chunk_tokens: int = DEFAULT_CHUNK_TOKENS
               ) -> torch.Tensor:
    """Mean next-token cross-entropy of rows ``hidden`` [N, H] against ``targets`` [N]."""
    scale = 1.0 / max(1, hidden.shape[0])

    def chunk(z: torch.Tensor, rows: slice) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.no_grad():
            log_q = F.log_softmax(z, dim=-1)
            target = targets[rows]
            loss = -log_q.gather(1, target[:, None]).sum() * scale
            grad = log_q.exp()
            grad[torch.arange(len(target), device=grad.device), target] -= 1
        return loss, grad * scale

    return head_loss(hidden, head, chunk, chunk_tokens)


# ---------------------------------------------------------------- the built-in losses
def real_rows(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The rows [N, H] of ``states`` [B, T, H] at real tokens: a view when there is no padding
    (no copy, and no scatter into zeros in the backward pass)."""
    return states.flatten(0, 1) if bool(mask.all()) else states[mask]


def kl_loss(student: ForwardOut, teacher: ForwardOut, batch: Batch) -> torch.Tensor:
    """Forward KL of temperature-softened logits, times T^2, over real tokens (fp32)."""
    mask = batch.mask
    return chunked_kl(real_rows(student.final, mask), student.head, real_rows(teacher.final, mask), teacher.head,
                      batch.temperature, batch.chunk_tokens)


def hidden_mse_loss(student: ForwardOut, teacher: ForwardOut, batch: Batch) -> torch.Tensor:
    """Normalised MSE between each matched student layer and its original teacher layer.

    One fused pass per layer forward and backward (``mse_loss``); the teacher's mean square is a
    dot product, without a temporary.
    """
    mask = batch.mask
    terms = []
    for s in batch.matched_layers:
        target = real_rows(teacher.layers[batch.student_to_teacher[s]], mask).float()
        flat = target.reshape(-1)
        with torch.no_grad():
            scale = torch.linalg.vector_norm(flat, dtype=torch.float32).square_().div_(flat.numel()).clamp_min_(1e-12)
        terms.append(F.mse_loss(real_rows(student.layers[s], mask).float(), target) / scale)
    return torch.stack(terms).mean()


def ce_loss(student: ForwardOut, teacher: ForwardOut, batch: Batch) -> torch.Tensor:
    """Next-token cross-entropy on the data (real tokens whose successor is also real)."""
    pairs = batch.mask[:, :-1] & batch.mask[:, 1:]
    hidden = student.final[:, :-1][pairs]
    targets = batch.input_ids[:, 1:][pairs]
    return chunked_ce(hidden, student.head, targets, batch.chunk_tokens)


def lens_loss(student: ForwardOut, teacher: ForwardOut, batch: Batch) -> torch.Tensor:
    """Symmetric JSD of matched layers read through the final norm and LM head (DistillLens)."""
    mask = batch.mask
    terms = []
    for s in batch.matched_layers:
        with torch.no_grad():
            p = F.softmax(teacher.head.logits(teacher.norm(teacher.layers[batch.student_to_teacher[s]][mask])), -1)
        q = F.softmax(student.head.logits(student.norm(student.layers[s][mask])), -1)
        m = 0.5 * (p + q)
        log_m = m.clamp_min(1e-30).log()
        jsd = 0.5 * (p * (p.clamp_min(1e-30).log() - log_m)).sum(-1) + \
            0.5 * (q * (q.clamp_min(1e-30).log() - log_m)).sum(-1)
        terms.append(jsd.mean())
    return torch.stack(terms).mean()


# ---------------------------------------------------------------- combining
@dataclass
class LossTerm:
    name: str
    fn: Callable[..., torch.Tensor]
    weight: float
    needs_layers: bool


def loss_terms(weights: dict[str, float]) -> list[LossTerm]:
    """The registered losses with a positive weight (names are checked by the recipe)."""
    terms = []
    for name, weight in weights.items():
        if weight > 0:
            cap = capability("losses", name)
            terms.append(LossTerm(name, cap.fn, float(weight), bool(cap.extra.get("needs_layers", False))))
    return terms


def combined_loss(terms: list[LossTerm], student: ForwardOut, teacher: ForwardOut, batch: Batch
                  ) -> tuple[torch.Tensor, dict[str, float]]:
    """Weighted sum of the terms (fp32) and each term's unweighted value."""
    total = torch.zeros((), dtype=torch.float32, device=student.final.device)
    values: dict[str, Any] = {}
    for term in terms:
        value = term.fn(student, teacher, batch).float()
        total = total + term.weight * value
        values[term.name] = value.detach()
    return total, values
