"""Heal: distil the pruned student from its unpruned teacher (the ``heal`` stage and command).

``heal_model`` is the one path: the stage hook and ``ollama-compress heal`` both call it. It checks
everything that can be wrong before loading a weight (loss names, tokenizers, the layer map,
memory, data, held-out overlap), measures KL to the teacher on held-out text, trains
(``ollama_compress.trainer``), measures again and writes the healed HF directory atomically, with
``layer_map.json``, ``train_log.jsonl`` and ``heal.json`` (the figures) inside it.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import click

from ollama_compress import modelio
from ollama_compress.cli import (add_command, echo_json, json_option, make_options, option_values, run_options,
                                 section_from_options, section_options)
from ollama_compress.context import StageContext
from ollama_compress.options import RunOptions
from ollama_compress.errors import StageFailed, UserError
from ollama_compress.fsutil import (atomic_path, check_output_dir, claim_output_dir, clean_journal, remove_made,
                                   remove_made_children, settings_hash, write_json)
from ollama_compress.hookspecs import hookimpl
from ollama_compress.recipe import Data, Heal
from ollama_compress.reference import store_figures, teacher_reference

LAYER_MAP = "layer_map.json"
Log = Callable[[str], None]


# ---------------------------------------------------------------- checks
def read_layer_map(student_dir: Path, num_layers: int, teacher_layers: int) -> list[int] | None:
    """The student's layer -> original teacher layer map, or None when it has no layer_map.json."""
    path = Path(student_dir) / LAYER_MAP
    if not path.is_file():
        return None
    from ollama_compress.safe_read import read_json

    mapping = read_json(path, "layer map", expect=dict).get("student_to_teacher")
    if not isinstance(mapping, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in mapping):
        raise UserError(f"{path} is not a layer map written by prune (no student_to_teacher list of layer numbers); "
                        "prune the model again")
    if len(mapping) != num_layers or any(not 0 <= t < teacher_layers for t in mapping):
        raise UserError(f"{path} maps {len(mapping)} layers into a {teacher_layers}-layer teacher, but the student "
                        f"has {num_layers} layers; is this teacher the model it was pruned from?")
    return [int(t) for t in mapping]


def check_something_to_heal(student_dir: Path, teacher_dir: Path, s_config: dict, t_config: dict, terms) -> None:
    """A UserError when healing cannot mean anything: the student is the teacher (same directory
    or the same weight files), or a hidden-state loss compares layers of different widths."""
    nothing = (f"the student {student_dir} is identical to the teacher {teacher_dir}; there is nothing to heal "
               "(heal a pruned copy of the teacher)")
    if Path(student_dir).resolve() == Path(teacher_dir).resolve() or _same_weights(student_dir, teacher_dir):
        raise UserError(nothing)
    widths = [c.get("hidden_size") for c in (s_config, t_config)]
    layer_terms = [t.name for t in terms if t.needs_layers]
    if layer_terms and widths[0] != widths[1]:
        raise UserError(f"loss {layer_terms[0]} compares hidden states, but the student is {widths[0]} wide and the "
                        f"teacher {widths[1]}; heal against the model the student was pruned from, or drop "
                        f"{layer_terms[0]} from heal.loss")


def _same_weights(a: Path, b: Path) -> bool:
    """Whether two model directories hold byte-identical weight files (hashed only when the sizes match)."""
    import hashlib

    files_a, files_b = modelio.weight_files(a), modelio.weight_files(b)
    if not files_a or [(f.name, f.stat().st_size) for f in files_a] != [(f.name, f.stat().st_size) for f in files_b]:
        return False

    def digest(path: Path) -> bytes:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while chunk := f.read(1 << 22):
                h.update(chunk)
        return h.digest()

    return all(digest(x) == digest(y) for x, y in zip(files_a, files_b))


def shared_vocab(student_tok, teacher_tok, student_vocab: int, teacher_vocab: int, log: Log) -> int:
    """The number of token ids both heads share; UserError if the tokenizers differ."""
    s, t = student_tok.get_vocab(), teacher_tok.get_vocab()
    if s != t:
        only = sorted(set(s.items()) ^ set(t.items()))[:1]
        example = f" (e.g. {only[0][0]!r})" if only else ""
        raise UserError(f"the teacher's tokenizer differs from the student's ({len(t)} vs {len(s)} tokens{example}); "
                        "heal needs the model the student was pruned from, or one with the same tokenizer")
    shared = min(student_vocab, teacher_vocab)
    if student_vocab != teacher_vocab:
        log(f"the heads differ only by padding rows ({student_vocab} vs {teacher_vocab}); "
            f"distilling over the {shared} shared token ids")
    return shared


def matched_layers(setting: str | list[int], num_layers: int) -> list[int]:
    if setting == "all":
        return list(range(num_layers))
    bad = [i for i in setting if not 0 <= i < num_layers]
    if bad:
        raise UserError(f"heal.hidden_layers: layer {bad[0]} is out of range; the student has {num_layers} "
                        f"layers (0-{num_layers - 1})")
    return sorted(set(setting))


def check_memory(student_dir: Path, teacher_dir: Path, settings: Heal, device: str, autocast: bool,
                 max_memory_gib: float | None, shards: int = 1) -> int:
    """Bytes the heal needs per process (``planner.heal_memory_bytes``, as ``--dry-run`` shows;
    ``shards``: FSDP processes sharing the weights); UserError when ``device`` has less free (or
    ``max_memory_gib``)."""
    from ollama_compress import distill, trainer
    from ollama_compress.planner import heal_memory_bytes, model_shape

    teacher = model_shape(teacher_dir)
    removed = teacher.num_layers - model_shape(student_dir).num_layers
    needed = heal_memory_bytes(teacher, removed, settings, device=device, autocast=autocast,
                               chunk_tokens=distill.DEFAULT_CHUNK_TOKENS, shards=shards)["total"]
    free = max_memory_gib * 2**30 if max_memory_gib is not None else trainer.available_memory(device)
    if free is not None and needed > free:
        raise UserError(f"the teacher and student do not fit: the heal needs about {needed / 2**30:.2f} GiB on "
                        f"{device} and {free / 2**30:.2f} GiB are available; use a device with more memory, "
                        "train: neighbours or lora, or a smaller batch/seq_len")
    return needed


# ---------------------------------------------------------------- how long
CHECK_FIGURES = ("kl", "ppl", "top1")  # what each held-out check during the heal records


def heal_steps(settings: Heal) -> int | None:
    """Optimizer steps of this heal: ``steps``, or from a token budget; None for a minutes budget
    (set on the machine, after the first steps are timed)."""
    budget = settings.budget
    if budget is None:
        return settings.steps
    if budget.tokens is not None:
        return max(1, math.ceil(budget.tokens / (settings.batch_size * settings.seq_len)))
    return None


def heal_tokens_needed(settings: Heal) -> int | None:
    """Training tokens this heal will consume (steps x batch_size x seq_len); None for a minutes budget."""
    steps = heal_steps(settings)
    return None if steps is None else steps * settings.batch_size * settings.seq_len


def heal_tokens_planned(settings: Heal) -> int:
    """``heal_tokens_needed``, or for a minutes budget what ``steps`` steps consume (what the teacher
    chat is sized for when it cannot wait for the first steps to be timed: ``chat_waits_for_budget``)."""
    needed = heal_tokens_needed(settings)
    return needed if needed is not None else settings.steps * settings.batch_size * settings.seq_len


PLANNED_TOKENS_STEP = 4096  # a minutes budget's measured plan is rounded up to this, so a cached chat serves again


def budget_tokens_planned(steps: int, settings: Heal) -> int:
    """The tokens a minutes budget consumes once its first steps set ``steps``, rounded up to
    ``PLANNED_TOKENS_STEP``."""
    tokens = steps * settings.batch_size * settings.seq_len
    return PLANNED_TOKENS_STEP * math.ceil(tokens / PLANNED_TOKENS_STEP)


def chat_waits_for_budget(settings: Heal, data: Data) -> bool:
    """Whether the teacher chat is written after the first steps are timed: a minutes budget and a
    `teacher` heal source whose size is left to the heal."""
    return heal_tokens_needed(settings) is None and any(
        s.from_ == "teacher" and s.tokens is None for s in data.heal_sources())


def default_eval_every(settings: Heal, heldout_tokens: int) -> int:
    """Steps between held-out checks so they cost about 10% of the heal: a check is one student forward
    per held-out token (the teacher's logits are cached); a step is about 4 forward-equivalents per
    trained token (teacher forward, student forward and backward)."""
    if settings.eval_every is not None:
        return settings.eval_every
    return max(1, math.ceil(heldout_tokens / (0.1 * 4 * settings.batch_size * settings.seq_len)))


# ---------------------------------------------------------------- data
def heal_texts_by_source(data: Data, tokenizer, teacher_dir: Path, ctx: StageContext | None,
                         settings: Heal | None = None, log: Log = lambda message: None,
                         planned: int | None = None) -> dict[str, list[str]]:
    """The heal's texts by ``data.heal`` key (``data.heal[i]`` for a list); `teacher` chat sized for
    ``settings`` and ``planned`` trained tokens (``heal_chat_tokens``)."""
    from ollama_compress.hooks.data import heal_chat_tokens, heal_source_key, load_texts

    texts: dict[str, list[str]] = {}
    for i, spec in enumerate(data.heal_sources()):
        tokens = (heal_chat_tokens(spec, data, settings, tokenizer, ctx, planned)
                  if spec.from_ == "teacher" and settings is not None else None)
        texts[heal_source_key(data, i)] = load_texts(spec, tokenizer, ctx, model=teacher_dir, tokens=tokens, log=log)
    return texts


def heal_stream(data: Data, tokenizer, teacher_dir: Path, ctx: StageContext | None, settings: Heal,
                held_windows: list[list[int]], log: Log, planned: int | None = None) -> list[int]:
    """The heal's token stream (``heal_texts_by_source``), after checking that no held-out window
    shares text with any of its sources."""
    from ollama_compress.hooks.data import bos_prefix, check_heldout_unseen, token_stream

    by_source = heal_texts_by_source(data, tokenizer, teacher_dir, ctx, settings, log, planned)
    check_heldout_unseen(held_windows, {key: [token_stream(texts, tokenizer)] for key, texts in by_source.items()},
                         skip=len(bos_prefix(tokenizer)))
    return token_stream([t for texts in by_source.values() for t in texts], tokenizer)


def log_window_views(planned: int, stream: list[int], log: Log, how: str = "") -> None:
    from ollama_compress.hooks.data import MAX_WINDOW_VIEWS, window_views

    views = window_views(planned, len(stream))
    log(f"heal data: {len(stream)} tokens for {planned} consumed{how}: each window is seen {views:.2f} times"
        + ("" if views <= MAX_WINDOW_VIEWS else
           f", more than {MAX_WINDOW_VIEWS}: add heal text or a teacher source (data.heal)"))


# ---------------------------------------------------------------- progress
def _live_active(console) -> bool:
    stack = getattr(console, "_live_stack", None)
    return bool(stack) if stack is not None else getattr(console, "_live", None) is not None


class ProgressReport:
    """A rich progress bar (step, loss and each term, tokens/s, ETA), or plain lines when another
    live display (the pipeline's status) already owns the terminal."""

    def __init__(self, console, total: int, log: Log):
        self.console, self.total, self.log = console, total, log
        self.progress = None
        self.task = None
        self.last_line = 0.0

    def __enter__(self) -> "ProgressReport":
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        if self.console is not None and not _live_active(self.console):
            self.progress = Progress(TextColumn("heal"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                     TextColumn("{task.description}"), console=self.console, transient=False)
            self.progress.__enter__()
            self.task = self.progress.add_task("", total=self.total)
        return self

    def __exit__(self, *exc) -> None:
        if self.progress is not None:
            self.progress.__exit__(*exc)

    def __call__(self, record: dict[str, Any]) -> None:
        if "message" in record:
            self.log(record["message"])
            return
        terms = " ".join(f"{k} {v:.4f}" for k, v in record.items()
                         if k not in ("step", "lr", "seconds", "tokens_per_s", "eta_s", "total", "loss", "grad_norm",
                                      "best", "stopped", "elapsed_s") and not k.startswith("heldout_"))
        text = f"loss {record['loss']:.4f} ({terms}) {record['tokens_per_s']:.0f} tok/s"
        if "heldout_kl" in record:
            text += f"; held-out KL {record['heldout_kl']:.4f}"
            if "heldout_ppl" in record:
                text += f", perplexity {record['heldout_ppl']:.2f}"
        if self.progress is not None:
            self.progress.update(self.task, completed=record["step"], total=record["total"], description=text)
        elif "heldout_kl" in record or time.monotonic() - self.last_line > 30 or record["step"] == record["total"]:
            self.last_line = time.monotonic()
            self.log(f"heal step {record['step']}/{record['total']}: {text}, ETA {record['eta_s'] / 60:.1f} min")


# ---------------------------------------------------------------- the one path
def _identity(model_dir: Path) -> list:
    return sorted((p.name, p.stat().st_size) for p in Path(model_dir).iterdir() if p.is_file())


def _load(model_dir: Path, options: RunOptions, dtype: str, device: str, needed: int, what: str):
    import torch

    try:
        return modelio.load_model(model_dir, options, dtype=dtype, device=device)
    except (torch.cuda.OutOfMemoryError, RuntimeError, MemoryError) as exc:
        if isinstance(exc, RuntimeError) and "out of memory" not in str(exc).lower():
            raise
        raise UserError(f"the {what} does not fit on {device}: the heal needs about {needed / 2**30:.2f} GiB; "
                        "use a device with more memory, train: neighbours or lora, or a smaller batch") from None


def heal_model(
    student_dir: Path,
    teacher_dir: Path,
    out_dir: Path,
    settings: Heal,
    data: Data,
    *,
    ctx: StageContext | None = None,
    options: RunOptions | None = None,
    checkpoint_dir: Path | None = None,
    resume: bool | str = False,
    max_memory_gib: float | None = None,
    console=None,
    log: Log | None = None,
) -> dict[str, Any]:
    """Distil ``student_dir`` from ``teacher_dir`` per ``settings`` and ``data``; write ``out_dir``.

    ``options``, ``console`` and ``log`` default to the stage context's (``ctx``) when there is one.
    ``resume``: True continues from the last complete checkpoint in ``checkpoint_dir`` (UserError
    if there is none), False refuses to overwrite existing checkpoints, "auto" resumes when a
    checkpoint of the same settings exists and starts over otherwise. Returns the figures
    (held-out KL, top-1 agreement and perplexity before and after, steps, tokens/s).
    """
    import torch

    from ollama_compress import distill, machine, trainer

    options = options or (ctx.options if ctx is not None else RunOptions())
    console = console if console is not None or ctx is None else ctx.console
    log = log or (ctx.log if ctx is not None else lambda message: None)
    student_dir, teacher_dir, out_dir = Path(student_dir), Path(teacher_dir), Path(out_dir)
    for path in (student_dir, teacher_dir):
        modelio.check_model_dir(path, options)
        modelio.check_causal_lm(path)
    terms = distill.loss_terms(settings.loss)
    s_config, t_config = (modelio.read_config(p) for p in (student_dir, teacher_dir))
    check_something_to_heal(student_dir, teacher_dir, s_config, t_config, terms)
    s_tok, t_tok = modelio.load_tokenizer(student_dir, options), modelio.load_tokenizer(teacher_dir, options)
    vocab = shared_vocab(s_tok, t_tok, s_config["vocab_size"], t_config["vocab_size"], log)
    num_layers = s_config["num_hidden_layers"]
    mapping = read_layer_map(student_dir, num_layers, t_config["num_hidden_layers"])
    needs_map = [t.name for t in terms if t.needs_layers]
    if needs_map and mapping is None:
        raise UserError(f"loss {needs_map[0]} needs the student's layer_map.json (written by prune) to know which "
                        f"teacher layer each student layer came from; {student_dir} has none. Heal a pruned model "
                        f"or drop {needs_map[0]} from heal.loss")
    matched = matched_layers(settings.hidden_layers, num_layers)
    if mapping is None and settings.train == "neighbours":
        raise UserError("heal.train: neighbours needs the student's layer_map.json (a model written by prune); "
                        "use train: all")

    accelerator = trainer.make_accelerator(options.resolved_device())
    device = trainer.process_device(accelerator, options.resolved_device())
    main = accelerator.is_main_process
    sharded = trainer.is_sharded(accelerator)
    load_device = "cpu" if sharded else device  # FSDP moves each process's shards to its GPU
    if not main:  # one voice: rank 0 logs and writes
        log, console = (lambda message: None), None
    threads = machine.use_physical_cores() if device == "cpu" and accelerator.num_processes == 1 else None
    choice = machine.choose_dtype(device, settings.dtype, machine.heal_shapes(
        (settings.micro_batch or settings.batch_size) * settings.seq_len, s_config["hidden_size"],
        s_config.get("intermediate_size", 4 * s_config["hidden_size"]), vocab))
    compute_dtype = choice.dtype
    teacher_dtype = "bfloat16" if compute_dtype is not None else "float32"  # a frozen bf16 copy: no casts per step
    needed = check_memory(student_dir, teacher_dir, settings, device, compute_dtype is not None, max_memory_gib,
                          accelerator.num_processes if sharded else 1)

    from ollama_compress.hooks.data import unseen_heldout_windows, window_views

    if resume is True:  # --resume without a checkpoint is refused before any slow work
        _checkpoint_to_resume(checkpoint_dir, True, "")
    held_windows = unseen_heldout_windows(data, s_tok, ctx, teacher_dir, heal=False)  # the heal text: below
    held = torch.tensor(held_windows, dtype=torch.long)
    planned = heal_tokens_planned(settings)
    # a minutes budget's chat is written once the first steps, on the other sources, set the step count
    chat_waits = chat_waits_for_budget(settings, data)
    stream = heal_stream(data, s_tok, teacher_dir, ctx, settings, held_windows, log, 0 if chat_waits else planned)
    if chat_waits and len(stream) < settings.seq_len + 1:  # nothing to time the first steps on: heal.steps
        chat_waits = False
        stream = heal_stream(data, s_tok, teacher_dir, ctx, settings, held_windows, log, planned)
        log_window_views(planned, stream, log, f" if {settings.steps} steps (heal.steps) fit in the budget")
    elif heal_tokens_needed(settings) is not None:
        log_window_views(planned, stream, log)
    if len(stream) < settings.seq_len + 1:
        raise UserError(f"the heal text has only {len(stream)} tokens, fewer than heal.seq_len={settings.seq_len}; "
                        "give more text (data.heal) or a smaller seq_len")

    fingerprint = settings_hash(settings.model_dump(mode="json"), data.model_dump(mode="json", by_alias=True),
                                _identity(student_dir), _identity(teacher_dir))
    if checkpoint_dir is not None:
        if main:  # one process writes the marker and removes what a killed heal left there
            claim_output_dir(checkpoint_dir, "the checkpoint folder", inputs=(student_dir, teacher_dir))
            clean_journal(checkpoint_dir)
        else:
            check_output_dir(checkpoint_dir, "the checkpoint folder", inputs=(student_dir, teacher_dir))
    start_from = _checkpoint_to_resume(checkpoint_dir, resume, fingerprint)

    torch.manual_seed(settings.seed)
    teacher = _load(teacher_dir, options, teacher_dtype, load_device, needed, "teacher")
    teacher.requires_grad_(False)
    run_dir = ctx.run_dir if ctx is not None else None
    if main:  # the teacher's held-out log-probabilities, computed once per run and read by evaluate too
        as_reference = teacher_dtype == "float32" and load_device == options.resolved_device()
        teacher_reference(teacher_dir, held_windows, options=options, run_dir=run_dir, log=log,
                          loaded=teacher if as_reference else None)
    accelerator.wait_for_everyone()
    reference = teacher_reference(teacher_dir, held_windows, options=options, run_dir=run_dir)

    student = _load(student_dir, options, "float32", load_device, needed, "student")
    student = trainer.select_trainable(student, settings.train, mapping, settings.lora_rank)
    checkpointing = settings.gradient_checkpointing
    if checkpointing is None:
        checkpointing = device.startswith("cuda")
    if checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    steps = heal_steps(settings)
    minutes = settings.budget.minutes if settings.budget is not None else None
    if steps is None:  # a minutes budget: the first steps are timed, then the total is set
        steps = trainer.MEASURE_STEPS
        warmup = settings.warmup if settings.warmup is not None else trainer.MEASURE_STEPS
    else:
        warmup = min(settings.warmup if settings.warmup is not None else max(1, steps // 20), steps)
    log_file = (checkpoint_dir / "train_log.jsonl") if checkpoint_dir is not None else None
    cfg = trainer.TrainConfig.from_heal(
        settings, steps=steps, warmup=warmup, eval_every=default_eval_every(settings, held.numel()),
        checkpoint_every=settings.checkpoint_every if checkpoint_dir is not None else 0, terms=terms,
        device=device, compute_dtype=compute_dtype, student_to_teacher=mapping or list(range(num_layers)),
        matched_layers=matched, vocab=vocab, checkpoint_dir=checkpoint_dir, fingerprint=fingerprint, log_file=log_file)
    run = trainer.Trainer(student, teacher, stream, cfg, accelerator=accelerator)
    teacher_rows = reference.window_rows()
    eval_student, eval_teacher = run.eval_models()

    def measure() -> dict[str, float]:
        return trainer.heldout_metrics(eval_student, eval_teacher, held, device, vocab, teacher_rows)

    eval_started = time.perf_counter()
    before = measure()
    eval_seconds = time.perf_counter() - eval_started
    run.evaluate = lambda: {key: value for key, value in measure().items() if key in CHECK_FIGURES}
    if before["kl"] == 0:
        raise UserError(f"the student {student_dir} predicts exactly what the teacher does (held-out KL "
                        f"{before['kl']}); there is nothing to heal")
    if start_from is not None:
        step = run.resume(start_from)
        log(f"resuming from {start_from} (step {step} of {cfg.steps})")
    else:
        run.count_start(before["kl"])
        if checkpoint_dir is not None and main:
            remove_made_children(checkpoint_dir)  # an earlier heal's checkpoints, of other settings
    if log_file is not None and main:
        trainer.rewrite_log(log_file, run.state.log)
    accelerator.wait_for_everyone()
    precision = "bf16 autocast" if compute_dtype is not None else "fp32"
    if choice.rates:
        log(f"matmul rates on this CPU ({threads or torch.get_num_threads()} threads): " +
            ", ".join(f"{name} {rate:.3g} GFLOP/s" for name, rate in choice.rates.items()) + f"; healing in {precision}")
    length = f"{minutes:g} minutes" if minutes is not None else f"{cfg.steps} steps"
    processes = f" x {run.world} processes" if run.world > 1 else ""
    log(f"healing on {device}{processes} ({precision}): {length} of {settings.batch_size} x {settings.seq_len} "
        f"tokens, train {settings.train}, losses {', '.join(f'{t.name}x{t.weight:g}' for t in terms)}; "
        f"held-out KL to the teacher {before['kl']:.4f}, checked every {cfg.eval_every} steps")
    started = time.perf_counter()
    chat_seconds = 0.0
    if chat_waits:
        if run.state.planned_tokens is None:  # the first steps set the budget's step count
            with ProgressReport(console, cfg.steps, log) as report:
                run.on_step = report
                run.run(eval_seconds=eval_seconds, stop_at=cfg.steps)  # MEASURE_STEPS more, then the total is set
            run.state.planned_tokens = budget_tokens_planned(cfg.steps, settings)
        chat_started = time.perf_counter()
        run.stream = heal_stream(data, s_tok, teacher_dir, ctx, settings, held_windows, log, run.state.planned_tokens)
        chat_seconds = time.perf_counter() - chat_started
        log_window_views(run.state.planned_tokens, run.stream, log, f" ({cfg.steps} steps fit in the budget)")
    with ProgressReport(console, cfg.steps, log) as report:
        run.on_step = report
        records = run.run(eval_seconds=eval_seconds)
    seconds = time.perf_counter() - started - chat_seconds
    best_step = run.restore_best()
    trained = [r for r in records if "tokens_per_s" in r]
    checks = [{"step": 0, "seconds": 0.0, **{key: before[key] for key in CHECK_FIGURES}}] + [
        {"step": r["step"], "seconds": r.get("elapsed_s"), **{key: r.get(f"heldout_{key}") for key in CHECK_FIGURES}}
        for r in records if "heldout_kl" in r]  # seconds of training and checks (since the resume, if any)
    after = _figures_at(best_step, checks, before) or measure()
    curve = [[check["step"], check["kl"]] for check in checks]
    stopped = next((r["stopped"] for r in records if "stopped" in r), None)
    result = {
        "steps": run.state.step, "device": device, "precision": precision, "train": settings.train,
        "processes": run.world,
        "kl_before": before["kl"], "kl_after": after["kl"], "kl_reduction": 1 - after["kl"] / before["kl"],
        "top1_before": before["top1"], "top1_after": after["top1"],
        "ppl_teacher": before["teacher_ppl"], "ppl_before": before["ppl"], "ppl_after": after["ppl"],
        "tokens_per_s": (sum(r["tokens_per_s"] for r in trained) / len(trained)) if trained else None,
        "train_seconds": round(seconds, 1), "heal_tokens": len(run.stream), "memory_estimate_bytes": needed,
        "trained_tokens": run.state.step * settings.batch_size * settings.seq_len,
        "heldout_curve": curve, "heldout_checks": checks, "best_step": best_step, "stopped_early": stopped,
        "dtype": choice.record(), "threads": threads, "planned_tokens": run.state.planned_tokens or planned,
        "chat_seconds": round(chat_seconds, 1),
    }
    result["window_views"] = round(window_views(result["trained_tokens"], len(run.stream)), 2)  # times each window was seen
    if stopped:
        log(f"heal stopped at step {run.state.step}: {stopped}")
    kept = f"step {best_step}" if best_step else "no check beat the start: the unhealed weights are kept"
    log(f"held-out KL to the teacher {before['kl']:.4f} -> {after['kl']:.4f} "
        f"({100 * result['kl_reduction']:.0f}% lower; best of {len(curve) - 1} checks, {kept}), "
        f"perplexity {before['ppl']:.2f} -> {after['ppl']:.2f} (teacher {before['teacher_ppl']:.2f})")
    full = run.full_student_state() if run.sharded else None  # every process takes part in the gather
    if main:
        if full is not None:
            student = modelio.load_model(student_dir, options)
            student = trainer.select_trainable(student, settings.train, mapping, settings.lora_rank)
            student.load_state_dict(full)
        _save(student, s_tok, student_dir, out_dir, records, result)
        store_figures(reference.folder, student_dir, _as_figures(before))  # evaluate's pruned and healed rows
        store_figures(reference.folder, out_dir, _as_figures(after))
        if checkpoint_dir is not None:
            remove_made(checkpoint_dir)
    accelerator.wait_for_everyone()
    return result


def iterative_healer(teacher_dir: Path, settings: Heal, data: Data, *, options: RunOptions | None = None,
                     ctx: StageContext | None = None, log: Log = lambda message: None) -> Callable:
    """``between_steps(model, step, student_to_teacher)`` for iterative pruning: after each removal,
    ``settings.iterative_steps`` steps of heal of the in-memory model against the teacher (ILD).

    Trains the layers next to the cuts with ``train: neighbours``, every decoder layer otherwise.
    """
    from ollama_compress import trainer
    from ollama_compress.hooks.data import unseen_heldout_windows

    options = options or RunOptions()
    device = options.resolved_device()
    compute_dtype = trainer.autocast_dtype(device, settings.dtype)
    loaded: dict[str, Any] = {}

    def setup() -> None:  # on the first removal, after prune has checked its own input
        tokenizer = modelio.load_tokenizer(teacher_dir, options)
        held = unseen_heldout_windows(data, tokenizer, ctx, teacher_dir, heal=False)  # the heal text: next line
        loaded["stream"] = heal_stream(data, tokenizer, teacher_dir, ctx, settings, held, log)
        loaded["teacher"] = modelio.load_model(teacher_dir, options, device=device).requires_grad_(False)

    def between_steps(model, step: int, student_to_teacher: list[int]) -> None:
        if not loaded:
            setup()
        teacher, stream = loaded["teacher"], loaded["stream"]
        vocab = min(model.get_output_embeddings().weight.shape[0], teacher.get_output_embeddings().weight.shape[0])
        mode = "neighbours" if settings.train == "neighbours" else "all"
        trainer.select_trainable(model, mode, student_to_teacher)
        cfg = trainer.TrainConfig.from_heal(
            settings, steps=settings.iterative_steps, schedule="constant", warmup=1, weight_decay=0.0,
            checkpoint_every=0, patience=0, budget_seconds=None, seed=settings.seed + 1000 * (step + 1),
            device=device, compute_dtype=compute_dtype, student_to_teacher=student_to_teacher,
            matched_layers=matched_layers(settings.hidden_layers, len(student_to_teacher)), vocab=vocab)
        run = trainer.Trainer(model, teacher, stream, cfg)
        records = run.run()
        model.requires_grad_(False)
        model.eval()
        log(f"heal after step {step + 1}: {settings.iterative_steps} steps, loss {records[0]['loss']:.4f} -> "
            f"{records[-1]['loss']:.4f}")

    return between_steps


def _iterative_step(ctx: StageContext, settings: Heal, student_dir: Path, teacher_dir: Path, out: Path) -> Path:
    """The built-in heal between two removals of an iterative prune (``iterative_healer``), on disk."""
    student = modelio.load_model(student_dir, ctx.options, device=ctx.options.resolved_device())
    teacher_layers = int(modelio.read_config(teacher_dir)["num_hidden_layers"])
    mapping = read_layer_map(student_dir, student.config.num_hidden_layers, teacher_layers)
    healer = iterative_healer(teacher_dir, settings, ctx.recipe.data, options=ctx.options, ctx=ctx, log=ctx.log)
    healer(student, int(ctx.inputs["iterative_step"]) - 1, mapping)
    with atomic_path(out, is_dir=True) as tmp:
        modelio.save_model(student.to("cpu"), None, tmp, student_dir)
        shutil.copy2(student_dir / LAYER_MAP, tmp / LAYER_MAP)
    return out


def _checkpoint_to_resume(checkpoint_dir: Path | None, resume: bool | str, fingerprint: str) -> Path | None:
    from ollama_compress import trainer

    latest = trainer.latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    if resume == "auto" and latest is not None:
        state = json.loads((latest / trainer.STATE_FILE).read_text())
        return latest if state.get("fingerprint") == fingerprint else None
    if resume is True and latest is None:
        raise UserError(f"--resume: no complete checkpoint in {checkpoint_dir}; run without --resume to start over")
    if resume is False and latest is not None:
        raise UserError(f"{checkpoint_dir} holds a checkpoint of an earlier heal; pass --resume to continue it, "
                        "or delete that directory to start over")
    return latest if resume else None


def _figures_at(step: int, checks: list[dict[str, Any]], before: dict[str, float]) -> dict[str, float] | None:
    """The held-out figures of the weights kept at ``step``: its check's, or None when no check
    of this run measured them (a heal without checks, or a best step from before a resume)."""
    check = next((c for c in reversed(checks) if c["step"] == step), None)
    if check is None or any(check.get(key) is None for key in CHECK_FIGURES):
        return None
    return {**before, **{key: check[key] for key in CHECK_FIGURES}}


def _as_figures(check: dict[str, float]) -> dict[str, float]:
    """A heal check's figures under evaluate's names (``reference.FIGURE_KEYS``)."""
    return {"perplexity": check["ppl"], "kl": check["kl"], "top1_agreement": check["top1"]}


def _save(student, tokenizer, student_dir: Path, out_dir: Path, records: list, result: dict) -> None:
    if hasattr(student, "merge_and_unload"):
        student = student.merge_and_unload()
    if getattr(student, "is_activation_checkpointing", False):
        student.activation_checkpointing_disable()
    student = student.to("cpu").eval()
    student.requires_grad_(False)
    modelio.check_finite(student.state_dict().items(), "the healed model", StageFailed)
    if out_dir.exists():
        claim_output_dir(out_dir, "--out")  # an empty folder given as --out, or an earlier heal's output
    with atomic_path(out_dir, is_dir=True) as tmp:
        modelio.save_model(student, tokenizer, tmp, student_dir)
        if (student_dir / LAYER_MAP).is_file():
            shutil.copy2(student_dir / LAYER_MAP, tmp / LAYER_MAP)
        (tmp / "train_log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        write_json(tmp / "heal.json", result)


# ---------------------------------------------------------------- capability and stage hooks
# name -> (function in ollama_compress.distill, description, whether it compares layer outputs)
BUILTIN_LOSSES = {
    "kl": ("kl_loss", "forward KL to the teacher's softened logits x T^2, chunked over tokens", False),
    "hidden_mse": ("hidden_mse_loss", "normalised MSE of each kept layer to its original teacher layer", True),
    "ce": ("ce_loss", "next-token cross-entropy on the heal text", False),
    "lens": ("lens_loss", "symmetric JSD of mapped layers through the final norm and LM head", True),
}


def _builtin_loss(attr: str) -> Callable:
    """The loss ``distill.<attr>``, imported (with torch) only when it runs."""

    def loss(student, teacher, batch):
        from ollama_compress import distill

        return getattr(distill, attr)(student, teacher, batch)

    loss.__name__ = attr
    return loss


@hookimpl
def register_losses(register) -> None:
    for name, (attr, description, needs_layers) in BUILTIN_LOSSES.items():
        register(name, _builtin_loss(attr), description, needs_layers=needs_layers)


def resolve_model(spec: str | Path, options: RunOptions) -> Path:
    from ollama_compress.hooks.source import resolve_model_dir

    return Path(spec) if Path(spec).is_dir() else resolve_model_dir(str(spec), options)


@hookimpl(trylast=True)
def heal(ctx: StageContext, student_dir: Path, teacher_dir: Path) -> Path | None:
    """Heal per the recipe's ``heal`` section into ``ctx.out_dir / "model"``; figures go to ctx.metrics.

    Checkpoints live in ``run_dir/cache/heal-checkpoints`` (outside the stage's temporary
    directory), so an interrupted heal continues where it stopped when the run is started again.
    """
    settings = ctx.section_as(Heal)
    if settings is None:
        return None
    out = Path(ctx.out_dir) / "model"
    if ctx.inputs.get("iterative_step"):  # between removals of an iterative prune: a short heal
        return _iterative_step(ctx, settings, Path(student_dir), Path(teacher_dir), out)
    result = heal_model(resolve_model(student_dir, ctx.options), resolve_model(teacher_dir, ctx.options), out,
                        settings, ctx.recipe.data, ctx=ctx, resume="auto",
                        checkpoint_dir=Path(ctx.run_dir) / "cache" / "heal-checkpoints")
    ctx.metrics.update(result)
    return out


# ---------------------------------------------------------------- command line
def _data_override(data: str | None) -> list[str]:
    if data is None:
        return []
    if data in ("default", "teacher"):
        return [f"data.heal={{from: {data}}}"]
    if data == "default+teacher":
        return ["data.heal=[{from: default}, {from: teacher}]"]
    path = Path(data)
    if not path.is_file():
        raise UserError(f"--data {data}: not a file; give a .txt or .jsonl file, default, teacher or default+teacher")
    kind = "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "text"
    return [f"data.heal={{from: {kind}, path: {json.dumps(str(path))}}}"]


def command_settings(student: str, overrides: list[str], heal: dict[str, Any] | None = None) -> tuple[Heal, Data]:
    """The heal settings and data of the command: the recipe defaults, the ``heal`` fields given as
    options, then the ``--set`` overrides."""
    from ollama_compress.recipe import apply_override, validate

    raw: dict[str, Any] = {"recipe_version": 1, "name": "heal", "source": {"model": student}, "heal": dict(heal or {})}
    for item in overrides:
        apply_override(raw, item)
    recipe = validate(raw, "heal settings")
    return recipe.heal, recipe.data


def default_checkpoint_dir(out: Path) -> Path:
    return out.with_name(out.name + ".checkpoints")


COMMAND_SKIPS = ("teacher",)  # the command's --teacher is required and takes any model form


@click.command("heal")
@click.argument("student")
@click.option("--teacher", required=True, help="The unpruned model (same forms as STUDENT).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the healed model.")
@section_options(Heal, COMMAND_SKIPS)
@click.option("--data", help="Heal text: a .txt/.jsonl file, default, teacher or default+teacher.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE",
              help="Any recipe key under heal. or data. (heal.loss={kl: 1, ce: 0.1}).")
@click.option("--resume", is_flag=True, help="Continue from the last complete checkpoint.")
@click.option("--checkpoints", type=click.Path(path_type=Path), help="Checkpoint directory (default: OUT.checkpoints).")
@click.option("--max-memory", type=float, help="Memory the heal may use, in GiB (default: what the device has free).")
@json_option
@run_options
def heal_command(student, teacher, out, data, overrides, resume, checkpoints, max_memory, as_json, **given):
    """Distil STUDENT (a pruned model) from --teacher and write the healed model to --out.

    STUDENT and MODEL are HF directories, .gguf files (imported once), embedded:NAME or cached hub ids.
    """
    from rich.console import Console

    options = make_options(**given)
    chosen = option_values(Heal, given, COMMAND_SKIPS)
    section_from_options(Heal, chosen)  # a bad option value is named by its flag
    bad = [o for o in overrides if not o.split("=", 1)[0].startswith(("heal.", "data."))]
    if bad:
        raise UserError(f"--set {bad[0]}: heal takes heal.* and data.* keys only")
    settings, data_spec = command_settings(str(student), [*_data_override(data), *overrides], chosen)
    student_dir, teacher_dir = resolve_model(student, options), resolve_model(teacher, options)
    out = Path(out)
    if out.resolve() in (student_dir.resolve(), teacher_dir.resolve()):
        raise UserError(f"--out {out} is an input model; choose an empty or new folder")
    check_output_dir(out, "--out", inputs=(student_dir, teacher_dir))
    checkpoints = checkpoints or default_checkpoint_dir(out)
    check_output_dir(checkpoints, "--checkpoints", inputs=(student_dir, teacher_dir))
    result = heal_model(student_dir, teacher_dir, out, settings, data_spec, options=options,
                        checkpoint_dir=checkpoints, resume=resume, max_memory_gib=max_memory,
                        console=Console(stderr=True), log=lambda message: click.echo(message, err=True))
    from ollama_compress.options import launcher_world

    if launcher_world()[0] != 0:  # under a launcher, rank 0 reports
        return
    if as_json:
        echo_json(result)
    else:
        click.echo(f"wrote {out}: held-out KL to the teacher {result['kl_before']:.4f} -> {result['kl_after']:.4f}, "
                   f"perplexity {result['ppl_before']:.2f} -> {result['ppl_after']:.2f}")


@hookimpl
def register_commands(cli: click.Group) -> None:
    add_command(cli, heal_command)
