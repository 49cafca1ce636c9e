"""Calibration and held-out text: where it comes from and how it becomes token batches.

A recipe ``data`` entry (``TextSource``) names a *kind* of source in ``from``:

* ``default``: the corpus that ships with the package (``ollama_compress.data``):
  ``calibration.txt`` (about 40 KB, ~9,700 SmolLM2 tokens: the default 32 x 256 without reuse)
  and, for ``split: heldout``, ``heldout.txt`` (about 16 KB, ~4,200 tokens: 16 x 256).
  Both are original mixed text written for this project: expository prose on many topics,
  dialogues, instructions with answers, a little Python and JavaScript, lists and numbers, and a
  few paragraphs in French, German and Spanish. The two files share no paragraph.
* ``text``: a plain UTF-8 text file (``path``).
* ``jsonl``: one JSON object per line with a ``text`` string or a ``messages`` list
  (``[{"role": ..., "content": ...}]``), the latter rendered through the model's own chat template.
* ``hf``: a Hugging Face dataset by name (``dataset``, ``split``); needs the optional ``datasets``
  package and a network.
* ``teacher``: chat the teacher writes with llama.cpp (``ollama_compress.teacher_chat``, many
  replies decoded at once) from a prompt set: ``prompts``, the JSON lines of ``path`` (``prompt``
  and ``category``), or the shipped ``prompts.jsonl`` (330 instructions: everyday questions,
  facts, how-to, code, math, writing). Sampled (``temperature``, ``top_p``, ``seed``), each reply
  up to ``max_new_tokens``; prompt and reply together, in the model's chat template, are the text.
  Its size: ``tokens``, else (in ``data.heal``) what keeps each heal window seen at most twice
  (``heal_chat_tokens``), else ``samples x seq_len``. The teacher GGUF is the source GGUF, or the
  teacher exported and quantized through the hooks. Cached by content in the user cache
  (``~/.cache/ollama-compress/teacher-chat``). ``write: text``: no prompt and no chat template; each
  sample starts from the model's start token alone, so the text follows what the teacher writes
  by itself (web-like prose, lists, code), not what the prompt set asks for.

Plugins add kinds through ``register_data_sources``; a kind's function is
``fn(spec, tokenizer, ctx) -> list[str]``. ``calibration_batches`` joins the texts with the EOS token
and cuts ``spec.samples`` windows of ``spec.seq_len`` tokens, chosen deterministically from
``spec.seed``.
"""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path
from typing import Any, Callable, Iterator

from ollama_compress.context import StageContext
from ollama_compress.embedded import cache_dir as user_cache
from ollama_compress.errors import NotAvailable, UserError
from ollama_compress.fsutil import Fingerprints, atomic_path, settings_hash
from ollama_compress.hooks.heal import heal_tokens_planned
from ollama_compress.hooks.source import source_path
from ollama_compress.hookspecs import hookimpl
from ollama_compress.options import RunOptions
from ollama_compress.plugins import call_first, capability
from ollama_compress.recipe import TextSource, validate
from ollama_compress.safe_read import parse_json, read_text

DEFAULT_FILES = {"calibration": "calibration.txt", "heldout": "heldout.txt"}

PROMPTS_FILE = "prompts.jsonl"  # the shipped prompt set of `teacher` (one {"category", "prompt"} a line)
MAX_WINDOW_VIEWS = 2  # with the default heal data, no heal token window is seen more than this many times
HEAL_PLANNED_KEY = "heal_planned_tokens"  # the heal stage's output: the tokens its teacher chat was sized for
TEACHER_CHAT_VERSION = 1  # part of the cache key: bump when the generated text would change


# ---------------------------------------------------------------- helpers
def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of ``path``; a UserError naming ``what`` when it is missing, unreadable or empty."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; give a path to a text file")
    text = read_text(path, "data", f"{what} file {path}")  # a regular file of sane size, UTF-8
    if not text.strip():
        raise UserError(f"{what} file {path} is empty; give a file with text in it")
    return text


def _require_path(spec: TextSource) -> str:
    if not spec.path:
        raise UserError(f"data source '{spec.from_}' needs 'path' (a file to read)")
    return spec.path


def _chat_text(tokenizer, messages: Any, where: str) -> str:
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    ) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}} strings")
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{where}: 'messages' need the model's chat template, and this tokenizer has none; "
                        "use 'text' fields instead")
    return tokenizer.apply_chat_template(messages, tokenize=False)


def _record_text(record: Any, tokenizer, where: str) -> str:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object with a 'text' or 'messages' field")
    if isinstance(record.get("text"), str):
        return record["text"]
    if "messages" in record:
        return _chat_text(tokenizer, record["messages"], where)
    raise UserError(f"{where}: no 'text' or 'messages' field; each line needs one of them")


def _nonempty(texts: list[str], what: str) -> list[str]:
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise UserError(f"{what} has no text; give a source with some text in it")
    return texts


# ---------------------------------------------------------------- the built-in kinds
def default_texts(spec: TextSource, tokenizer=None, ctx=None) -> list[str]:
    """The corpus shipped with the package: heldout.txt for split 'heldout', else calibration.txt."""
    name = DEFAULT_FILES["heldout" if spec.split == "heldout" else "calibration"]
    text = resources.files("ollama_compress.data").joinpath(name).read_text(encoding="utf-8")
    return [text]


def text_file_texts(spec: TextSource, tokenizer=None, ctx=None) -> list[str]:
    """A plain UTF-8 text file, as one document."""
    return [read_text_file(_require_path(spec), "calibration")]


def jsonl_texts(spec: TextSource, tokenizer=None, ctx=None) -> list[str]:
    """One text per JSON line: its ``text``, or its ``messages`` through the chat template."""
    path = _require_path(spec)
    content = read_text_file(path, "JSONL")
    texts = [_record_text(record, tokenizer, where) for where, record in _json_lines(content, path)]
    return _nonempty(texts, str(path))


def _json_lines(content: str, source: str | os.PathLike) -> Iterator[tuple[str, Any]]:
    """(where, record) for each non-blank line of the JSON-lines text ``content`` read from ``source``."""
    for number, line in enumerate(content.splitlines(), 1):
        if line.strip():
            where = f"{source} line {number}"
            yield where, parse_json(line, where)


def hf_texts(spec: TextSource, tokenizer=None, ctx=None) -> list[str]:
    """Rows of an HF dataset (``text`` column, or ``messages`` through the chat template)."""
    if not spec.dataset:
        raise UserError("data source 'hf' needs 'dataset' (a Hugging Face dataset name)")
    try:
        import datasets
    except ImportError:
        raise UserError("data source 'hf' needs the datasets package: pip install 'ollama-compress[datasets]'") from None
    try:
        rows = datasets.load_dataset(spec.dataset, split=spec.split, streaming=True)
    except Exception as exc:  # offline, unknown name, unknown split: all reported the same way
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot load dataset '{spec.dataset}' split '{spec.split}' "
                        f"(needs a network and a valid name): {reason}") from None
    budget = spec.samples * spec.seq_len * 8  # characters; generous for ~4 characters per token
    texts, used = [], 0
    for number, row in enumerate(rows):
        texts.append(_record_text(row, tokenizer, f"dataset {spec.dataset} row {number}"))
        used += len(texts[-1])
        if used >= budget:
            break
    return _nonempty(texts, f"dataset {spec.dataset}")


# ---------------------------------------------------------------- teacher-written chat
def window_views(tokens_needed: int, tokens_available: int) -> float:
    """How many times each heal token window is seen: tokens consumed over tokens available."""
    return tokens_needed / max(1, tokens_available)


def heal_chat_tokens(spec: TextSource, data, heal, tokenizer, ctx=None, planned: int | None = None) -> int:
    """Tokens of teacher chat that ``spec`` (a `teacher` entry of ``data.heal``) writes for ``heal``.

    ``spec.tokens`` when given; else what the heal still lacks after its other sources so that
    each window is seen at most ``MAX_WINDOW_VIEWS`` times, split evenly over the `teacher` entries
    (0 when the other sources suffice), for ``planned`` trained tokens (default: what the run's heal
    stage sized it for, ``ctx.inputs[HEAL_PLANNED_KEY]``, else ``heal_tokens_planned``).
    """
    if spec.tokens is not None:
        return spec.tokens
    if planned is None:
        planned = (getattr(ctx, "inputs", None) or {}).get(HEAL_PLANNED_KEY)
    needed = planned if planned is not None else heal_tokens_planned(heal)
    sources = data.heal_sources()
    teachers = [s for s in sources if s.from_ == "teacher"]
    others = sum(len(token_stream(load_texts(s, tokenizer, ctx), tokenizer)) for s in sources if s.from_ != "teacher")
    missing = -(-needed // MAX_WINDOW_VIEWS) - others - sum(s.tokens or 0 for s in teachers)
    unsized = sum(1 for s in teachers if s.tokens is None)
    return max(0, -(-missing // max(1, unsized)))


def _chat_token_target(spec: TextSource, tokenizer, ctx) -> int:
    """The size of a `teacher` source: set, derived from the recipe's heal, or ``samples x seq_len``."""
    if spec.tokens is not None:
        return spec.tokens
    recipe = getattr(ctx, "recipe", None)
    if recipe is not None and recipe.heal is not None and spec in recipe.data.heal_sources():
        return heal_chat_tokens(spec, recipe.data, recipe.heal, tokenizer, ctx)
    return spec.samples * spec.seq_len


def teacher_prompts(spec: TextSource) -> list[tuple[str, str]]:
    """(category, prompt) pairs: ``spec.prompts``, the JSON lines of ``spec.path``, or the shipped set."""
    if spec.prompts is not None:
        prompts = [("given", p) for p in spec.prompts if p.strip()]
        if not prompts:
            raise UserError("data source 'teacher': 'prompts' has no text; give at least one prompt")
        return prompts
    if spec.path:
        content, where = read_text_file(spec.path, "prompts"), spec.path
    else:
        content, where = resources.files("ollama_compress.data").joinpath(PROMPTS_FILE).read_text("utf-8"), PROMPTS_FILE
    prompts = []
    for line_where, record in _json_lines(content, where):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str) or not record["prompt"].strip():
            raise UserError(f"{line_where}: expected a JSON object with a 'prompt' string")
        prompts.append((str(record.get("category", "")), record["prompt"]))
    return _nonempty_prompts(prompts, where)


def _nonempty_prompts(prompts: list, where: str) -> list:
    if not prompts:
        raise UserError(f"{where} has no prompts; give a JSON line with a 'prompt' string")
    return prompts


def _teacher_tokenizer(tokenizer, spec: TextSource):
    """``tokenizer``, which chat (``write: chat``) needs with a chat template."""
    chat = spec.write == "chat"
    if tokenizer is None or (chat and not getattr(tokenizer, "chat_template", None)):
        raise UserError("data source 'teacher' needs the model's tokenizer" + (" with a chat template" if chat else ""))
    return tokenizer


def prompt_text(tokenizer, prompt: str) -> str:
    """``prompt`` as a user turn in the model's chat template, ready for the assistant's reply."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                         add_generation_prompt=True)


def conversation_text(tokenizer, prompt: str, reply: str) -> str:
    """The whole conversation, prompt and reply, in the model's chat template (the heal text)."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": reply}], tokenize=False)


def teacher_gguf(model, ctx=None, log=lambda message: None) -> Path:
    """The teacher as a GGUF llama.cpp can run.

    The recipe's source GGUF when the source is one (``embedded:``, a ``.gguf`` file) and the heal
    has no other teacher; otherwise ``model`` (an HF directory) exported through the ``export_gguf``
    hook and quantized to Q8_0 through ``quantize_gguf``, cached in the user cache by content.
    """
    if isinstance(model, (str, os.PathLike)) and Path(model).is_file():
        return Path(model)
    recipe = getattr(ctx, "recipe", None)
    if recipe is not None and (recipe.heal is None or recipe.heal.teacher is None):
        path = source_path(recipe.source, ctx.options)
        if path.is_file():
            return path
    if not isinstance(model, (str, os.PathLike)):
        model = _model_dir_from_ctx(ctx) or getattr(getattr(model, "config", None), "_name_or_path", None)
    if not model or not Path(model).is_dir():
        raise UserError("data source 'teacher' needs the model that writes the text (an HF directory or a GGUF); "
                        "none was given")
    return _exported_teacher(Path(model), ctx, log)


def _model_dir_from_ctx(ctx) -> Any:
    if ctx is None:
        return None
    for key in ("model_dir", "model", "source"):
        value = ctx.inputs.get(key)
        if value is not None:
            return value
    return None


def _exported_teacher(model_dir: Path, ctx, log) -> Path:
    digest = Fingerprints(user_cache() / "fingerprints.json").sha256(model_dir)
    final = user_cache() / "teacher-gguf" / f"{digest[:16]}-Q8_0.gguf"
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    log(f"exporting the teacher {model_dir} to GGUF (Q8_0) for llama.cpp, cached in {final.parent}")
    options = ctx.options if ctx is not None else RunOptions()
    recipe = validate({"recipe_version": 1, "name": "teacher", "source": {"model": str(model_dir)}}, "teacher")
    with tempfile.TemporaryDirectory(dir=final.parent) as scratch:
        stage = StageContext(stage="teacher-gguf", recipe=recipe, run_dir=Path(scratch), out_dir=Path(scratch),
                             options=options, section="teacher_gguf")
        base = call_first("export_gguf", ctx=stage, model_dir=model_dir, outtype="F16")
        quantized = call_first("quantize_gguf", ctx=stage, gguf_path=Path(base), quant="Q8_0")
        with atomic_path(final) as tmp:
            shutil.move(str(quantized), tmp)
    return final


def _sampling(spec: TextSource):
    from ollama_compress.teacher_chat import Sampling

    return Sampling(temperature=spec.temperature, top_p=spec.top_p, max_new_tokens=spec.max_new_tokens,
                    seed=spec.seed)


def teacher_chat_file(spec: TextSource, gguf: Path, tokenizer, tokens: int, cache_dir=None) -> Path:
    """Where the text of these settings is cached: the user cache, named by a hash of everything
    the text depends on (the teacher GGUF's sha256, prompts and chat template or ``write: text``,
    sampling, size)."""
    sha = Fingerprints(user_cache() / "fingerprints.json").sha256(gguf)
    writes = (teacher_prompts(spec), tokenizer.chat_template) if spec.write == "chat" else ("text from the start token",)
    key = settings_hash(TEACHER_CHAT_VERSION, sha, *writes, vars(_sampling(spec)), tokens)
    return Path(cache_dir or user_cache() / "teacher-chat") / f"{key[:24]}.jsonl"


def generate_teacher_chat(spec: TextSource, gguf: Path, tokenizer, tokens: int, batch: int | None = None,
                          chat=None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Conversations (``write: text``: texts) written by the teacher until they hold ``tokens`` tokens,
    and the figures.

    Conversation ``i`` answers prompt ``i mod len(prompts)`` (sampled with its own seed, so a
    prompt used again gets another reply); each is ``{category, prompt, reply, tokens}``, where
    ``tokens`` counts the whole rendered conversation as the heal tokenizes it. Text ``i`` starts
    from the start token with its own seed; its record has category ``text`` and an empty prompt.
    """
    from ollama_compress import teacher_chat

    prompts = teacher_prompts(spec) if spec.write == "chat" else [("text", "")]
    sampling = _sampling(spec)

    def prompt(i: int) -> str | list[int]:
        if i >= len(prompts) and sampling.temperature == 0:
            raise UserError(f"data source 'teacher': {tokens} tokens need more than {len(prompts)} greedy "
                            "replies, which would repeat; give more prompts, fewer tokens or a temperature above 0")
        return prompt_text(tokenizer, prompts[i % len(prompts)][1]) if spec.write == "chat" else [engine.start_token()]

    records: list[dict[str, Any]] = []

    def enough(replies: list[list[int]]) -> bool:
        for i in range(len(records), len(replies)):
            category, asked = prompts[i % len(prompts)]
            reply = engine.detokenize(replies[i]).strip()
            count = len(tokenizer(heal_text(tokenizer, spec, asked, reply), add_special_tokens=False)["input_ids"])
            records.append({"category": category, "prompt": asked, "reply": reply, "tokens": count,
                            "new_tokens": len(replies[i])})
        return sum(r["tokens"] for r in records) >= tokens

    longest = 1 if spec.write == "text" else max(
        len(tokenizer(prompt_text(tokenizer, p), add_special_tokens=False)["input_ids"]) for _, p in prompts)
    started = time.perf_counter()
    engine = chat or teacher_chat.LlamaChat(gguf, batch or teacher_chat.DEFAULT_BATCH,
                                            longest + 16 + sampling.max_new_tokens)
    try:
        teacher_chat.generate_replies(engine, prompt, sampling, enough)
        decode_calls = engine.decode_calls
    finally:
        if chat is None:
            engine.close()
    seconds = time.perf_counter() - started
    new = sum(r["new_tokens"] for r in records)
    figures = {"conversations": len(records), "tokens": sum(r["tokens"] for r in records), "new_tokens": new,
               "seconds": round(seconds, 1), "new_tokens_per_s": round(new / max(seconds, 1e-9), 1),
               "batch": engine.batch_size, "threads": engine.threads, "decode_calls": decode_calls}
    return records, figures


def heal_text(tokenizer, spec: TextSource, prompt: str, reply: str) -> str:
    """A record of the teacher's as the heal reads it: the conversation in the chat template, or the text."""
    return conversation_text(tokenizer, prompt, reply) if spec.write == "chat" else reply


def teacher_texts(spec: TextSource, tokenizer=None, ctx=None, model=None, cache_dir=None, tokens: int | None = None,
                  log=None) -> list[str]:
    """Conversations the teacher writes with llama.cpp from the prompt set, chat-formatted (``write:
    text``: text it writes from its start token alone); cached.

    ``tokens``: how much to write (default: ``spec.tokens``, else derived from the recipe's heal, else
    ``samples x seq_len``); 0 writes nothing. ``model`` is a GGUF, an HF directory or a loaded model
    (without it, ``ctx.inputs`` names one).
    """
    log = log or (ctx.log if ctx is not None else (lambda message: None))
    tokenizer = _teacher_tokenizer(tokenizer, spec)
    what = "teacher chat" if spec.write == "chat" else "teacher text"
    tokens = tokens if tokens is not None else _chat_token_target(spec, tokenizer, ctx)
    if tokens == 0:
        return []
    gguf = teacher_gguf(model if model is not None else _model_dir_from_ctx(ctx), ctx, log)
    cache_file = teacher_chat_file(spec, gguf, tokenizer, tokens, cache_dir)
    if cache_file.is_file():
        records = [json.loads(line) for line in cache_file.read_text(encoding="utf-8").splitlines() if line]
        log(f"{what}: reusing {len(records)} samples ({sum(r['tokens'] for r in records)} tokens) from {cache_file}")
    else:
        log(f"{what}: writing {tokens} tokens with llama.cpp from {gguf.name}")
        records, figures = generate_teacher_chat(spec, gguf, tokenizer, tokens)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp:
            tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
        log(f"{what}: {figures['conversations']} samples, {figures['tokens']} tokens in "
            f"{figures['seconds']:.0f} s ({figures['new_tokens_per_s']:.0f} generated tokens/s, "
            f"{figures['batch']} at once, {figures['threads']} threads); cached in {cache_file}")
    return [heal_text(tokenizer, spec, r["prompt"], r["reply"]) for r in records]


@hookimpl
def register_data_sources(register) -> None:
    register("default", default_texts, "mixed original text that ships with ollama-compress")
    register("text", text_file_texts, "a plain UTF-8 text file (path)")
    register("jsonl", jsonl_texts, "JSON lines with a 'text' or chat 'messages' field (path)")
    register("hf", hf_texts, "a Hugging Face dataset by name (dataset, split); needs 'datasets' and a network")
    register("teacher", teacher_texts, "chat the teacher writes with llama.cpp from a prompt set (prompts or path), "
                                       "or text from nothing (write: text); cached")


# ---------------------------------------------------------------- public API
def load_texts(spec: TextSource, tokenizer=None, ctx=None, model=None, cache_dir=None, tokens: int | None = None,
               log=None) -> list[str]:
    """Texts of a recipe data entry, from the registered source of kind ``spec.from_``.

    ``model`` (a model, HF directory or GGUF), ``cache_dir``, ``tokens`` (how much to write) and
    ``log`` are passed to sources that accept them (``teacher``). A `teacher` source that has
    nothing to write (the heal's other sources suffice) gives no texts.
    """
    try:
        fn = capability("data_sources", spec.from_).fn
    except NotAvailable as exc:
        raise UserError(str(exc)) from None
    params = inspect.signature(fn).parameters
    extra = {k: v for k, v in (("model", model), ("cache_dir", cache_dir), ("tokens", tokens), ("log", log))
             if k in params and v is not None}
    texts = fn(spec, tokenizer, ctx, **extra)
    if not texts and spec.from_ == "teacher":
        return []
    return _nonempty(texts, f"data source '{spec.from_}'")


def token_stream(texts: list[str], tokenizer) -> list[int]:
    """All texts tokenized (no special tokens added) and joined with the EOS token."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        if ids and eos is not None:
            ids.append(eos)
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
    return ids


def chunk_stream(ids: list[int], samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """``samples`` windows of ``seq_len`` tokens from ``ids``, chosen by ``seed``.

    Non-overlapping windows when the stream is long enough; otherwise every non-overlapping window
    plus windows at seeded random offsets (which overlap) to make up the number.
    """
    import torch

    if len(ids) < seq_len:
        raise UserError(f"the calibration text has only {len(ids)} tokens, fewer than seq_len={seq_len}; "
                        "give more text or a smaller seq_len")
    gen = torch.Generator().manual_seed(seed)
    whole = len(ids) // seq_len
    if whole >= samples:
        starts = [int(i) * seq_len for i in torch.randperm(whole, generator=gen)[:samples]]
    else:
        extra = torch.randint(0, len(ids) - seq_len + 1, (samples - whole,), generator=gen)
        starts = [i * seq_len for i in range(whole)] + [int(s) for s in extra]
    return [ids[s:s + seq_len] for s in starts]


def bos_prefix(tokenizer) -> list[int]:
    """The special tokens the tokenizer puts before a text (BOS for most models, none for some)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return list(full[:start])
    return []


def text_windows(texts: list[str], tokenizer, samples: int, seq_len: int, seed: int) -> list[list[int]]:
    """The one rule for held-out windows: ``texts`` joined by ``token_stream``, ``samples`` windows
    of ``seq_len`` tokens cut by ``chunk_stream``, each with the tokenizer's BOS prefix in front."""
    prefix = bos_prefix(tokenizer)
    return [prefix + window for window in chunk_stream(token_stream(texts, tokenizer), samples, seq_len, seed)]


def heldout_windows(spec: TextSource, tokenizer, ctx=None, model=None) -> list[list[int]]:
    """``spec`` (``data.heldout``) as token windows: heal's before/after, evaluate and the quant
    table all measure on these."""
    return text_windows(load_texts(spec, tokenizer, ctx, model), tokenizer, spec.samples, spec.seq_len, spec.seed)


HELDOUT_SPAN = 32  # tokens per hashed span in the held-out overlap check


def _span_hashes(ids: list[int], step: int) -> set[bytes]:
    import numpy as np

    array = np.asarray(ids, dtype=np.int64)
    return {hashlib.blake2b(array[i:i + HELDOUT_SPAN].tobytes(), digest_size=12).digest()
            for i in range(0, len(array) - HELDOUT_SPAN + 1, step)}


def heal_source_key(data: Any, index: int) -> str:
    """The recipe key of ``data.heal``'s source ``index``: ``data.heal[i]`` for a list, else ``data.heal``."""
    return f"data.heal[{index}]" if isinstance(data.heal, list) else "data.heal"


def training_streams(data: Any, tokenizer, ctx=None, model=None, heal: bool = True) -> dict[str, list[list[int]]]:
    """Token windows each stage calibrates or trains on, by recipe key: ``data.calibration``'s
    windows and (``heal``) each ``data.heal`` source's whole stream."""
    batches = calibration_batches(data.calibration, tokenizer, ctx=ctx, model=model)
    streams = {"data.calibration": [row for batch in batches for row in batch.tolist()]}
    if heal:
        for i, spec in enumerate(data.heal_sources()):
            streams[heal_source_key(data, i)] = [token_stream(load_texts(spec, tokenizer, ctx, model=model), tokenizer)]
    return streams


def check_heldout_unseen(heldout: list[list[int]], streams: dict[str, list[list[int]]], skip: int = 0) -> None:
    """UserError when any ``HELDOUT_SPAN``-token span of the held-out windows (after ``skip`` prefix
    tokens) also occurs in one of ``streams``: by hash, whatever the window offsets."""
    held = set().union(*(_span_hashes(w[skip:], HELDOUT_SPAN) for w in heldout))
    for key, windows in streams.items():
        seen = set().union(*(_span_hashes(w, 1) for w in windows))
        shared = held & seen
        if shared:
            raise UserError(f"data.heldout shares text with {key} ({len(shared)} of {len(held)} held-out "
                            f"{HELDOUT_SPAN}-token spans occur in it); held-out text must be text no stage "
                            "calibrated or trained on: choose another data.heldout source")


def unseen_heldout_windows(data: Any, tokenizer, ctx=None, model=None, heal: bool = True) -> list[list[int]]:
    """``heldout_windows(data.heldout)`` after checking that no stage calibrates or (``heal``) trains
    on them (``check_heldout_unseen``): heal runs it before training, evaluate before measuring."""
    windows = heldout_windows(data.heldout, tokenizer, ctx, model)
    check_heldout_unseen(windows, training_streams(data, tokenizer, ctx, model, heal), skip=len(bos_prefix(tokenizer)))
    return windows


def calibration_batches(spec: TextSource, tokenizer, ctx=None, model=None, batch_size: int = 1,
                        cache_dir=None) -> list:
    """``spec.samples`` sequences of ``spec.seq_len`` token ids as LongTensors ``[batch_size, seq_len]``.

    Deterministic for a given source, tokenizer and ``spec.seed``.
    """
    import torch

    texts = load_texts(spec, tokenizer, ctx, model, cache_dir)
    windows = chunk_stream(token_stream(texts, tokenizer), spec.samples, spec.seq_len, spec.seed)
    rows = torch.tensor(windows, dtype=torch.long)
    return list(rows.split(max(1, batch_size)))


def batches_provider(spec: TextSource, tokenizer, ctx=None) -> Callable[[Any], list]:
    """``fn(model) -> batches`` for ``spec``.

    Sources that need no model (files, the shipped corpus) are read and tokenized right away, so
    bad data fails before any weights load; ``teacher`` text is generated with the model.
    """
    if spec.from_ == "teacher":
        return lambda model: calibration_batches(spec, tokenizer, ctx=ctx, model=model)
    batches = calibration_batches(spec, tokenizer, ctx=ctx)
    return lambda model: batches
