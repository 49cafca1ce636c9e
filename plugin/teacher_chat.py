"""Teacher-written chat: many replies decoded at once with llama.cpp (llama-cpp-python's C API).

``generate`` keeps ``batch`` sequences in flight: every step is one ``llama_decode`` over a batch
that holds the next token of each running reply and the whole prompt of each reply that starts
(continuous batching: a finished reply's slot takes the next prompt at once). Sampling happens here
with numpy, temperature then top-p, from a generator seeded per reply (``seed``, reply index), so
a reply does not depend on the batch size or on which slot it ran in. ``temperature: 0`` is greedy.
"""
from __future__ import annotations

import ctypes
import logging
import os
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from .errors import StageFailed, UserError

DEFAULT_BATCH = 16  # replies decoded at once; bench/heal_data.py measures the choice


def default_threads() -> int:
    """Every core, unless the machine is already oversubscribed (1-minute load average above the core
    count), then one.

    llama.cpp's threads wait for each other at every step; on an oversubscribed CPU a thread that is
    not scheduled stalls the rest (measured on 2 cores at load 16: 2 threads ran 9x slower than 1).
    The load average counts this process's own earlier stages too, so a load up to the core count
    still means the cores are ours.
    """
    cores = os.cpu_count() or 1
    try:
        load = os.getloadavg()[0]
    except OSError:
        load = 0.0
    return cores if load <= cores else 1


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.7  # 0: greedy
    top_p: float = 0.9
    max_new_tokens: int = 256
    seed: int = 0


def sample_token(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> int:
    """One token id from ``logits``: argmax when greedy, else temperature then top-p (nucleus)."""
    if sampling.temperature <= 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / sampling.temperature
    probs = np.exp(scaled - scaled.max())
    probs /= probs.sum()
    order = _most_likely_first(probs, sampling.top_p)
    cumulative = np.cumsum(probs[order])
    keep = order[: int(np.searchsorted(cumulative, sampling.top_p)) + 1]
    kept = probs[keep] / probs[keep].sum()
    return int(keep[rng.choice(len(keep), p=kept)])


def _most_likely_first(probs: np.ndarray, top_p: float, shortlist: int = 512) -> np.ndarray:
    """Token ids by falling probability (ties by id), far enough to cover ``top_p``: the shortlist of
    the most likely ids when it does (the common case; a full sort of the vocabulary per token cost
    as much as the decoding), else the whole vocabulary. The nucleus is the same either way."""
    if len(probs) > shortlist:
        candidates = np.sort(np.argpartition(-probs, shortlist)[:shortlist])
        order = candidates[np.argsort(-probs[candidates], kind="stable")]
        cumulative = np.cumsum(probs[order])
        last = int(np.searchsorted(cumulative, top_p))  # the nucleus ends here
        if last < shortlist and probs[order[last]] > probs[order[-1]]:  # so no id outside ties with it
            return order
    return np.argsort(-probs, kind="stable")


@dataclass
class _Slot:
    index: int
    prompt_len: int
    rng: np.random.Generator
    reply: list[int]
    next_token: int | None = None


class LlamaChat:
    """A llama.cpp model and context for ``batch`` parallel sequences of up to ``seq_tokens`` each.

    ``decode_calls`` counts ``llama_decode`` calls (one per step).
    """

    def __init__(self, gguf: str | os.PathLike, batch: int, seq_tokens: int, threads: int | None = None):
        llama_cpp = _llama_cpp()
        self.lib = llama_cpp
        self.batch_size = max(1, batch)
        self.seq_tokens = seq_tokens
        self.decode_calls = 0
        model_params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(gguf).encode(), model_params)
        if not self.model:
            raise StageFailed(f"llama.cpp could not load {gguf}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.capacity = self.batch_size * seq_tokens  # the most tokens one step can hold (every slot starting)
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = self.batch_size * -(-seq_tokens // 256) * 256  # llama.cpp pads each sequence's cells
        params.n_batch = self.capacity
        params.n_ubatch = min(512, self.capacity)
        params.n_seq_max = self.batch_size
        params.kv_unified = False  # each reply attends to its own cells only
        self.threads = threads or default_threads()
        params.n_threads = params.n_threads_batch = self.threads
        self.ctx = llama_cpp.llama_init_from_model(self.model, params)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise StageFailed(f"llama.cpp could not make a context of {self.capacity} tokens for {gguf}")
        self.memory = llama_cpp.llama_get_memory(self.ctx)
        self.batch = llama_cpp.llama_batch_init(self.capacity, 0, 1)

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.lib.llama_model_free(self.model)
            self.ctx = None

    def __enter__(self) -> "LlamaChat":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------ text <-> tokens
    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` with special tokens (chat markers) parsed, none added."""
        raw = text.encode("utf-8")
        size = len(raw) + 8
        buf = (self.lib.llama_token * size)()
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, size, False, True)
        if n < 0:
            raise StageFailed(f"llama.cpp could not tokenize a prompt of {len(raw)} bytes")
        return list(buf[:n])

    def detokenize(self, tokens: Iterable[int]) -> str:
        pieces = bytearray()
        buf = ctypes.create_string_buffer(256)
        for token in tokens:
            n = self.lib.llama_token_to_piece(self.vocab, token, buf, len(buf), 0, False)
            pieces.extend(buf.raw[:max(0, n)])
        return pieces.decode("utf-8", errors="replace")

    def start_token(self) -> int:
        """The token text starts from: the model's BOS, else its EOS (which then separates texts)."""
        bos = self.lib.llama_vocab_bos(self.vocab)
        return bos if bos >= 0 else self.lib.llama_vocab_eos(self.vocab)

    def is_end(self, token: int) -> bool:
        return bool(self.lib.llama_vocab_is_eog(self.vocab, token))

    # ------------------------------------------------------------ decoding
    def _add(self, token: int, pos: int, seq: int, logits: bool) -> None:
        b, i = self.batch, self.batch.n_tokens
        b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, pos, 1, logits
        b.seq_id[i][0] = seq
        b.n_tokens = i + 1

    def _logits(self, i: int) -> np.ndarray:
        pointer = self.lib.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def generate(self, prompts: Iterable[tuple[int, list[int]]], sampling: Sampling) -> Iterator[tuple[int, list[int]]]:
        """``(index, reply tokens)`` for each ``(index, prompt tokens)``, in the order replies end.

        A reply ends at an end-of-generation token (not included) or after ``max_new_tokens``.
        """
        jobs = iter(prompts)
        slots: list[_Slot | None] = [None] * self.batch_size
        exhausted = False
        while True:
            self.batch.n_tokens = 0
            asked: list[tuple[int, int]] = []  # (slot, batch row whose logits it samples from)
            for s, slot in enumerate(slots):
                if slot is None and not exhausted:
                    job = next(jobs, None)
                    if job is None:
                        exhausted = True
                    else:
                        slot = slots[s] = self._start(s, job, sampling)
                        asked.append((s, self.batch.n_tokens - 1))
                        continue
                if slot is not None and slot.next_token is not None:
                    self._add(slot.next_token, slot.prompt_len + len(slot.reply) - 1, s, True)
                    asked.append((s, self.batch.n_tokens - 1))
            if not asked:
                return
            status = self.lib.llama_decode(self.ctx, self.batch)
            self.decode_calls += 1
            if status != 0:
                raise StageFailed(f"llama.cpp decode failed (status {status}) with {len(asked)} sequences")
            for s, row in asked:
                slot = slots[s]
                token = sample_token(self._logits(row), sampling, slot.rng)
                if not self.is_end(token):
                    slot.reply.append(token)
                if self.is_end(token) or len(slot.reply) >= sampling.max_new_tokens:
                    slots[s] = None
                    yield slot.index, slot.reply
                else:
                    slot.next_token = token

    def _start(self, s: int, job: tuple[int, list[int]], sampling: Sampling) -> _Slot:
        index, tokens = job
        if not tokens or len(tokens) + sampling.max_new_tokens > self.seq_tokens:
            raise UserError(f"prompt {index} has {len(tokens)} tokens; with max_new_tokens={sampling.max_new_tokens} "
                            f"it needs more than {self.seq_tokens}; use a shorter prompt")
        self.lib.llama_memory_seq_rm(self.memory, s, -1, -1)
        for pos, token in enumerate(tokens):
            self._add(token, pos, s, pos == len(tokens) - 1)
        return _Slot(index, len(tokens), np.random.default_rng([sampling.seed, index]), [])


def _llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise UserError("teacher-written chat needs llama-cpp-python: pip install llama-cpp-python "
                        "(or bash .ci/setup)") from None
    import llama_cpp._logger  # noqa: F401  (routes llama.cpp's messages through this logger)

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load chatter
    llama_cpp.llama_backend_init()
    return llama_cpp


def generate_replies(chat: LlamaChat, texts: Callable[[int], str | list[int]], sampling: Sampling,
                     enough: Callable[[list[list[int]]], bool]) -> list[list[int]]:
    """Replies 0, 1, 2... to the prompts ``texts(i)`` (rendered text, or token ids) until ``enough(replies
    so far, in order)``.

    The result is the shortest prefix of replies, in index order, that is enough: the same for any
    batch size of ``chat``.
    """
    def jobs() -> Iterator[tuple[int, list[int]]]:
        i = 0
        while True:
            prompt = texts(i)
            yield i, chat.tokenize(prompt) if isinstance(prompt, str) else list(prompt)
            i += 1

    done: dict[int, list[int]] = {}
    ordered: list[list[int]] = []
    stream = chat.generate(jobs(), sampling)
    for index, reply in stream:
        done[index] = reply
        while len(ordered) in done:
            ordered.append(done.pop(len(ordered)))
            if enough(ordered):
                stream.close()
                return ordered
    return ordered
