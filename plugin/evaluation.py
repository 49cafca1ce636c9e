"""Evaluate: every stage and quant measured against the teacher on the same held-out tokens.

One table, one row per model: the teacher, the pruned and the healed HF directories (PyTorch
logits) and every GGUF file (llama.cpp logits), plus the teacher's own quants when the recipe asks
(``evaluate.teacher_quants``), so a pruned Q4_K_M sits next to the original Q4_K_M. Columns:

* perplexity, KL(teacher || model) and top-1 agreement with the teacher, on ``data.heldout``
  tokenized once with the teacher's tokenizer; the teacher's log-probabilities are computed once
  and kept in a memory-mapped file;
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
import math
import tempfile
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable

from .context import StageContext
from .errors import UserError
from .fsutil import write_json
from .hooks.data import bos_prefix, unseen_heldout_windows
from .hooks.quantize import LlamaScorer

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
SPEED_PROMPT_TOKENS = 256
SPEED_GEN_TOKENS = 64
SPEED_REPEATS = 3  # the fastest of these runs counts: other work on the machine only slows a run down
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


def teacher_quant_candidates(ctx: StageContext, teacher_dir: Path, quants: list[str],
                             outtype: str, taken: set[str]) -> list[Candidate]:
    """The teacher exported with the export API and quantized with the quantize API, cached in
    ``run_dir/cache/teacher-gguf`` under the teacher's content hash."""
    wanted = [q for q in quants if f"teacher {q}" not in taken]
    if not wanted:
        return []
    from ollama_compress.embedded import cache_dir
    from ollama_compress.fsutil import Fingerprints
    from ollama_compress.hooks.export import export_gguf
    from ollama_compress.hooks.quantize import quant_file_name, quantize_file

    digest = Fingerprints(cache_dir() / "fingerprints.json").sha256(teacher_dir)
    folder = Path(ctx.run_dir) / "cache" / "teacher-gguf" / digest[:16]
    base = folder / f"teacher-{outtype}.gguf"
    if not base.is_file():
        ctx.log(f"exporting the teacher to {outtype} GGUF (cached in {folder})")
        export_gguf(teacher_dir, base, outtype, {"name": "teacher"}, ctx.options)
    rows = []
    for quant in wanted:
        path = base if quant == outtype else folder / quant_file_name(base, quant)
        if not path.is_file():
            ctx.log(f"quantizing the teacher to {quant}")
            quantize_file(base, quant, path)
        rows.append(Candidate(f"teacher {quant}", path, "teacher", quant))
    return rows


# ---------------------------------------------------------------- backends
class HFModel:
    """An HF directory in PyTorch (float32)."""

    def __init__(self, path: Path, ctx: StageContext):
        from ollama_compress import modelio

        self.model = modelio.load_model(path, ctx.options, dtype="float32", device=ctx.device)
        self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])

    def log_probs(self, tokens: list[int]):
        """Log-softmax over the vocabulary at each position but the last (row i predicts tokens[i+1])."""
        import torch

        ids = torch.tensor([tokens], device=self.model.device)
        with torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, :-1].float()
        return torch.log_softmax(logits, dim=-1).cpu().numpy()

    def log_probs_many(self, sequences: list[list[int]]) -> list:
        """``log_probs`` of several sequences in one batch (right-padded: causal attention never
        sees the padding, and its positions are dropped)."""
        import torch

        width = max(map(len, sequences))
        ids = torch.tensor([s + [0] * (width - len(s)) for s in sequences], device=self.model.device)
        with torch.no_grad():
            lp = torch.log_softmax(self.model(input_ids=ids).logits[:, :-1].float(), dim=-1).cpu().numpy()
        return [lp[i, :len(s) - 1] for i, s in enumerate(sequences)]

    def greedy(self, tokens: list[int], max_new: int, stop: set[int]) -> list[int]:
        import torch

        ids = torch.tensor([tokens], device=self.model.device)
        with torch.no_grad():
            out = self.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new,
                                      do_sample=False, eos_token_id=sorted(stop) or None,
                                      pad_token_id=next(iter(stop), 0))
        new = out[0, len(tokens):].tolist()
        return _until_stop(new, stop)

    def close(self) -> None:
        del self.model


class LlamaModel(LlamaScorer):
    """A GGUF file in llama.cpp: log-probabilities for every position, and greedy answers."""

    def log_probs_many(self, sequences: list[list[int]]) -> list:
        return [self.log_probs(s) for s in sequences]

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


def _until_stop(tokens: list[int], stop: set[int]) -> list[int]:
    for i, token in enumerate(tokens):
        if token in stop:
            return tokens[:i]
    return tokens


def llama_speed(path: Path, prompt: list[int], threads: int | None = None,
                gen_tokens: int = SPEED_GEN_TOKENS) -> dict[str, Any]:
    """Prompt and generation tokens/s of a GGUF in llama.cpp (no logits kept, greedy decoding;
    the fastest of ``SPEED_REPEATS`` runs)."""
    from ollama_compress.hooks.quantize import _import_llama_cpp, llama_log_capture, llama_threads

    llama_cpp = _import_llama_cpp()
    prompt = prompt[:SPEED_PROMPT_TOKENS]
    n_ctx = len(prompt) + gen_tokens + 8
    with llama_log_capture():
        llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, **llama_threads(threads), verbose=False)
    try:
        llm.eval(prompt[:8])  # warm-up: page the weights in
        prompt_s, gen_s = [], []
        for _ in range(SPEED_REPEATS):
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(prompt)
            t1 = time.perf_counter()
            for _ in range(gen_tokens):
                llm.eval([llm.sample(temp=0.0, top_k=1, repeat_penalty=1.0)])
            prompt_s.append(t1 - t0)
            gen_s.append(time.perf_counter() - t1)
        return {"prompt_tokens_per_s": round(len(prompt) / min(prompt_s), 1),
                "gen_tokens_per_s": round(gen_tokens / min(gen_s), 1), "threads": llm.n_threads}
    finally:
        llm.close()


# ---------------------------------------------------------------- the teacher reference
def build_reference(ctx: StageContext, teacher_dir: Path, windows: list[list[int]], folder: Path) -> dict[str, Any]:
    """The teacher's log-probabilities on ``windows`` in ``folder/teacher_logprobs.npy`` (memory-mapped).

    Returns the JSON-able description the ``evaluate`` hook finds in ``ctx.inputs[REFERENCE_KEY]``.
    """
    import numpy as np

    teacher = HFModel(teacher_dir, ctx)
    try:
        n_scored = sum(len(w) - 1 for w in windows)
        lp_path = folder / "teacher_logprobs.npy"
        store = np.lib.format.open_memmap(lp_path, mode="w+", dtype=np.float32, shape=(n_scored, teacher.n_vocab))
        start, nll = 0, 0.0
        for w in windows:
            lp = teacher.log_probs(w)
            store[start:start + len(lp)] = lp
            nll -= float(lp[np.arange(len(lp)), w[1:]].sum(dtype=np.float64))
            start += len(lp)
        store.flush()
        del store
    finally:
        teacher.close()
    windows_path = folder / "windows.json"
    windows_path.write_text(json.dumps(windows))
    return {"teacher_dir": str(teacher_dir), "windows": str(windows_path), "teacher_logprobs": str(lp_path),
            "tokens": n_scored, "teacher_perplexity": math.exp(nll / n_scored)}


def heldout_quality(backend, windows: list[list[int]], teacher_lp) -> dict[str, Any]:
    """Perplexity, KL(teacher || model) and top-1 agreement over the held-out windows."""
    from ollama_compress.hooks.quantize import quality_against

    if backend.n_vocab != teacher_lp.shape[1]:
        raise UserError(f"the model's vocabulary of {backend.n_vocab} tokens differs from the teacher's "
                        f"{teacher_lp.shape[1]}; evaluate models that share the teacher's tokenizer")
    quality = quality_against(backend, windows, teacher_lp)
    return {key: quality[key] for key in ("perplexity", "kl", "top1_agreement")}


# ---------------------------------------------------------------- knowledge and answers
def knowledge_questions() -> list[dict[str, Any]]:
    """The shipped multiple-choice set: ``{"question", "choices", "answer" (index)}`` per line."""
    text = resources.files("ollama_compress.data").joinpath(KNOWLEDGE_FILE).read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def knowledge_sequences(tokenizer) -> list[tuple[list[int], list[list[int]], int]]:
    """(context tokens, token ids of each choice, index of the right one) per question."""
    prefix = bos_prefix(tokenizer)
    out = []
    for q in knowledge_questions():
        context = prefix + tokenizer(f"Question: {q['question']}\nAnswer:", add_special_tokens=False)["input_ids"]
        choices = [tokenizer(" " + c, add_special_tokens=False)["input_ids"] for c in q["choices"]]
        out.append((context, choices, q["answer"]))
    return out


def knowledge_accuracy(backend, sequences) -> float:
    """Share of questions whose right choice has the highest log-likelihood after the question."""
    right = 0
    for context, choices, answer in sequences:
        scores = [sum(float(lp[len(context) - 1 + i, t]) for i, t in enumerate(choice))
                  for lp, choice in zip(backend.log_probs_many([context + c for c in choices]), choices)]
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

    from ollama_compress import modelio
    from ollama_compress.recipe import Evaluate

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
        backend = HFModel(model_path, ctx)
    row: dict[str, Any] = {"size_bytes": model_size(model_path)}
    try:
        teacher_lp = np.load(reference["teacher_logprobs"], mmap_mode="r")
        if not is_gguf and model_path.resolve() == teacher_dir.resolve():
            row.update(perplexity=reference["teacher_perplexity"], kl=0.0, top1_agreement=1.0)
        else:
            row.update(heldout_quality(backend, windows, teacher_lp))
        if sequences:
            row["knowledge_accuracy"] = knowledge_accuracy(backend, sequences)
        stop = stop_tokens(tokenizer, teacher_dir)
        row["answers"] = [tokenizer.decode(backend.greedy(p, settings.max_new_tokens, stop),
                                           skip_special_tokens=True).strip() for p in prompts]
    finally:
        backend.close()
    if is_gguf and settings.speed:
        row.update(llama_speed(model_path, windows[0], reference.get("threads")))
    return row


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
    from ollama_compress.plugins import get_plugin_manager

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
        f"{k} {row[k]:.4g}" for k in ("perplexity", "kl", "top1_agreement") if isinstance(row.get(k), float)))
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
    from ollama_compress import modelio
    from ollama_compress.recipe import Evaluate
    from ollama_compress.report import rich_table, write_report

    settings = ctx.settings or Evaluate()
    teacher_dir = Path(ctx.inputs["teacher_dir"])
    tokenizer = modelio.load_tokenizer(teacher_dir, ctx.options)
    windows = unseen_heldout_windows(ctx.recipe.data, tokenizer, ctx, teacher_dir, heal=ctx.recipe.heal is not None)
    if models is None:
        candidates = stage_candidates(ctx.inputs)
    else:
        candidates = [Candidate("teacher", teacher_dir, "teacher"),
                      *(Candidate(name, Path(p), name, _quant_of(Path(p))) for name, p in models.items())]
    if settings.teacher_quants:
        outtype = ctx.recipe.export.outtype if ctx.recipe.export else "F16"
        candidates += teacher_quant_candidates(ctx, teacher_dir, settings.teacher_quants, outtype,
                                               {c.name for c in candidates})
    with tempfile.TemporaryDirectory(prefix="evaluate-") as tmp:
        ctx.log(f"teacher log-probabilities on {len(windows)} held-out windows")
        reference = build_reference(ctx, teacher_dir, windows, Path(tmp)) | {"threads": threads}
        rows = [measure_row(ctx, c, reference) for c in candidates]
    add_quality_retained(rows)
    evaluation = {"quality_retained": QUALITY_RETAINED, "heldout_tokens": reference["tokens"],
                  "heldout_windows": len(windows), "prompts": list(settings.prompts or DEFAULT_PROMPTS),
                  "knowledge_questions": len(knowledge_questions()) if settings.knowledge else 0, "rows": rows}
    evaluation_path = write_json(Path(ctx.out_dir) / "evaluation.json", evaluation)
    ctx.metrics["evaluation"] = evaluation
    report_path, figures = write_report(Path(ctx.out_dir), ctx.recipe.name, evaluation, ctx.inputs)
    ctx.metrics["figures"] = figures
    if ctx.console is not None:
        ctx.console.print(rich_table(rows))
    return {"evaluation": str(evaluation_path), "report": str(report_path)}


def _quant_of(path: Path) -> str | None:
    if path.suffix != ".gguf":
        return None
    from ollama_compress.gguf_verify import verify_gguf

    return verify_gguf(path).file_type
