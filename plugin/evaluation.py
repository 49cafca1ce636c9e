"""Evaluate: every stage and quant measured against the teacher on the same held-out tokens.

One table, one row per model: the teacher, the pruned and the healed HF directories (PyTorch
logits) and every GGUF file (llama.cpp logits), plus the teacher's own quants when the recipe asks
(``evaluate.teacher_quants``), so a pruned Q4_K_M sits next to the original Q4_K_M. Columns:

* perplexity, KL(teacher || model) and top-1 agreement with the teacher, on ``data.heldout``
  tokenized once with the teacher's tokenizer, against the run's cached teacher reference
  (``reference.teacher_reference``, the one heal's checks read too);
* ``knowledge``: accuracy on a small multiple-choice set written for this project
  (``ollama_compress/data/knowledge.jsonl``), each choice scored by its log-likelihood;
* greedy answers to a few fixed prompts, rendered through the teacher's chat template;
* file size; prompt and generation tokens/s in llama.cpp (GGUF rows).

Held-out text must be text no stage calibrated or trained on: every 32-token span of the held-out
windows is hashed and looked up among the spans of the calibration windows and the heal text.

``evaluate_run`` is the one path: the evaluate stage and the ``evaluate`` command both call it.
It calls the ``evaluate`` hook once per row and merges every plugin's result into the row.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from . import modelio
from .context import StageContext
from .embedded import content_sha256
from .errors import UserError
from .fsutil import settings_hash, write_json
from .gguf_verify import verify_gguf
from .hooks.data import bos_prefix, unseen_heldout_windows
from .hooks.quantize import (LlamaScorer, llama_threads, measure_heldout_quants, measure_speeds,
                             quality_against, quantize_through_hook, speed_ratio, stored_quant_row)
from .planner import gguf_size, model_shape
from .plugins import call_first, get_plugin_manager
from .quant_names import NEEDS_IMATRIX, QUANTS, UNQUANTIZED, quantizable
from .recipe import Evaluate, Export
from .reference import FIGURE_KEYS, HFModel, known_figures, log_softmax, store_figures, teacher_reference
from .report import rich_table, run_plan, write_report

QUALITY_RETAINED = (
    "quality retained = teacher perplexity / model perplexity on the same held-out tokens, in percent "
    "(100% = as good as the teacher; 80% = perplexity 1.25 times the teacher's)"
)
DEFAULT_PROMPTS = (
    "What is the capital of France? Answer in one sentence.",
    "Give three tips for sleeping well.",
    "Write a Python function that returns the sum of a list of numbers.",
    "Explain in two sentences why the sky is blue.",
    "Translate 'good morning, how are you?' into Spanish.",
)
KNOWLEDGE_FILE = "knowledge.jsonl"
SPEED_KEYS = ("prompt_tokens_per_s", "gen_tokens_per_s", "prompt_tokens_per_cpu_s", "gen_tokens_per_cpu_s",
              "speed_threads", "speed_rounds", "load_average", "decode_seconds")
REFERENCE_KEY = "heldout_reference"  # the ctx.inputs key the evaluate hook reads


def quality_retained(teacher_perplexity: float, perplexity: float) -> float:
    """``QUALITY_RETAINED`` for one model, in percent."""
    return 100.0 * teacher_perplexity / perplexity


# ---------------------------------------------------------------- rows to measure
@dataclass(frozen=True)
class Candidate:
    """One row of the table: a model file or directory and what it is."""

    name: str  # "teacher", "pruned", "healed", "pruned Q4_K_M", "teacher Q4_K_M", ...
    path: Path
    model: str  # teacher | pruned | healed | the name of a model given to the command
    quant: str | None = None  # None for HF directories

    @property
    def kind(self) -> str:
        return "gguf" if self.path.suffix == ".gguf" else "hf"


def stage_candidates(inputs: dict[str, Any]) -> list[Candidate]:
    """Teacher, pruned and healed HF directories and the export's GGUFs, from the stage inputs."""
    rows = [Candidate("teacher", Path(inputs["teacher_dir"]), "teacher")]
    for model in ("pruned", "healed"):
        if inputs.get(f"{model}_dir"):
            rows.append(Candidate(model, Path(inputs[f"{model}_dir"]), model))
    exported = "healed" if inputs.get("healed_dir") else "pruned" if inputs.get("pruned_dir") else "teacher"
    for quant, path in (inputs.get("gguf") or {}).items():
        rows.append(Candidate(f"{exported} {quant}", Path(path), exported, quant))
    return rows


NEAREST_TEACHER_QUANTS = 3  # evaluate.teacher_quants auto: this many teacher quants per compressed file


def auto_teacher_quants(teacher: Any, compressed: dict[str, tuple[str, int]], imatrix: bool) -> dict[str, list[str]]:
    """For each compressed quant (row name -> (quant, file bytes)), the same quant and the
    ``NEAREST_TEACHER_QUANTS`` teacher quants whose estimated file sizes (``planner.gguf_size`` of
    the teacher's shape ``teacher``, the one size estimate) are nearest its real size; the files
    are then made and measured. Quants that need an importance matrix count only when ``imatrix``
    (``export.imatrix`` is set)."""
    usable = quantizable(imatrix)
    estimate = {q: gguf_size(teacher, q) for q in usable}
    picks = {}
    for name, (quant, size) in compressed.items():
        nearest = sorted(usable, key=lambda q: (abs(estimate[q] - size), q))
        picks[name] = list(dict.fromkeys([*([quant] if quant in usable else []), *nearest[:NEAREST_TEACHER_QUANTS]]))
    return picks


def has_imatrix(ctx: StageContext) -> bool:
    """Whether the teacher's quants get an importance matrix (``export.imatrix``, auto by default)."""
    return ctx.recipe.export is None or ctx.recipe.export.imatrix is not None


def wanted_teacher_quants(ctx: StageContext, teacher_dir: Path, candidates: list[Candidate]) -> list[str]:
    """``evaluate.teacher_quants`` with ``auto`` expanded by ``auto_teacher_quants`` over the
    compressed GGUF rows among ``candidates``."""
    settings = ctx.settings
    named = [q for q in settings.teacher_quants if q != "auto"]
    if "auto" not in settings.teacher_quants:
        return named
    compressed = {c.name: (c.quant, model_size(c.path)) for c in candidates
                  if c.kind == "gguf" and c.model != "teacher" and c.quant in QUANTS and c.quant not in UNQUANTIZED}
    picks = auto_teacher_quants(model_shape(teacher_dir), compressed, imatrix=has_imatrix(ctx))
    for name, quants in picks.items():
        ctx.log(f"teacher quants beside {name}: {', '.join(quants)}")
    return list(dict.fromkeys([*named, *(q for quants in picks.values() for q in quants)]))


class TeacherQuants:
    """The teacher through the ``export_gguf`` and ``quantize_gguf`` hooks, with the recipe's
    ``export.imatrix`` rule, measured like the export stage's quants (``quants.json`` beside
    them); cached in ``run_dir/cache/teacher-gguf`` under the teacher's content hash and those
    settings."""

    def __init__(self, ctx: StageContext, teacher_dir: Path, outtype: str):
        export = (ctx.recipe.export or Export()).model_copy(update={"outtype": outtype, "quants": []})
        digest = content_sha256(teacher_dir)
        reads = {"outtype": outtype, "imatrix": export.imatrix,
                 "calibration": ctx.recipe.data.calibration.model_dump(mode="json") if export.imatrix == "auto" else None}
        self.folder = Path(ctx.run_dir) / "cache" / "teacher-gguf" / f"{digest[:16]}-{settings_hash(reads)[:8]}"
        self.folder.mkdir(parents=True, exist_ok=True)
        self.ctx, self.teacher_dir, self.outtype = ctx, teacher_dir, outtype
        self.quant_ctx = StageContext(stage="export", recipe=ctx.recipe.model_copy(update={"name": "teacher", "export": export}),
                                      run_dir=ctx.run_dir, out_dir=self.folder, options=ctx.options, console=ctx.console,
                                      section="export", inputs={"model_dir": str(teacher_dir),
                                                                "teacher_dir": str(teacher_dir)})
        self.index_path = self.folder / "files.json"
        self.index = json.loads(self.index_path.read_text()) if self.index_path.is_file() else {}
        self._base: Path | None = None

    def _cached(self, quant: str) -> Path | None:
        name = self.index.get(quant)
        return self.folder / name if name and (self.folder / name).is_file() else None

    def _record(self, quant: str, path: Path) -> Path:
        self.index[quant] = Path(path).name
        write_json(self.index_path, self.index)
        return Path(path)

    @property
    def base(self) -> Path:
        """The teacher's unquantized GGUF (``export_gguf``)."""
        if self._base is None:
            self._base = self._cached(self.outtype)
        if self._base is None:
            self.ctx.log(f"exporting the teacher to {self.outtype} GGUF (cached in {self.folder})")
            self._base = self._record(self.outtype, call_first("export_gguf", ctx=self.quant_ctx,
                                                               model_dir=self.teacher_dir, outtype=self.outtype))
        return self._base

    def make(self, quants: list[str], taken: set[str]) -> list[Candidate]:
        """A row for each of ``quants`` not in ``taken`` (row names), quantized unless cached."""
        rows = []
        for quant in (q for q in dict.fromkeys(quants) if f"teacher {q}" not in taken):
            path = self.base if quant == self.outtype else self._cached(quant)
            if path is None:
                self.ctx.log(f"quantizing the teacher to {quant}")
                path = self._record(quant, quantize_through_hook(self.quant_ctx, self.base, quant))
            rows.append(Candidate(f"teacher {quant}", path, "teacher", quant))
        return rows

    def match_below(self, candidates: list[Candidate], imatrix: bool) -> list[Candidate]:
        """``auto``: where every teacher quant is larger than a compressed file, the next smaller
        types of the table (at most ``NEAREST_TEACHER_QUANTS`` more) until one is not, so each
        compressed quant has a teacher quant at its size or smaller to be judged against."""
        shape = model_shape(self.teacher_dir)

        def bits(quant: str) -> int:
            return gguf_size(shape, quant)

        added: list[Candidate] = []
        compressed = [c for c in candidates if c.kind == "gguf" and c.model != "teacher" and c.quant not in UNQUANTIZED]
        for row in compressed:
            for _ in range(NEAREST_TEACHER_QUANTS):
                teacher = [c for c in [*candidates, *added] if c.model == "teacher" and c.kind == "gguf"
                           and c.quant in QUANTS]
                if not teacher or any(model_size(t.path) <= model_size(row.path) for t in teacher):
                    break
                smallest = min(teacher, key=lambda t: model_size(t.path))
                names = {c.name for c in [*candidates, *added]}
                lower = [q for q in QUANTS if q not in UNQUANTIZED and bits(q) < bits(smallest.quant)
                         and (imatrix or q not in NEEDS_IMATRIX) and f"teacher {q}" not in names]
                if not lower:
                    break
                added += self.make([max(lower, key=bits)], names)
        return added

    def measure(self, rows: list[Candidate], reference_key: str) -> None:
        """``quants.json`` over the teacher quants among ``rows``, unless it holds them all already,
        measured against the teacher reference ``reference_key``."""
        quantized = {c.quant: c.path for c in rows if c.model == "teacher" and c.path.parent == self.folder
                     and c.path != self.base}
        if quantized and any((stored_quant_row(p) or {}).get("teacher_reference") != reference_key
                             for p in quantized.values()):
            # the teacher's unquantized GGUF is no row of the report: not measured
            measure_heldout_quants(self.quant_ctx, None, quantized, self.folder, speed=self.ctx.settings.speed)
        self.ctx.metrics["teacher_gguf"] = {"folder": str(self.folder), **self.quant_ctx.metrics}


# ---------------------------------------------------------------- backends
class LlamaModel(LlamaScorer):
    """A GGUF file in llama.cpp: log-probabilities for every position, and greedy answers."""

    def choice_log_likelihoods(self, context: list[int], choices: list[list[int]]) -> list[float]:
        """Log-likelihood of each choice's tokens after ``context``: the context is evaluated once
        and each choice continues from its cache (llama.cpp drops the cache past ``n_tokens``)."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(context)
        out = []
        for choice in choices:
            self.llm.n_tokens = len(context)
            self.llm.eval(choice)
            logits = np.array(self.llm.scores[len(context) - 1 : len(context) + len(choice) - 1], dtype=np.float32)
            out.append(_choice_sum(log_softmax(logits), 0, choice))
        return out

    def greedy_many(self, prompts: list[list[int]], max_new: int, stop: set[int]) -> list[list[int]]:
        """Greedy continuations of ``prompts`` (up to ``max_new`` tokens, ending before a ``stop`` token)."""
        return [self.greedy(p, max_new, stop) for p in prompts]

    def greedy(self, tokens: list[int], max_new: int, stop: set[int]) -> list[int]:
        self.llm.reset()
        self.llm.eval(tokens)
        new: list[int] = []
        while len(new) < max_new:
            token = self.llm.sample(temp=0.0, top_k=1, repeat_penalty=1.0)
            if token in stop:
                break
            new.append(token)
            self.llm.eval([token])
        return new


def heldout_quality(backend, windows: list[list[int]], teacher_lp) -> dict[str, Any]:
    """Perplexity, KL(teacher || model) and top-1 agreement over the held-out windows."""
    if backend.n_vocab != teacher_lp.shape[1]:
        raise UserError(f"the model's vocabulary of {backend.n_vocab} tokens differs from the teacher's "
                        f"{teacher_lp.shape[1]}; evaluate models that share the teacher's tokenizer")
    quality = quality_against(backend, windows, teacher_lp)
    return {key: quality[key] for key in FIGURE_KEYS}


# ---------------------------------------------------------------- knowledge and answers
def knowledge_questions() -> list[dict[str, Any]]:
    """The shipped multiple-choice set: ``{"question", "choices", "answer" (index)}`` per line."""
    text = resources.files("ollama_compress.data").joinpath(KNOWLEDGE_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def knowledge_sequences(tokenizer, questions: list[dict[str, Any]] | None = None
                        ) -> list[tuple[list[int], list[list[int]], int]]:
    """(context tokens, token ids of each choice, index of the right one) per question of
    ``questions`` (default: the shipped set, ``knowledge_questions``)."""
    prefix = bos_prefix(tokenizer)
    out = []
    for q in questions if questions is not None else knowledge_questions():
        context = prefix + tokenizer(f"Question: {q['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        choices = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in q["choices"]]
        out.append((context, choices, q["answer"]))
    return out


def _choice_sum(lp, first: int, choice: list[int]) -> float:
    """The log-probabilities of ``choice``'s tokens, the first read at row ``first`` of ``lp``."""
    return sum(float(lp[first + i, t]) for i, t in enumerate(choice))


def knowledge_accuracy(backend, sequences) -> float:
    """Share of questions whose right choice has the highest log-likelihood after the question
    (``choice_log_likelihoods`` of either backend)."""
    right = 0
    for context, choices, answer in sequences:
        scores = backend.choice_log_likelihoods(context, choices)
        right += int(max(range(len(scores)), key=scores.__getitem__) == answer)
    return right / len(sequences)


def prompt_tokens(tokenizer, prompt: str) -> list[int]:
    """A user prompt through the chat template (plain text with BOS when there is none)."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            tokenize=True, return_dict=True)["input_ids"]
        return list(ids)
    return bos_prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]


def stop_tokens(tokenizer, model_path: Path) -> set[int]:
    """EOS ids of the tokenizer and of the model's generation config."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    config = model_path / "generation_config.json" if model_path.is_dir() else None
    if config is not None and config.is_file():
        eos = json.loads(config.read_text()).get("eos_token_id")
        ids |= set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


# ---------------------------------------------------------------- one row (the built-in hook)
def measure_model(ctx: StageContext, model_path: Path) -> dict[str, Any]:
    """Every built-in column for one model (HF directory or GGUF file) against the teacher reference
    in ``ctx.inputs[REFERENCE_KEY]``."""
    import numpy as np

    reference = ctx.inputs[REFERENCE_KEY]
    settings = ctx.settings or Evaluate()
    teacher_dir = Path(reference["teacher_dir"])
    tokenizer = modelio.load_tokenizer(teacher_dir, ctx.options)
    windows = json.loads(Path(reference["windows"]).read_text())
    prompts = [prompt_tokens(tokenizer, p) for p in (settings.prompts or DEFAULT_PROMPTS)]
    sequences = knowledge_sequences(tokenizer) if settings.knowledge else []
    is_gguf = model_path.suffix == ".gguf"
    if is_gguf:
        longest = max([len(w) for w in windows] + [len(p) + settings.max_new_tokens for p in prompts]
                      + [len(c) + max(map(len, ch)) for c, ch, _ in sequences])
        backend = LlamaModel(model_path, n_ctx=longest, threads=reference.get("threads"))
    else:
        backend = HFModel(model_path, ctx.options)
    row: dict[str, Any] = {"size_bytes": model_size(model_path)}
    try:
        teacher_lp = np.load(reference["teacher_logprobs"], mmap_mode="r")
        stored = stored_quant_row(model_path) if is_gguf else None
        if not is_gguf and model_path.resolve() == teacher_dir.resolve():
            row.update(perplexity=reference["teacher_perplexity"], kl=0.0, top1_agreement=1.0)
        elif stored and stored.get("teacher_reference") == reference["key"]:  # the quant table's figures
            row.update(perplexity=stored["perplexity"], kl=stored["mean_kl"], top1_agreement=stored["top1_agreement"])
        elif not is_gguf and (known := known_figures(Path(reference["folder"]), model_path)) is not None:
            row.update(known)  # measured by heal (or an earlier evaluate) on these very weights
        else:
            row.update(heldout_quality(backend, windows, teacher_lp))
            if not is_gguf:
                store_figures(Path(reference["folder"]), model_path, row)
        if sequences:
            row["knowledge_accuracy"] = knowledge_accuracy(backend, sequences)
        stop = stop_tokens(tokenizer, teacher_dir)
        row["answers"] = [tokenizer.decode(answer, skip_special_tokens=True).strip()
                          for answer in backend.greedy_many(prompts, settings.max_new_tokens, stop)]
    finally:
        backend.close()
    if is_gguf and settings.speed:
        row.update((reference.get("speeds") or {}).get(str(model_path)) or {})
    return row


def gguf_speeds(candidates: list[Candidate], windows: list[list[int]], threads: int | None) -> dict[str, dict[str, Any]]:
    """Speed figures of every GGUF row, by path: the export stage's (``quants.json`` beside the
    file, same fingerprint and threads) where there is one, the others measured together by
    ``measure_speeds``, so a file gets one figure per run."""
    speeds: dict[str, dict[str, Any]] = {}
    fresh = []
    for path in dict.fromkeys(c.path for c in candidates if c.kind == "gguf"):
        stored = stored_quant_row(path) or {}
        if stored.get("gen_tokens_per_s") and stored.get("speed_threads") == llama_threads(threads)["n_threads"]:
            speeds[str(path)] = {k: stored[k] for k in SPEED_KEYS if k in stored}
        else:
            fresh.append(path)
    if fresh:
        for path, figures in zip(fresh, measure_speeds(fresh, [t for w in windows for t in w], threads=threads)):
            speeds[str(path)] = figures
    return speeds


def model_size(path: Path) -> int:
    """Bytes of a GGUF file, or of an HF directory's weight files."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))


# ---------------------------------------------------------------- the run
def merge_results(results: Iterable[dict[str, Any] | None]) -> dict[str, Any]:
    """One dict from every plugin's ``evaluate`` result; on a shared key the earlier-called plugin
    (a third-party one; built-ins are trylast) wins."""
    merged: dict[str, Any] = {}
    for result in reversed(list(results)):
        merged.update(result or {})
    return merged


def measure_row(ctx: StageContext, candidate: Candidate, reference: dict[str, Any]) -> dict[str, Any]:
    """Call the ``evaluate`` hook of every plugin for one model and merge the results into a row."""
    row_ctx = StageContext(stage=ctx.stage, recipe=ctx.recipe, run_dir=ctx.run_dir, out_dir=ctx.out_dir,
                           options=ctx.options, console=ctx.console, section=ctx.section,
                           inputs={**ctx.inputs, REFERENCE_KEY: reference,
                                   "candidate": {"name": candidate.name, "model": candidate.model,
                                                 "quant": candidate.quant, "kind": candidate.kind}})
    started = time.perf_counter()
    merged = merge_results(get_plugin_manager().hook.evaluate(ctx=row_ctx, model_path=candidate.path))
    row = {"name": candidate.name, "model": candidate.model, "quant": candidate.quant, "kind": candidate.kind,
           "path": str(candidate.path), **merged, "eval_seconds": round(time.perf_counter() - started, 1)}
    ctx.log(f"evaluated {candidate.name}: " + ", ".join(
        f"{k} {row[k]:.4g}" for k in FIGURE_KEYS if isinstance(row.get(k), float)))
    return row


def add_quality_retained(rows: list[dict[str, Any]]) -> None:
    teacher = next((r for r in rows if r["name"] == "teacher"), None)
    if teacher is None or not teacher.get("perplexity"):
        return
    for row in rows:
        if row.get("perplexity"):
            row["quality_retained"] = quality_retained(teacher["perplexity"], row["perplexity"])


def evaluate_run(ctx: StageContext, models: dict[str, Path] | None = None,
                 threads: int | None = None) -> dict[str, Any]:
    """Measure the teacher and every stage and quant in ``ctx.inputs`` (or the teacher and
    ``models``), write ``evaluation.json`` and ``report.md`` with its PNGs into ``ctx.out_dir``,
    put the numbers into ``ctx.metrics``, and return ``{"evaluation": path, "report": path}``."""
    settings = ctx.settings or Evaluate()
    teacher_dir = Path(ctx.inputs["teacher_dir"])
    tokenizer = modelio.load_tokenizer(teacher_dir, ctx.options)
    windows = unseen_heldout_windows(ctx.recipe.data, tokenizer, ctx, teacher_dir, heal=ctx.recipe.heal is not None)
    reference = teacher_reference(teacher_dir, windows, options=ctx.options, run_dir=ctx.run_dir, log=ctx.log)
    if models is None:
        candidates = stage_candidates(ctx.inputs)
    else:
        candidates = [Candidate("teacher", teacher_dir, "teacher"),
                      *(Candidate(name, Path(p), name, _quant_of(Path(p))) for name, p in models.items())]
    if settings.teacher_quants:
        teacher_quants = TeacherQuants(ctx, teacher_dir, ctx.recipe.export.outtype if ctx.recipe.export else "F16")
        candidates += teacher_quants.make(wanted_teacher_quants(ctx, teacher_dir, candidates), {c.name for c in candidates})
        if "auto" in settings.teacher_quants:
            candidates += teacher_quants.match_below(candidates, imatrix=has_imatrix(ctx))
        teacher_quants.measure(candidates, reference.key)
    described = reference.describe() | {"threads": threads}
    if settings.speed:
        described["speeds"] = gguf_speeds(candidates, windows, threads)
    rows = [measure_row(ctx, c, described) for c in candidates]
    add_quality_retained(rows)
    verdicts = equal_size_verdicts(rows, [t for w in windows for t in w] if settings.speed else None, threads)
    evaluation = {"quality_retained": QUALITY_RETAINED, "heldout_tokens": reference.tokens,
                  "heldout_windows": len(windows), "prompts": list(settings.prompts or DEFAULT_PROMPTS),
                  "knowledge_questions": len(knowledge_questions()) if settings.knowledge else 0, "rows": rows,
                  "verdicts": verdicts}
    evaluation_path = write_json(Path(ctx.out_dir) / "evaluation.json", evaluation)
    ctx.metrics["evaluation"] = evaluation
    report_path, figures = write_report(Path(ctx.out_dir), ctx.recipe.name, evaluation, ctx.inputs,
                                        run_plan(ctx.run_dir) if models is None else None)
    ctx.metrics["figures"] = figures
    if ctx.console is not None:
        ctx.console.print(rich_table(rows))
    return {"evaluation": str(evaluation_path), "report": str(report_path)}


# ---------------------------------------------------------------- worth it at equal size
def size_match(row: dict[str, Any], teacher_rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The teacher quant a compressed quant is judged against: the one with the lowest KL among
    those no larger than it, or the nearest in size when all are larger."""
    measured = [t for t in teacher_rows if isinstance(t.get("kl"), (int, float))]
    smaller = [t for t in measured if t["size_bytes"] <= row["size_bytes"]]
    if smaller:
        return min(smaller, key=lambda t: (t["kl"], -t["size_bytes"]))
    return min(measured, key=lambda t: abs(t["size_bytes"] - row["size_bytes"]), default=None)


def verdict_sentence(verdict: dict[str, Any]) -> str:
    """One sentence: did pruning pay at this size, in quality (KL to the teacher) and in decode speed."""
    quality = "paid" if verdict["quality_paid"] else "did not pay"
    sentence = (f"At {verdict['size_bytes'] / 2**20:.1f} MiB ({verdict['name']}), pruning {quality} in quality: "
                f"teacher {verdict['teacher_quant']} ({verdict['teacher_size_bytes'] / 2**20:.1f} MiB) has KL "
                f"{verdict['teacher_kl']:.3g} vs {verdict['kl']:.3g}")
    ratio = verdict.get("decode_ratio")
    if ratio is None:
        return sentence + "; decode speed was not measured."
    speed = "paid" if verdict["speed_paid"] else "did not pay"
    return sentence + (f"; it {speed} in speed: {ratio:.2f}x the teacher quant's decode tokens/s "
                       f"(interleaved runs, load average {verdict['load_average'][0]:.1f}).")


def equal_size_verdicts(rows: list[dict[str, Any]], tokens: list[int] | None,
                        threads: int | None = None) -> list[dict[str, Any]]:
    """For each compressed GGUF row, ``size_match`` among the teacher's GGUF rows: KL to the teacher
    of both, and (``tokens``) the decode-speed ratio of the two files run in turn by
    ``measure_speeds`` (``speed_ratio``), with its ``verdict_sentence``."""
    ggufs = [r for r in rows if r.get("kind") == "gguf" and r.get("size_bytes") and isinstance(r.get("kl"), (int, float))]
    teacher = [r for r in ggufs if r["model"] == "teacher"]
    verdicts = []
    for row in (r for r in ggufs if r["model"] != "teacher" and r.get("quant") not in ("F32", "F16", "BF16")):
        match = size_match(row, teacher)
        if match is None:
            continue
        verdict = {"name": row["name"], "size_bytes": row["size_bytes"], "kl": row["kl"],
                   "teacher_quant": match.get("quant") or match["name"], "teacher_size_bytes": match["size_bytes"],
                   "teacher_kl": match["kl"], "quality_paid": row["kl"] < match["kl"]}
        if tokens:
            pruned, original = measure_speeds([Path(row["path"]), Path(match["path"])], tokens, threads=threads)
            ratio = speed_ratio(pruned, original)
            verdict.update(decode_ratio=round(ratio, 3), speed_paid=ratio > 1.0, load_average=pruned["load_average"])
        verdict["sentence"] = verdict_sentence(verdict)
        verdicts.append(verdict)
    return verdicts


def _quant_of(path: Path) -> str | None:
    if path.suffix != ".gguf":
        return None

    return verify_gguf(path).file_type
