"""The teacher reference and the one quality measure against it.

``teacher_reference``: the teacher's log-probabilities (PyTorch, float32) on the held-out windows
(``hooks.data.heldout_windows``), computed once and cached by content: the teacher's sha256, the
windows' tokens and the dtype name the folder. Heal's before/after and periodic checks and evaluate
read it, so the teacher runs on the held-out text once per run.

``QualityMeter``: perplexity, KL(reference || model) at T=1 and top-1 agreement from a model's
log-probabilities and the reference's, window by window. Every held-out figure is summed by it:
heal's checks (``trainer.heldout_metrics``), the quant table and evaluate (``quantize.quality_against``).
"""
from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from .options import RunOptions
from .fsutil import atomic_path, write_json

REFERENCE_DTYPE = "float32"
REFERENCE_DIR = "teacher-reference"  # under the run's cache/ (or the user cache without a run)
LOGPROBS_FILE = "teacher_logprobs.npy"
WINDOWS_FILE = "windows.json"
SUMMARY_FILE = "reference.json"  # written last: a folder without it is incomplete
FIGURES_DIR = "figures"  # held-out figures of HF models measured against the reference, by the model's sha256
FIGURE_KEYS = ("perplexity", "kl", "top1_agreement")


def log_softmax(logits: Any) -> Any:
    """Log-softmax over the last axis of a ``[n, vocab]`` numpy array (float32; sums in float64)."""
    import numpy as np

    z = logits - logits.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True, dtype=np.float64)).astype(np.float32)


class QualityMeter:
    """Sums over windows of next-token log-probabilities ``[n, vocab]`` (row i predicts ``targets[i]``)."""

    def __init__(self) -> None:
        self.nll, self.kl, self.agree, self.tokens = 0.0, 0.0, 0, 0

    def add(self, model_lp: Any, reference_lp: Any, targets: Any) -> None:
        import numpy as np

        lp, ref = np.asarray(model_lp, dtype=np.float32), np.asarray(reference_lp, dtype=np.float32)
        self.add_nll(lp, targets)
        self.kl += float((np.exp(ref) * (ref - lp)).sum(dtype=np.float64))
        self.agree += int((ref.argmax(axis=1) == lp.argmax(axis=1)).sum())

    def add_nll(self, model_lp: Any, targets: Any) -> None:
        """Only the perplexity part (the reference's own perplexity: its KL is 0, its agreement 1)."""
        import numpy as np

        lp = np.asarray(model_lp, dtype=np.float32)
        self.nll -= float(lp[np.arange(len(lp)), np.asarray(targets)].sum(dtype=np.float64))
        self.tokens += len(lp)

    def result(self) -> dict[str, Any]:
        """``perplexity`` of the model, ``kl`` (mean per token), ``top1_agreement`` and ``tokens``."""
        n = self.tokens
        return {"perplexity": math.exp(self.nll / n), "kl": self.kl / n, "top1_agreement": self.agree / n, "tokens": n}


@dataclass(frozen=True)
class TeacherReference:
    """A cached reference folder: log-probabilities of every window's positions but the last, in order."""

    folder: Path
    teacher_dir: Path
    windows: list[list[int]]
    tokens: int
    teacher_perplexity: float

    @property
    def key(self) -> str:
        """Names this reference: the teacher's hash, the windows' hash and the dtype."""
        return self.folder.name

    @property
    def logprobs_path(self) -> Path:
        return self.folder / LOGPROBS_FILE

    def logprobs(self):
        """The ``[tokens, vocab]`` array, memory-mapped read-only."""
        import numpy as np

        return np.load(self.logprobs_path, mmap_mode="r")

    def window_rows(self) -> list:
        """One ``[len(window) - 1, vocab]`` view of ``logprobs()`` per window."""
        lp, rows, start = self.logprobs(), [], 0
        for w in self.windows:
            rows.append(lp[start:start + len(w) - 1])
            start += len(w) - 1
        return rows

    def describe(self) -> dict[str, Any]:
        """The JSON-able form evaluate's hook finds in ``ctx.inputs["heldout_reference"]``."""
        return {"key": self.key, "teacher_dir": str(self.teacher_dir), "windows": str(self.folder / WINDOWS_FILE),
                "teacher_logprobs": str(self.logprobs_path), "tokens": self.tokens,
                "teacher_perplexity": self.teacher_perplexity, "folder": str(self.folder)}


def _figures_file(folder: Path, model_dir: Path) -> Path:
    from .embedded import content_sha256

    return Path(folder) / FIGURES_DIR / f"{content_sha256(model_dir)}.json"


def known_figures(folder: Path, model_dir: Path) -> dict[str, float] | None:
    """``FIGURE_KEYS`` of the HF model ``model_dir`` against the reference in ``folder``, as
    ``store_figures`` kept them for these very files (same sha256), or None: heal measures the
    student and the healed model, and evaluate reads those figures instead of measuring again."""
    try:
        figures = json.loads(_figures_file(folder, model_dir).read_text())
    except (OSError, ValueError):
        return None
    ok = isinstance(figures, dict) and all(isinstance(figures.get(k), (int, float)) for k in FIGURE_KEYS)
    return {k: figures[k] for k in FIGURE_KEYS} if ok else None


def store_figures(folder: Path, model_dir: Path, figures: dict[str, float]) -> None:
    """Keep ``FIGURE_KEYS`` of ``figures`` (the HF model ``model_dir``, measured against the
    reference in ``folder``) for ``known_figures``."""
    path = _figures_file(folder, model_dir)
    path.parent.mkdir(exist_ok=True)
    write_json(path, {k: float(figures[k]) for k in FIGURE_KEYS})


def windows_hash(windows: list[list[int]]) -> str:
    return hashlib.sha256(json.dumps(windows, separators=(",", ":")).encode()).hexdigest()


def reference_folder(teacher_dir: Path, windows: list[list[int]], run_dir: Path | None) -> Path:
    """Where the reference of ``teacher_dir`` on ``windows`` is kept: ``run_dir/cache/teacher-reference``
    (the user cache without a run), named by the teacher's sha256, the windows' hash and the dtype."""
    from .embedded import cache_dir, content_sha256

    digest = content_sha256(teacher_dir)
    root = Path(run_dir) / "cache" if run_dir is not None else cache_dir()
    return root / REFERENCE_DIR / f"{digest[:16]}-{windows_hash(windows)[:16]}-{REFERENCE_DTYPE}"


def teacher_reference(teacher_dir: Path, windows: list[list[int]], *, options: RunOptions | None = None,
                      run_dir: Path | None = None, log: Callable[[str], None] = lambda message: None,
                      text: str = "held-out", loaded: Any = None) -> TeacherReference:
    """The teacher's reference on ``windows`` (of ``text``, for the log): read from its cache folder,
    or computed there first, with ``loaded`` when given (the teacher already loaded in float32 on the
    run's device, which stays loaded) instead of loading it again."""
    teacher_dir = Path(teacher_dir)
    folder = reference_folder(teacher_dir, windows, run_dir)
    if not (folder / SUMMARY_FILE).is_file():
        log(f"teacher log-probabilities on {len(windows)} {text} windows (cached in {folder})")
        with atomic_path(folder, is_dir=True) as tmp:
            _compute(teacher_dir, windows, tmp, options or RunOptions(), loaded)
    summary = json.loads((folder / SUMMARY_FILE).read_text())
    return TeacherReference(folder, teacher_dir, windows, summary["tokens"], summary["teacher_perplexity"])


def heldout_reference(ctx: Any) -> TeacherReference:
    """The run's teacher reference: ``ctx.inputs["teacher_dir"]`` on ``data.heldout`` cut by
    ``heldout_windows`` with the teacher's tokenizer (the windows heal and evaluate measure on)."""
    from . import modelio
    from .hooks.data import heldout_windows

    teacher_dir = Path(ctx.inputs["teacher_dir"])
    windows = heldout_windows(ctx.recipe.data.heldout, modelio.load_tokenizer(teacher_dir, ctx.options), ctx, teacher_dir)
    return teacher_reference(teacher_dir, windows, options=ctx.options, run_dir=ctx.run_dir, log=ctx.log)


def _compute(teacher_dir: Path, windows: list[list[int]], folder: Path, options: RunOptions, loaded: Any) -> None:
    import numpy as np

    teacher = HFModel(teacher_dir, options, loaded)
    try:
        n_scored = sum(len(w) - 1 for w in windows)
        store = np.lib.format.open_memmap(folder / LOGPROBS_FILE, mode="w+", dtype=np.float32,
                                          shape=(n_scored, teacher.n_vocab))
        meter, start = QualityMeter(), 0
        for w in windows:
            lp = teacher.log_probs(w)
            store[start:start + len(lp)] = lp
            meter.add_nll(lp, w[1:])
            start += len(lp)
        store.flush()
        del store
    finally:
        teacher.close()
    (folder / WINDOWS_FILE).write_text(json.dumps(windows))
    write_json(folder / SUMMARY_FILE, {"teacher_dir": str(teacher_dir), "dtype": REFERENCE_DTYPE,
                                       "tokens": n_scored, "teacher_perplexity": meter.result()["perplexity"]})


def _cache_keyword(model: Any) -> str:
    """The key/value cache's name in ``model.forward`` and its output: ``cache`` since transformers
    5.x, ``past_key_values`` before."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class HFModel:
    """An HF directory in PyTorch (float32) on the run's device; ``loaded``: that model, loaded already."""

    def __init__(self, path: Path, options: RunOptions, loaded: Any = None):
        from . import modelio

        self.model = loaded if loaded is not None else modelio.load_model(
            path, options, dtype=REFERENCE_DTYPE, device=options.resolved_device())
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])

    def log_probs(self, tokens: list[int]):
        """Log-softmax over the vocabulary at each position but the last (row i predicts tokens[i+1])."""
        return self.log_probs_many([tokens])[0]

    def log_probs_many(self, sequences: list[list[int]]) -> list:
        """``log_probs`` of several sequences in one batch (right-padded: causal attention never
        sees the padding, and its positions are dropped)."""
        import torch

        width = max(map(len, sequences))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=self.model.device)
        with torch.no_grad():
            lp = torch.log_softmax(self.model(input_ids=ids).logits[:, :-1].float(), dim=-1).cpu().numpy()
        return [lp[i, :len(s) - 1] for i, s in enumerate(sequences)]

    def choice_log_likelihoods(self, context: list[int], choices: list[list[int]]) -> list[float]:
        """Log-likelihood of each choice's tokens after ``context``: the context runs once, and the
        choices continue from its key/value cache in one batch (right-padded, so causal attention
        never sees the padding)."""
        import torch

        device = self.model.device
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([context], device=device), use_cache=True)
            first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)
            keyword = _cache_keyword(self.model)
            cache = getattr(out, keyword)
            cache.batch_repeat_interleave(len(choices))
            width = max(map(len, choices))
            ids = torch.tensor([c + [0] * (width - len(c)) for c in choices], device=device)
            lp = torch.log_softmax(self.model(input_ids=ids, **{keyword: cache}).logits.float(), dim=-1)
        return [float(first[c[0]] + sum(lp[row, i, t] for i, t in enumerate(c[1:]))) for row, c in enumerate(choices)]

    def greedy_many(self, prompts: list[list[int]], max_new: int, stop: set[int]) -> list[list[int]]:
        """Greedy continuations of ``prompts`` (up to ``max_new`` tokens, ending before a ``stop``
        token), generated in one left-padded batch."""
        import torch

        width = max(map(len, prompts))
        pad = min(stop, default=0)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=self.model.device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.model.device)
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=mask, max_new_tokens=max_new, do_sample=False,
                                      eos_token_id=sorted(stop) or None, pad_token_id=pad)
        answers = []
        for row in out[:, width:].tolist():
            end = next((i for i, token in enumerate(row) if token in stop), len(row))
            answers.append(row[:end])
        return answers

    def close(self) -> None:
        del self.model
