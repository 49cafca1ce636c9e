"""Quantize GGUF files with llama.cpp's own quantizer and measure what each quant costs in quality.

* ``quantize_file``: F32/F16/BF16 GGUF -> Q8_0, Q4_K_M, ... through llama-cpp-python's
  ``llama_model_quantize`` (the code behind ``llama-quantize``), or, with an importance matrix,
  through the ``llama-quantize`` built from the same llama.cpp (``ollama_compress.llama_tools``);
  input and output verified.
* ``measure_quants``: size, bits per weight, perplexity on held-out text, KL / top-1 agreement
  against a reference GGUF (llama.cpp logits), prompt and generation speed, the imatrix used.
* The ``quantize_gguf`` stage hook (computes the importance matrix once per stage when the recipe
  says ``export.imatrix: auto``) and the ``verify`` / ``quantize`` commands.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Iterator

import click
from rich.table import Table

from ollama_compress.context import StageContext
from ollama_compress.modelio import load_tokenizer
from ollama_compress.options import RunOptions
from ollama_compress.errors import StageFailed, UserError
from ollama_compress.fsutil import atomic_path, check_free_space, claimed_output_dir, write_json
from ollama_compress.gguf_verify import GGUFSummary, verify_gguf
from ollama_compress.hookspecs import hookimpl
from ollama_compress.hooks.data import bos_prefix, calibration_batches, load_texts, text_windows, token_stream
from ollama_compress.imatrix import check_imatrix, compute_imatrix
from ollama_compress.llama_tools import llama_tool
from ollama_compress.planner import gguf_size, shape_of_gguf
from ollama_compress.plugins import call_first
from ollama_compress.quant_names import IMATRIX_HELPS, NEEDS_IMATRIX, UNQUANTIZED, quant_name_problem
from ollama_compress.recipe import Export, Recipe, Source, TextSource
from ollama_compress.reference import QualityMeter, TeacherReference, heldout_reference, log_softmax

IMATRIX_FILE = "imatrix.gguf"  # the matrix the stage computes, in the stage's directory
SPEED_PROMPT_TOKENS = 128
SPEED_DECODE_TOKENS = 32
SPEED_ROUNDS = 3  # the files take turns this many times; each figure is the median

_OUTTYPE_SUFFIX = re.compile(r"-(F32|F16|BF16)\Z", re.IGNORECASE)


# ---------------------------------------------------------------- quantization
def quantize_file(src: Path, quant: str, dst: Path, imatrix: Path | None = None, nthreads: int = 0,
                  *, allow_requantize: bool = False) -> Path:
    """Quantize the GGUF ``src`` to ``quant`` (llama.cpp spelling) and write ``dst`` atomically.

    ``src`` must be an F32/F16/BF16 GGUF unless ``allow_requantize``. Quants in
    ``NEEDS_IMATRIX`` need ``imatrix`` (GGUF or legacy .dat, from ``compute_imatrix`` or
    ``llama-imatrix``), which must match ``src`` (names, widths); llama-cpp-python cannot pass one,
    so such runs use the built ``llama-quantize`` (``llama_tools``). ``nthreads`` 0 uses every core.
    Returns ``dst``; raises UserError for bad input and StageFailed when llama.cpp fails.
    """
    src, dst = Path(src), Path(dst)
    quant = _check_quant(quant, imatrix)
    summary = verify_gguf(src)
    _check_source(summary, allow_requantize)
    if dst.resolve() == src.resolve():
        raise UserError(f"{dst}: the output would overwrite the input; choose another output path")
    if imatrix is not None:
        check_imatrix(Path(imatrix), summary)
    _check_disk_space(summary, quant, dst)
    with atomic_path(dst) as tmp:
        if imatrix is not None:
            _quantize_with_tool(src, quant, tmp, Path(imatrix), nthreads, allow_requantize)
        else:
            _quantize_with_library(src, quant, tmp, nthreads, allow_requantize)
        verify_gguf(tmp)  # never rename a file llama.cpp could not load
    return dst


def quant_file_name(gguf_path: Path, quant: str) -> str:
    """``smol-F16.gguf`` + ``Q4_K_M`` -> ``smol-Q4_K_M.gguf`` (the export's naming)."""
    stem = _OUTTYPE_SUFFIX.sub("", Path(gguf_path).stem)
    return f"{stem}-{quant}.gguf"


def _check_quant(quant: str, imatrix: Path | None) -> str:
    if problem := quant_name_problem(quant):
        raise UserError(problem)
    if quant in NEEDS_IMATRIX and imatrix is None:
        raise UserError(
            f"{quant} needs an importance matrix: set export.imatrix to auto (or a file) in the recipe, "
            f"pass --imatrix FILE, or pick a quant that does not need one (Q2_K, Q3_K_M, IQ4_XS, ...)"
        )
    if imatrix is not None and not Path(imatrix).is_file():
        raise UserError(f"{imatrix}: importance matrix file not found")
    return quant


def _check_source(summary: GGUFSummary, allow_requantize: bool) -> None:
    quantized = sorted({t.type for t in summary.tensors if t.type not in UNQUANTIZED})
    if quantized and not allow_requantize:
        raise UserError(
            f"{summary.path}: already quantized ({', '.join(quantized)} tensors); quantize from the "
            f"F32/F16/BF16 export instead (requantizing compounds the error)"
        )
    if summary.architecture is None:
        raise UserError(f"{summary.path}: no general.architecture key; not a model llama.cpp can quantize")


def _estimated_size(summary: GGUFSummary, quant: str) -> int:
    return gguf_size(shape_of_gguf(summary.path), quant)


def _check_disk_space(summary: GGUFSummary, quant: str, dst: Path) -> None:
    if dst.parent.exists() and not dst.parent.is_dir():
        raise UserError(f"{dst.parent} is a file; choose an output directory")
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {dst.parent}: {exc.strerror or exc}") from None
    check_free_space(dst.parent, _estimated_size(summary, quant), quant)


def _ftype(llama_cpp: Any, quant: str) -> int:
    name = "LLAMA_FTYPE_ALL_F32" if quant == "F32" else f"LLAMA_FTYPE_MOSTLY_{quant}"
    value = getattr(llama_cpp, name, None)
    if value is None:
        raise UserError(f"{quant} is not supported by the installed llama-cpp-python; upgrade it or pick another quant")
    return int(value)


def _import_llama_cpp() -> Any:
    try:
        import llama_cpp
    except ImportError as exc:
        raise StageFailed(f"llama-cpp-python is needed for quantization and quality checks ({exc}); "
                          f"pip install llama-cpp-python") from None
    return llama_cpp


@contextlib.contextmanager
def llama_log_capture() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines (instead of printing them) while the block runs."""
    llama_cpp = _import_llama_cpp()
    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):  # noqa: ARG001
        if text:
            lines.append(text.decode("utf-8", errors="replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        default = getattr(getattr(llama_cpp, "_logger", None), "llama_log_callback", None)
        llama_cpp.llama_log_set(default, ctypes.c_void_p(0))


def _failure_reason(log: list[str]) -> str:
    text = "".join(log)
    for pattern in (r"failed to quantize: ([^\n]+)", r"error[^:\n]*: ([^\n]+)", r"ERROR: ([^\n]+)"):
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found:
            return found[-1].strip()
    tail = [line.strip() for line in text.splitlines() if line.strip()]
    return tail[-1] if tail else "no message from llama.cpp"


def _quantize_with_library(src: Path, quant: str, dst: Path, nthreads: int, allow_requantize: bool) -> None:
    llama_cpp = _import_llama_cpp()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _ftype(llama_cpp, quant)
    params.nthread = nthreads
    params.allow_requantize = allow_requantize
    with llama_log_capture() as log:
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(params))
    if rc != 0:
        reason = _failure_reason(log)
        error = UserError if re.search(r"unknown model architecture|requires an imatrix|importance matrix", reason) else StageFailed
        raise error(f"llama.cpp could not quantize {src} to {quant}: {reason}")


def _quantize_with_tool(src: Path, quant: str, dst: Path, imatrix: Path, nthreads: int, allow_requantize: bool) -> None:
    tool = llama_tool("llama-quantize")
    # run beside the matrix and name it bare: the file records it (quantize.imatrix.file) and a
    # path would carry a stage's temporary directory name
    cmd = [str(tool), "--imatrix", imatrix.name]
    if allow_requantize:
        cmd.append("--allow-requantize")
    cmd += [str(src.resolve()), str(dst.resolve()), quant]
    if nthreads > 0:
        cmd.append(str(nthreads))
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=imatrix.resolve().parent)
    if proc.returncode != 0:
        raise StageFailed(f"llama-quantize could not quantize {src} to {quant}: "
                          f"{_failure_reason([proc.stdout, proc.stderr])}")


# ---------------------------------------------------------------- quality
def shipped_heldout_text() -> list[str]:
    return load_texts(TextSource(split="heldout"))


def llama_threads(threads: int | None) -> dict[str, int]:
    """The same thread count for single tokens and for batches: llama-cpp-python's default batch
    threads (every core) stall on a shared machine, slowing multi-token evals a hundredfold."""
    n = threads or max(1, (os.cpu_count() or 2) // 2)
    return {"n_threads": n, "n_threads_batch": n}


class LlamaScorer:
    """One GGUF loaded in llama.cpp, giving log-probabilities for token windows; ``threads``
    defaults to every core unless the machine is oversubscribed (``default_threads``): unlike
    the speed meter's, these figures do not depend on the thread count."""

    def __init__(self, path: Path, n_ctx: int, threads: int | None = None):
        from ollama_compress.teacher_chat import default_threads

        llama_cpp = _import_llama_cpp()
        with llama_log_capture() as log:
            try:
                self.llm = llama_cpp.Llama(str(path), logits_all=True, n_ctx=n_ctx, n_batch=n_ctx,
                                           **llama_threads(threads or default_threads()), verbose=False)
            except (ValueError, RuntimeError) as exc:
                raise StageFailed(f"llama.cpp could not load {path}: {_failure_reason(log) or exc}") from None

    @property
    def n_vocab(self) -> int:
        return self.llm.n_vocab()

    @property
    def tokenizer(self) -> "LlamaTokenizer":
        return LlamaTokenizer(self.llm)

    def log_probs(self, window: list[int]) -> Any:
        """Log-softmax of the logits at each position but the last: row i predicts window[i+1]."""
        import numpy as np

        self.llm.reset()
        self.llm.eval(window)
        logits = np.array(self.llm.scores[: len(window) - 1], dtype=np.float32)
        return log_softmax(logits)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.close()


class LlamaTokenizer:
    """llama.cpp's tokenizer of a loaded GGUF, called like an HF tokenizer, so the quant table cuts
    its windows with the same builder as heal and evaluate (``hooks.data.text_windows``)."""

    def __init__(self, llm: Any):
        self.llm = llm
        eos = llm.token_eos()
        self.eos_token_id = eos if eos >= 0 else None

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=False)}


def _file_row(name: str, path: Path, summary: GGUFSummary) -> dict[str, Any]:
    """Facts from the file itself; ``file`` is relative to the file's own directory (a report
    written into a stage's temporary directory must not name it)."""
    return {
        "name": name, "file": Path(path).name, "fingerprint": file_fingerprint(path), "file_type": summary.file_type,
        "size_bytes": summary.size, "size_mib": round(summary.size / 2**20, 2),
        "bits_per_weight": round(summary.bits_per_weight, 4), "imatrix": imatrix_used(summary),
    }


def imatrix_used(summary: GGUFSummary) -> dict[str, Any] | None:
    """The importance matrix llama-quantize recorded in a quantized GGUF (file, dataset, entries)."""
    meta = summary.metadata
    if "quantize.imatrix.file" not in meta:
        return None
    return {"file": Path(str(meta["quantize.imatrix.file"])).name, "dataset": meta.get("quantize.imatrix.dataset"),
            "entries": meta.get("quantize.imatrix.entries_count"), "chunks": meta.get("quantize.imatrix.chunks_count")}


def file_fingerprint(path: Path) -> str:
    """Size and a hash of the first and last MiB of a file: which GGUF a stored figure belongs to,
    cheap enough for multi-GB files (an edited or requantized file changes it)."""
    path = Path(path)
    size = path.stat().st_size
    digest = hashlib.blake2b(digest_size=12)
    with open(path, "rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return f"{size}-{digest.hexdigest()}"


def measure_speeds(paths: list[Path], tokens: list[int], *, threads: int | None = None, rounds: int = SPEED_ROUNDS,
                   prompt_tokens: int = SPEED_PROMPT_TOKENS, decode_tokens: int = SPEED_DECODE_TOKENS
                   ) -> list[dict[str, Any]]:
    """The one speed meter: prompt and decode tokens/s of each GGUF in ``paths`` in llama.cpp.

    ``prompt_tokens`` of ``tokens`` are evaluated as one batch, then ``decode_tokens`` more are fed
    one at a time (a generation step without sampling). The files take turns, round after round
    (each loaded, warmed up, timed, closed), so all of them meet the same conditions; each figure
    is the median of its ``rounds``. The load average before and after is recorded, and the
    per-round decode seconds (``decode_seconds``) let ``speed_ratio`` compare two files of one
    call round by round, a ratio that stays stable on a busy machine. Also per CPU second of this
    process (``*_per_cpu_s``). Same threads for every file (``llama_threads``).
    """
    llama_cpp = _import_llama_cpp()
    if not tokens:
        raise UserError("measuring speed needs some held-out text; give more text")
    tokens = tokens * (-(-(prompt_tokens + decode_tokens) // len(tokens)))  # token ids set the work, not the speed
    prompt, decode = tokens[:prompt_tokens], tokens[prompt_tokens : prompt_tokens + decode_tokens]
    load_before = os.getloadavg()[0]
    runs: list[list[tuple[float, float, float, float]]] = [[] for _ in paths]
    used_threads = llama_threads(threads)
    for _ in range(rounds):
        for i, path in enumerate(paths):
            with llama_log_capture() as log:
                try:
                    llm = llama_cpp.Llama(str(path), n_ctx=prompt_tokens + decode_tokens + 8, n_batch=prompt_tokens,
                                          **used_threads, verbose=False)
                except (ValueError, RuntimeError) as exc:
                    raise StageFailed(f"llama.cpp could not load {path}: {_failure_reason(log) or exc}") from None
            try:
                _timed_run(llm, prompt[:16], decode[:4])  # warm-up: pages the weights in
                runs[i].append(_timed_run(llm, prompt, decode))
            finally:
                with contextlib.suppress(Exception):
                    llm.close()
    load = [round(load_before, 2), round(os.getloadavg()[0], 2)]

    def rate(path_runs, n: int, column: int) -> float:
        return round(n / statistics.median(r[column] for r in path_runs), 1)

    return [{"prompt_tokens_per_s": rate(r, len(prompt), 0), "gen_tokens_per_s": rate(r, len(decode), 1),
             "prompt_tokens_per_cpu_s": rate(r, len(prompt), 2), "gen_tokens_per_cpu_s": rate(r, len(decode), 3),
             "speed_threads": used_threads["n_threads"], "speed_rounds": rounds, "load_average": load,
             "decode_seconds": [round(x[1], 5) for x in r]} for r in runs]


def speed_ratio(faster: dict[str, Any], slower: dict[str, Any]) -> float:
    """How many times ``faster`` decodes as fast as ``slower``: the median over rounds of the
    ratio of their decode times in the same round, both from one ``measure_speeds`` call."""
    pairs = list(zip(faster["decode_seconds"], slower["decode_seconds"]))
    return statistics.median(b / a for a, b in pairs)


def measure_speed(path: Path, tokens: list[int], prompt_tokens: int = SPEED_PROMPT_TOKENS,
                  decode_tokens: int = SPEED_DECODE_TOKENS, rounds: int = SPEED_ROUNDS) -> dict[str, Any]:
    """``measure_speeds`` of one file."""
    return measure_speeds([path], tokens, prompt_tokens=prompt_tokens, decode_tokens=decode_tokens, rounds=rounds)[0]


def _timed_run(llm: Any, prompt: list[int], decode: list[int]) -> tuple[float, float, float, float]:
    """(prompt wall s, decode wall s, prompt CPU s, decode CPU s)."""
    llm.reset()
    t0, c0 = time.perf_counter(), time.process_time()
    llm.eval(prompt)
    t1, c1 = time.perf_counter(), time.process_time()
    for token in decode:
        llm.eval([token])
    return t1 - t0, time.perf_counter() - t1, c1 - c0, time.process_time() - c1


def measure_quants(reference_gguf: Path, quant_ggufs: dict[str, Path], texts: list[str] | None = None,
                   n_ctx: int = 512, max_tokens: int = 4096, speed: bool = True) -> list[dict]:
    """Size, bits per weight, perplexity, KL(reference || quant) / top-1 agreement, the imatrix
    used, and (``speed``) prompt / generation tokens/s (``measure_speeds``, every file in turn)
    per quant. Each row carries the file's ``fingerprint``, so evaluate reuses these figures for
    the same file instead of measuring it again.

    Text is tokenized once with the reference, cut into windows of ``n_ctx`` tokens (BOS first
    when the model adds one) and every token after the first of a window is scored. The
    reference's log-probabilities are kept in a temporary file, so memory stays at one window.
    Returns one row per model, reference first (its KL is 0 and agreement 1 by definition).
    """
    import numpy as np

    if n_ctx < 8:
        raise UserError(f"n_ctx {n_ctx} is too small to measure perplexity; use 8 or more")
    texts = texts if texts is not None else shipped_heldout_text()
    if not any(t.strip() for t in texts):
        raise UserError("no held-out text to measure perplexity on")
    reference_gguf = Path(reference_gguf)
    summaries = {"reference": verify_gguf(reference_gguf)}
    for name, path in quant_ggufs.items():
        summaries[name] = verify_gguf(path)
    ref_name = summaries["reference"].file_type or "reference"

    with tempfile.TemporaryDirectory(prefix="quants-") as tmp:
        ref = LlamaScorer(reference_gguf, n_ctx)
        try:
            prefix = bos_prefix(ref.tokenizer)
            step = max(1, min(n_ctx - len(prefix), len(token_stream(texts, ref.tokenizer))))  # a short text: one window
            windows = text_windows(texts, ref.tokenizer, max(1, max_tokens // step), step, seed=0)
            tokens = [t for w in windows for t in w[len(prefix):]]
            n_scored = sum(len(w) - 1 for w in windows)
            n_vocab = ref.n_vocab
            ref_lp = np.lib.format.open_memmap(Path(tmp) / "ref.npy", mode="w+", dtype=np.float32, shape=(n_scored, n_vocab))
            meter, t0 = QualityMeter(), time.perf_counter()
            for w in windows:
                lp = ref.log_probs(w)
                ref_lp[meter.tokens : meter.tokens + len(lp)] = lp
                meter.add_nll(lp, w[1:])
            ref_seconds = time.perf_counter() - t0
        finally:
            ref.close()
        rows = [_file_row(ref_name, reference_gguf, summaries["reference"]) | {
            "reference": True, "perplexity": meter.result()["perplexity"], "mean_kl": 0.0, "top1_agreement": 1.0,
            "tokens": n_scored, "n_ctx": n_ctx, "eval_seconds": round(ref_seconds, 2)}]
        for name, path in quant_ggufs.items():
            rows.append(_file_row(name, Path(path), summaries[name]) | {"reference": False}
                        | _compare(Path(path), windows, ref_lp, n_vocab, n_ctx))
    if speed:
        for row, figures in zip(rows, measure_speeds([reference_gguf, *map(Path, quant_ggufs.values())],
                                                     prefix + tokens)):
            row.update(figures)
    return rows


def quality_against(model: Any, windows: list[list[int]], ref_lp: Any) -> dict[str, Any]:
    """Perplexity, KL(reference || model) per token and top-1 agreement with the reference over
    ``windows``: ``model.log_probs(window)`` gives the model's rows, ``ref_lp`` the reference's, in order."""
    meter = QualityMeter()
    for w in windows:
        lp = model.log_probs(w)
        meter.add(lp, ref_lp[meter.tokens : meter.tokens + len(lp)], w[1:])
    return meter.result()


def _compare(path: Path, windows: list[list[int]], ref_lp: Any, n_vocab: int, n_ctx: int) -> dict[str, Any]:
    scorer = LlamaScorer(path, n_ctx)
    try:
        if scorer.n_vocab != n_vocab:
            raise UserError(f"{path}: vocabulary of {scorer.n_vocab} tokens differs from the reference's {n_vocab}")
        started = time.perf_counter()
        quality = quality_against(scorer, windows, ref_lp)
        seconds = time.perf_counter() - started
    finally:
        scorer.close()
    return {"perplexity": quality["perplexity"], "mean_kl": quality["kl"], "top1_agreement": quality["top1_agreement"],
            "tokens": quality["tokens"], "n_ctx": n_ctx, "eval_seconds": round(seconds, 2)}


def measure_against_teacher(reference: TeacherReference, files: dict[str, Path], speed: bool = True) -> list[dict]:
    """``measure_quants``' row for each of ``files`` (name -> GGUF), with perplexity, KL(teacher || file)
    and top-1 agreement against the run's cached teacher reference: the figures evaluate shows for
    the same files. Each row names the reference (``teacher_reference``), so evaluate reuses them
    only while it measures against the same one."""
    summaries = {name: verify_gguf(path) for name, path in files.items()}
    ref_lp = reference.logprobs()
    n_ctx = max(map(len, reference.windows))
    rows = [_file_row(name, Path(path), summaries[name]) | {"reference": False, "teacher_reference": reference.key}
            | _compare(Path(path), reference.windows, ref_lp, ref_lp.shape[1], n_ctx) for name, path in files.items()]
    if speed:
        tokens = [t for w in reference.windows for t in w]
        for row, figures in zip(rows, measure_speeds([Path(p) for p in files.values()], tokens)):
            row.update(figures)
    return rows


def measure_heldout_quants(ctx, unquantized: Path | None, quants: dict[str, Path], out_dir: Path,
                           speed: bool = True) -> list[dict]:
    """``measure_against_teacher`` of ``unquantized`` (None: not measured) and ``quants`` on the run's
    teacher reference (``data.heldout``, the teacher ``ctx.inputs["teacher_dir"]``), written to
    ``out_dir/quants.json``: the export stage's quant table and evaluate's teacher quants, measured
    the same way."""
    files = {} if unquantized is None else {verify_gguf(unquantized).file_type or Path(unquantized).stem: Path(unquantized)}
    files.update(quants)
    rows = measure_against_teacher(heldout_reference(ctx), files, speed=speed)
    write_quants_report(rows, out_dir)
    return rows


def stored_quant_row(path: Path) -> dict[str, Any] | None:
    """The row of ``quants.json`` beside ``path`` measured on this very file (same fingerprint), or None."""
    path = Path(path)
    try:
        rows = json.loads((path.parent / "quants.json").read_text())["quants"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    fingerprint = None
    for row in rows if isinstance(rows, list) else []:
        if isinstance(row, dict) and row.get("file") == path.name:
            fingerprint = fingerprint or file_fingerprint(path)
            if row.get("fingerprint") == fingerprint:
                return row
    return None


def write_quants_report(rows: list[dict], out_dir: Path) -> Path:
    """Write ``quants.json`` (atomically) into ``out_dir``; return its path."""
    return write_json(Path(out_dir) / "quants.json", {"quants": rows})


def format_quants_table(rows: list[dict]):
    """A rich Table of the rows of ``measure_quants``."""
    table = Table(title="Quants: size, quality against the reference (llama.cpp logits) and speed")
    for header in ("quant", "MiB", "bits/weight", "perplexity", "KL vs ref", "top-1 agree", "imatrix",
                   "prompt tok/s", "gen tok/s"):
        table.add_column(header, justify="left" if header in ("quant", "imatrix") else "right")
    for row in rows:
        name = row["name"] + (" (ref)" if row.get("reference") else "")
        imatrix = (row.get("imatrix") or {}).get("file") or "-"
        table.add_row(name, f"{row['size_mib']:.1f}", f"{row['bits_per_weight']:.2f}", f"{row['perplexity']:.3f}",
                      f"{row['mean_kl']:.5f}", f"{100 * row['top1_agreement']:.1f}%", imatrix,
                      _rate(row.get("prompt_tokens_per_s")), _rate(row.get("gen_tokens_per_s")))
    return table


def _rate(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


# ---------------------------------------------------------------- stage hook and commands
@hookimpl(trylast=True)
def quantize_gguf(ctx, gguf_path: Path, quant: str) -> Path:
    """Quantize the stage's unquantized GGUF to ``quant`` into ``ctx.out_dir``: the export stage,
    the ``export`` and ``quantize`` commands and evaluate's teacher quants all come here
    (``quant_context`` builds the commands' context).

    ``export.imatrix``: ``auto`` computes the importance matrix of ``ctx.inputs["model_dir"]``
    over the calibration text once per stage (``imatrix.gguf`` in ``ctx.out_dir``) when ``quant``
    benefits from one; a path uses that file; null uses none. ``ctx.inputs["threads"]``: llama.cpp
    threads (0 or absent: every core).
    """
    dst = Path(ctx.out_dir) / quant_file_name(gguf_path, quant)
    started = time.perf_counter()
    imatrix = stage_imatrix(ctx, Path(gguf_path), quant)
    quantize_file(Path(gguf_path), quant, dst, imatrix=imatrix, nthreads=int(ctx.inputs.get("threads") or 0))
    summary = verify_gguf(dst)
    ctx.metrics.setdefault("quantize", {})[quant] = {
        "file": dst.name, "size_bytes": summary.size, "bits_per_weight": round(summary.bits_per_weight, 4),
        "imatrix": imatrix.name if imatrix else None, "seconds": round(time.perf_counter() - started, 2),
    }
    ctx.log(f"{quant}: {dst.name} ({summary.size / 2**20:.1f} MiB, {summary.bits_per_weight:.2f} bits/weight"
            f"{', imatrix ' + imatrix.name if imatrix else ''})")
    return dst


def quant_context(out_dir: Path, imatrix: str | Path | None, *, model_dir: Path | None = None,
                  threads: int = 0, options=None, console=None, recipe=None) -> StageContext:
    """The context the commands (and evaluate's teacher quants) give the ``quantize_gguf`` hook:
    quants go into ``out_dir``, with ``imatrix`` (a file, ``auto`` with ``model_dir``, or None)
    as the recipe's ``export.imatrix``; ``recipe`` supplies the calibration text for ``auto``."""
    export = Export(quants=[], imatrix=None if imatrix is None else str(imatrix))
    if recipe is None:
        recipe = Recipe(recipe_version=1, name="quantize", source=Source(model=str(model_dir or out_dir)))
    recipe = recipe.model_copy(update={"export": export})
    inputs: dict[str, Any] = {"threads": threads}
    if model_dir is not None:
        inputs["model_dir"] = str(model_dir)
    return StageContext(stage="export", recipe=recipe, run_dir=Path(out_dir), out_dir=Path(out_dir),
                        options=options or RunOptions(), console=console, section="export", inputs=inputs)


def quantize_through_hook(ctx: StageContext, gguf_path: Path, quant: str) -> Path:
    """``quantize_gguf`` of the first plugin that handles it (a built-in is the last one)."""
    return Path(call_first("quantize_gguf", ctx=ctx, gguf_path=Path(gguf_path), quant=quant))


def stage_imatrix(ctx, gguf_path: Path, quant: str) -> Path | None:
    """The importance matrix ``quant`` gets in the export stage, per ``export.imatrix`` (see
    ``quantize_gguf``); computed at most once per stage."""
    setting = getattr(ctx.settings, "imatrix", None)
    if setting is None or (setting == "auto" and quant not in IMATRIX_HELPS):
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    if quant not in NEEDS_IMATRIX and not _has_llama_quantize():
        ctx.log(f"{quant}: no importance matrix (llama-quantize is not built; run 'bash .ci/setup')")
        return None
    out = Path(ctx.out_dir) / IMATRIX_FILE
    if not out.is_file():
        ctx.log(f"computing the importance matrix over the calibration text for {quant} ...")
        started = time.perf_counter()
        compute_stage_imatrix(ctx, gguf_path, out)
        ctx.metrics["imatrix"] = {"file": out.name, "seconds": round(time.perf_counter() - started, 2)}
    return out


def _has_llama_quantize() -> bool:
    try:
        llama_tool("llama-quantize")
    except UserError:
        return False
    return True


def compute_stage_imatrix(ctx, gguf_path: Path, out: Path) -> Path:
    """``compute_imatrix`` of the stage's HF model (after heal) over ``data.calibration``."""
    model_dir = Path(ctx.inputs["model_dir"])
    spec = ctx.recipe.data.calibration
    tokenizer = load_tokenizer(model_dir, ctx.options)
    batches = calibration_batches(spec, tokenizer, ctx=ctx, model=model_dir, batch_size=4)
    source = spec.from_ + (f" {spec.path}" if spec.path else "")
    dataset = f"calibration: {source} ({spec.samples}x{spec.seq_len} tokens, seed {spec.seed})"
    return compute_imatrix(model_dir, gguf_path, batches, out, dataset, device=ctx.device, options=ctx.options)


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.command("verify")
    @click.argument("files", nargs=-1, required=True, type=click.Path(path_type=Path))
    @click.option("--json", "as_json", is_flag=True, help="Print the summaries as JSON.")
    def verify_command(files: tuple[Path, ...], as_json: bool) -> None:
        """Check GGUF files the way llama.cpp loads them (stops at the first bad file, exit 2)."""
        summaries = []
        for path in files:
            summary = verify_gguf(path)
            summaries.append(summary.to_dict())
            if not as_json:
                click.echo(summary.one_line())
        if as_json:
            click.echo(json.dumps(summaries, indent=2))

    @cli.command("quantize")
    @click.argument("gguf", type=click.Path(path_type=Path))
    @click.option("--quant", "-q", "quants", multiple=True, required=True, help="llama.cpp quant name; repeatable.")
    @click.option("--out", "out_dir", type=click.Path(path_type=Path), help="Output directory (default: beside GGUF).")
    @click.option("--imatrix", type=click.Path(path_type=Path),
                  help="Importance matrix (GGUF or .dat) for the K and IQ quants; uses the built llama-quantize.")
    @click.option("--threads", default=0, show_default=True, help="Threads (0: all cores).")
    def quantize_command(gguf: Path, quants: tuple[str, ...], out_dir: Path | None, imatrix: Path | None, threads: int) -> None:
        """Quantize an F32/F16/BF16 GGUF with llama.cpp (GGUF-F16.gguf -> GGUF-Q4_K_M.gguf ...)."""
        for quant in quants:  # check every name before the first slow quantization
            _check_quant(quant, imatrix)
        verify_gguf(gguf)  # bad input is refused before anything is written
        with claimed_output_dir(out_dir, "--out", inputs=(gguf,)) if out_dir else contextlib.nullcontext(gguf.parent) \
                as target:
            ctx = quant_context(target, imatrix, threads=threads)
            for quant in quants:
                click.echo(verify_gguf(quantize_through_hook(ctx, gguf, quant)).one_line())
