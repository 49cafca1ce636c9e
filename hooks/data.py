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
* ``teacher``: text the model itself generates (greedy, so reproducible) from seed prompts
  (``prompts``, or a built-in set of 36), rendered through its chat template; the token budget
  ``samples x seq_len`` is spread over the prompts (16 to 256 new tokens per reply). This is the model-generated
  alternative to the shipped corpus: the text matches what the model actually produces. It is
  generated once and cached (in the run directory, or a given cache directory).

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
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from ollama_compress.errors import UserError
from ollama_compress.fsutil import atomic_path, settings_hash
from ollama_compress.hookspecs import hookimpl
from ollama_compress.recipe import TextSource

DEFAULT_FILES = {"calibration": "calibration.txt", "heldout": "heldout.txt"}

# Seed prompts for `teacher`: varied tasks so the generated text covers what a chat model is used for.
TEACHER_PROMPTS = (
    "Explain how a refrigerator keeps food cold, in simple terms.",
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "What are the main differences between a list and a tuple in Python? Give examples.",
    "Give me five tips for staying focused while studying.",
    "Summarize the water cycle in one paragraph.",
    "Write a polite email asking a colleague to review a document by Friday.",
    "How do vaccines train the immune system?",
    "Write a Python function that checks whether a string is a palindrome, and explain it.",
    "What causes the seasons on Earth?",
    "Describe a healthy breakfast and why it is good for you.",
    "Translate 'Where is the train station?' into French, Spanish and German.",
    "Explain what a binary search is and when to use it.",
    "Write a haiku about autumn rain.",
    "What is the difference between weather and climate?",
    "List the planets of the solar system in order from the Sun with one fact about each.",
    "How does compound interest work? Give a numeric example.",
    "Write a JavaScript function that returns the largest number in an array.",
    "What should I pack for a three-day hiking trip?",
    "Explain photosynthesis to a ten-year-old.",
    "Give a short history of the printing press.",
    "What is a good way to apologize to a friend after an argument?",
    "Describe how to make a simple tomato pasta sauce.",
    "Why is the sky blue?",
    "Explain the rules of chess in a few sentences.",
    "What are the pros and cons of working from home?",
    "Write a limerick about a cat who loves to code.",
    "How do I convert Celsius to Fahrenheit? Show the formula and an example.",
    "Explain what an API is, with an everyday analogy.",
    "What are some ways to reduce household energy use?",
    "Describe the plot of a mystery novel you would like to read.",
    "What is the Pythagorean theorem? Solve a small example.",
    "Give advice to someone starting their first job.",
    "Explain how a bill becomes a law in a parliamentary system, briefly.",
    "Write a SQL query that counts orders per customer and explain each part.",
    "What are black holes and how do they form?",
    "Describe a busy market in a small town early in the morning.",
)

TEACHER_MAX_NEW_TOKENS = 256


# ---------------------------------------------------------------- helpers
def read_text_file(path: str | os.PathLike, what: str) -> str:
    """The UTF-8 text of ``path``; a UserError naming ``what`` when it is missing, unreadable or empty."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist; give a path to a text file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {what} file {path}: {exc}") from None
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
    texts = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path} line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{where}: not valid JSON ({exc.msg})") from None
        texts.append(_record_text(record, tokenizer, where))
    return _nonempty(texts, str(path))


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


# ---------------------------------------------------------------- teacher-generated text
def _model_dir_from_ctx(ctx) -> Any:
    if ctx is None:
        return None
    for key in ("model_dir", "model", "source"):
        value = ctx.inputs.get(key)
        if value is not None:
            return value
    return None


def _model_identity(model) -> str:
    """Cheap identity of a model for the cache key: its directory's file names, sizes, mtimes."""
    if isinstance(model, (str, os.PathLike)):
        path = Path(model).resolve()
        files = sorted((p.name, p.stat().st_size, int(p.stat().st_mtime)) for p in path.iterdir() if p.is_file())
        return settings_hash(str(path), files)
    weights = [(name, tuple(p.shape), float(p.detach().float().flatten()[:64].sum()))
               for name, p in list(model.named_parameters())[:4]]
    return settings_hash(model.config.to_dict(), weights)


def _teacher_cache_file(spec: TextSource, model, ctx, cache_dir) -> Path:
    if cache_dir is None:
        if ctx is not None:
            cache_dir = Path(ctx.run_dir) / "cache" / "teacher-data"
        else:
            from ollama_compress.embedded import cache_dir as user_cache

            cache_dir = user_cache() / "teacher-data"
    key = settings_hash(_model_identity(model), list(spec.prompts or TEACHER_PROMPTS),
                        spec.samples, spec.seq_len, spec.seed, TEACHER_MAX_NEW_TOKENS)
    return Path(cache_dir) / f"{key[:20]}.jsonl"


def reply_length(token_budget: int, num_prompts: int) -> int:
    """New tokens per reply: the token budget spread over the prompts, within [16, 256]."""
    return min(TEACHER_MAX_NEW_TOKENS, max(16, -(-token_budget // max(1, num_prompts))))


def _generate_replies(model, tokenizer, prompts: list[str], max_new_tokens: int, seed: int) -> list[tuple[str, str]]:
    import torch

    pairs = []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    torch.manual_seed(seed)
    for prompt in prompts:
        ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                            return_tensors="pt", return_dict=True)["input_ids"]
        ids = ids.to(model.device)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                 do_sample=False, repetition_penalty=1.2,
                                 pad_token_id=pad)
        pairs.append((prompt, tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()))
    return pairs


def _loaded_teacher(model, tokenizer, ctx):
    """The model (loaded from its directory if a path) and a tokenizer with a chat template."""
    if isinstance(model, (str, os.PathLike)):
        from ollama_compress import modelio

        options = ctx.options if ctx is not None else None
        tokenizer = tokenizer or modelio.load_tokenizer(model, options)
        device = ctx.device if ctx is not None else "cpu"
        model = modelio.load_model(model, options, dtype="float32", device=device)
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise UserError("data source 'teacher' needs a tokenizer with a chat template")
    return model, tokenizer


def teacher_texts(spec: TextSource, tokenizer=None, ctx=None, model=None, cache_dir=None) -> list[str]:
    """Conversations the model generates from seed prompts, chat-formatted; cached on disk.

    ``model`` is a loaded causal LM or an HF directory; without it the model directory is taken
    from ``ctx.inputs`` (``model_dir``, ``model`` or ``source``).
    """
    model = model if model is not None else _model_dir_from_ctx(ctx)
    if model is None:
        raise UserError("data source 'teacher' needs the model that writes the text; none was given")
    cache_file = _teacher_cache_file(spec, model, ctx, cache_dir)
    if cache_file.is_file():
        pairs = [json.loads(line) for line in cache_file.read_text(encoding="utf-8").splitlines() if line]
    else:
        model, tokenizer = _loaded_teacher(model, tokenizer, ctx)
        prompts = list(spec.prompts or TEACHER_PROMPTS)
        max_new = reply_length(spec.samples * spec.seq_len, len(prompts))
        pairs = _generate_replies(model, tokenizer, prompts, max_new, spec.seed)
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(cache_file) as tmp:
            tmp.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    if tokenizer is None:
        raise UserError("data source 'teacher' needs the model's tokenizer to format the conversations")
    return [tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": reply}], tokenize=False)
            for prompt, reply in pairs]


@hookimpl
def register_data_sources(register) -> None:
    register("default", default_texts, "mixed original text that ships with ollama-compress")
    register("text", text_file_texts, "a plain UTF-8 text file (path)")
    register("jsonl", jsonl_texts, "JSON lines with a 'text' or chat 'messages' field (path)")
    register("hf", hf_texts, "a Hugging Face dataset by name (dataset, split); needs 'datasets' and a network")
    register("teacher", teacher_texts, "text the model generates from seed prompts (prompts), cached")


# ---------------------------------------------------------------- public API
def load_texts(spec: TextSource, tokenizer=None, ctx=None, model=None, cache_dir=None) -> list[str]:
    """Texts of a recipe data entry, from the registered source of kind ``spec.from_``.

    ``model`` (a loaded model or an HF directory) and ``cache_dir`` are passed to sources that
    accept them (``teacher``).
    """
    from ollama_compress.errors import NotAvailable
    from ollama_compress.plugins import capability

    try:
        fn = capability("data_sources", spec.from_).fn
    except NotAvailable as exc:
        raise UserError(str(exc)) from None
    params = inspect.signature(fn).parameters
    extra = {k: v for k, v in (("model", model), ("cache_dir", cache_dir)) if k in params and v is not None}
    return _nonempty(fn(spec, tokenizer, ctx, **extra), f"data source '{spec.from_}'")


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


def training_streams(data: Any, tokenizer, ctx=None, model=None, heal: bool = True) -> dict[str, list[list[int]]]:
    """Token windows each stage calibrates or trains on, by recipe key: ``data.calibration``'s
    windows and (``heal``) each ``data.heal`` source's whole stream."""
    batches = calibration_batches(data.calibration, tokenizer, ctx=ctx, model=model)
    streams = {"data.calibration": [row for batch in batches for row in batch.tolist()]}
    if heal:
        sources = data.heal_sources()
        for i, spec in enumerate(sources):
            key = f"data.heal[{i}]" if isinstance(data.heal, list) else "data.heal"
            streams[key] = [token_stream(load_texts(spec, tokenizer, ctx, model=model), tokenizer)]
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


def text_source_from_options(path: str | os.PathLike | None = None, samples: int | None = None,
                             seq_len: int | None = None, seed: int = 0) -> TextSource:
    """The ``TextSource`` of a command's ``--calibration/--samples/--seq-len/--seed`` options
    (a ``.jsonl`` file is read as JSON lines, anything else as plain text)."""
    from pydantic import ValidationError

    fields: dict[str, Any] = {"seed": seed}
    if path is not None:
        if not Path(path).is_file():
            raise UserError(f"--calibration {path} is not a file; give a .txt or .jsonl file")
        fields.update({"from": "jsonl" if str(path).lower().endswith((".jsonl", ".json")) else "text",
                       "path": str(path)})
    if samples is not None:
        fields["samples"] = samples
    if seq_len is not None:
        fields["seq_len"] = seq_len
    try:
        return TextSource.model_validate(fields)
    except ValidationError as exc:
        first = exc.errors()[0]
        option = "--" + ".".join(str(p) for p in first["loc"]).replace("_", "-")
        raise UserError(f"{option}: {first['msg']}") from None
