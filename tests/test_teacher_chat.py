"""Teacher-written heal chat: batched llama.cpp decoding, the prompt set, the cache, the heal's size rule."""
from __future__ import annotations

import json
from importlib import resources

import llama_cpp
import pytest

from helpers import assert_clean_error, cli
from ollama_compress import teacher_chat
from ollama_compress.errors import UserError
from ollama_compress.hooks import data
from ollama_compress.hooks.heal import heal_stream, heal_tokens_needed
from ollama_compress.recipe import Data, Heal, TextSource

PROMPTS = ["Name a fruit.", "Say hello.", "Count to three.", "What is rain?", "Write a word.", "Tell a joke."]


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, smollm2_gguf):
    from gguf_samples import write_tiny_llama_gguf

    return write_tiny_llama_gguf(tmp_path_factory.mktemp("teacher") / "tiny-F16.gguf", smollm2_gguf)


def _spec(**fields) -> TextSource:
    return TextSource.model_validate({"from": "teacher", "max_new_tokens": 12, **fields})


def _replies(gguf, tokenizer, batch: int, count: int, sampling: teacher_chat.Sampling, prompts=PROMPTS):
    with teacher_chat.LlamaChat(gguf, batch, 128) as chat:
        texts = lambda i: data.prompt_text(tokenizer, prompts[i % len(prompts)])  # noqa: E731
        replies = teacher_chat.generate_replies(chat, texts, sampling, lambda done: len(done) >= count)
        return replies, chat.decode_calls


def test_shipped_prompt_set_is_large_diverse_and_distinct():
    lines = resources.files("ollama_compress.data").joinpath(data.PROMPTS_FILE).read_text("utf-8").splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    prompts = [r["prompt"] for r in records]
    assert len(prompts) >= 300 and len(set(prompts)) == len(prompts)
    assert {r["category"] for r in records} == {"everyday", "facts", "how-to", "code", "math", "writing"}
    assert data.teacher_prompts(TextSource.model_validate({"from": "teacher"}))[0] == (records[0]["category"], prompts[0])


def test_batched_generation_returns_the_count_and_is_deterministic(tiny_gguf, smollm2_tokenizer):
    sampling = teacher_chat.Sampling(temperature=0.9, top_p=0.9, max_new_tokens=10, seed=3)
    first, calls = _replies(tiny_gguf, smollm2_tokenizer, 4, 7, sampling)
    again, _ = _replies(tiny_gguf, smollm2_tokenizer, 4, 7, sampling)
    other, _ = _replies(tiny_gguf, smollm2_tokenizer, 4, 7, teacher_chat.Sampling(0.9, 0.9, 10, seed=4))
    assert len(first) == 7 and all(first)
    assert again == first and other != first
    assert calls < sum(len(r) for r in first)  # several replies per llama_decode call


def test_greedy_batched_equals_unbatched(tiny_gguf, smollm2_tokenizer):
    greedy = teacher_chat.Sampling(temperature=0, max_new_tokens=12)
    batched, batched_calls = _replies(tiny_gguf, smollm2_tokenizer, 4, 6, greedy)
    alone, alone_calls = _replies(tiny_gguf, smollm2_tokenizer, 1, 6, greedy)
    assert batched == alone
    assert batched_calls < alone_calls


def test_sampling_is_top_p_of_the_tempered_distribution():
    import numpy as np

    logits = np.array([5.0, 4.0, -10.0, -10.0], dtype=np.float32)
    rng = np.random.default_rng(0)
    picks = {teacher_chat.sample_token(logits, teacher_chat.Sampling(1.0, 0.5), rng) for _ in range(50)}
    assert picks == {0}  # token 0 alone holds more than half the mass
    picks = {teacher_chat.sample_token(logits, teacher_chat.Sampling(1.0, 0.99), rng) for _ in range(200)}
    assert picks == {0, 1}
    assert teacher_chat.sample_token(logits[::-1].copy(), teacher_chat.Sampling(0), rng) == 3


@pytest.mark.parametrize("ties", [False, True])
def test_the_shortlisted_nucleus_is_the_full_sorts_nucleus(ties):
    import numpy as np

    rng = np.random.default_rng(1)
    for spread in (0.1, 1.0, 4.0, 12.0):
        logits = rng.normal(size=49152) * spread
        if ties:
            logits = np.round(logits, 1)
        probs = np.exp(logits - logits.max())
        probs /= probs.sum()
        for top_p in (0.3, 0.9, 0.999, 1.0):
            full = np.argsort(-probs, kind="stable")
            fast = teacher_chat._most_likely_first(probs, top_p)
            end = int(np.searchsorted(np.cumsum(probs[full]), top_p)) + 1
            assert list(fast[:end]) == list(full[:end])
            assert int(np.searchsorted(np.cumsum(probs[fast]), top_p)) + 1 == end


def test_the_cache_is_reused_without_decoding(tiny_gguf, smollm2_tokenizer, tmp_path, monkeypatch):
    calls = []
    decode = llama_cpp.llama_decode
    monkeypatch.setattr(llama_cpp, "llama_decode", lambda ctx, batch: calls.append(1) or decode(ctx, batch))
    spec, lines = _spec(prompts=PROMPTS), []
    texts = data.load_texts(spec, smollm2_tokenizer, model=tiny_gguf, cache_dir=tmp_path, tokens=300, log=lines.append)
    (cached,) = tmp_path.glob("*.jsonl")
    stamp, generated = cached.stat().st_mtime_ns, len(calls)
    assert generated > 0 and sum(len(smollm2_tokenizer(t)["input_ids"]) for t in texts) >= 300
    again = data.load_texts(spec, smollm2_tokenizer, model=tiny_gguf, cache_dir=tmp_path, tokens=300,
                            log=lines.append)
    assert again == texts and len(calls) == generated and cached.stat().st_mtime_ns == stamp
    assert "reusing" in lines[-1]
    for prompt, text in zip(PROMPTS, texts):  # the whole conversation in the chat template
        assert text.startswith(data.prompt_text(smollm2_tokenizer, prompt))
    other = data.load_texts(_spec(prompts=PROMPTS, temperature=0.5), smollm2_tokenizer, model=tiny_gguf,
                            cache_dir=tmp_path, tokens=300)
    assert len(list(tmp_path.glob("*.jsonl"))) == 2 and other != texts  # settings are in the key


def test_few_prompts_cycle_with_new_replies(tiny_gguf, smollm2_tokenizer):
    spec = _spec(prompts=PROMPTS[:2], temperature=1.0)
    records, figures = data.generate_teacher_chat(spec, tiny_gguf, smollm2_tokenizer, tokens=400, batch=3)
    again, _ = data.generate_teacher_chat(spec, tiny_gguf, smollm2_tokenizer, tokens=400, batch=1)
    assert figures["conversations"] == len(records) > 2
    assert [r["prompt"] for r in records] == [PROMPTS[i % 2] for i in range(len(records))]
    assert records[0]["reply"] != records[2]["reply"]  # the same prompt, another seed
    assert [r["prompt"] for r in again] == [r["prompt"] for r in records]
    with pytest.raises(UserError, match="greedy replies"):
        data.generate_teacher_chat(_spec(prompts=PROMPTS[:2], temperature=0), tiny_gguf, smollm2_tokenizer,
                                   tokens=400)


def test_text_from_nothing_has_no_prompt_or_template_and_its_own_cache(tiny_gguf, smollm2_tokenizer, tmp_path):
    spec = _spec(write="text", temperature=1.0, top_p=0.95, max_new_tokens=24)
    records, figures = data.generate_teacher_chat(spec, tiny_gguf, smollm2_tokenizer, tokens=300)
    assert {(r["category"], r["prompt"]) for r in records} == {("text", "")} and figures["tokens"] >= 300
    assert len({r["reply"] for r in records}) == len(records) > 1  # each sample has its own seed
    texts = data.load_texts(spec, smollm2_tokenizer, model=tiny_gguf, cache_dir=tmp_path, tokens=300)
    assert texts == [r["reply"] for r in records]
    assert not any("<|im_start|>" in t or "<|im_end|>" in t for t in texts)
    chat = data.load_texts(_spec(temperature=1.0, top_p=0.95, max_new_tokens=24, prompts=PROMPTS), smollm2_tokenizer,
                           model=tiny_gguf, cache_dir=tmp_path, tokens=300)
    assert chat[0].startswith(data.prompt_text(smollm2_tokenizer, PROMPTS[0]))
    assert len(list(tmp_path.glob("*.jsonl"))) == 2  # chat and text are cached apart
    with pytest.raises(UserError, match="greedy replies"):
        data.generate_teacher_chat(_spec(write="text", temperature=0), tiny_gguf, smollm2_tokenizer, tokens=300)


def test_the_default_heal_data_splits_the_teacher_text_evenly_between_chat_and_free_text(smollm2_tokenizer):
    defaults = Data()
    chat, free = [s for s in defaults.heal_sources() if s.from_ == "teacher"]
    assert (chat.write, free.write) == ("chat", "text") and (free.temperature, free.top_p) == (1.0, 0.95)
    heal = Heal(steps=100, batch_size=4, seq_len=256)
    sizes = [data.heal_chat_tokens(s, defaults, heal, smollm2_tokenizer) for s in (chat, free)]
    corpus = len(data.token_stream(data.load_texts(defaults.heal_sources()[0]), smollm2_tokenizer))
    assert sizes[0] == sizes[1] > 0
    assert corpus + sum(sizes) >= heal_tokens_needed(heal) / data.MAX_WINDOW_VIEWS > corpus + sizes[0]


def test_heal_chat_keeps_each_window_seen_at_most_twice(tiny_gguf, smollm2_tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_COMPRESS_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A short heal corpus about rivers and rain. " * 6)
    mix = Data.model_validate({"heal": [{"from": "text", "path": str(corpus)},
                                        {"from": "teacher", "prompts": PROMPTS, "max_new_tokens": 16}]})
    corpus_tokens = len(data.token_stream(data.load_texts(mix.heal_sources()[0]), smollm2_tokenizer))
    sizes = {}
    for steps in (1, 20, 40):
        heal = Heal(steps=steps, batch_size=2, seq_len=32)
        stream = heal_stream(mix, smollm2_tokenizer, tiny_gguf, None, heal, [], lambda message: None)
        sizes[steps] = len(stream)
        assert data.window_views(heal_tokens_needed(heal), len(stream)) <= data.MAX_WINDOW_VIEWS
    assert sizes[1] <= corpus_tokens + 1  # the corpus suffices: no chat written
    assert corpus_tokens < sizes[20] < sizes[40]


def test_a_minutes_budget_writes_the_chat_its_timed_steps_need(tiny_model_dir, smollm2_tokenizer, tmp_path,
                                                              monkeypatch):
    from ollama_compress.hooks.heal import budget_tokens_planned, heal_model

    monkeypatch.setenv("OLLAMA_COMPRESS_CACHE", str(tmp_path / "cache"))
    student, teacher = tiny_model_dir("llama", 2), tiny_model_dir("llama", 2, seed=1)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("A short heal corpus about rivers and rain. " * 12)
    mix = Data.model_validate({"heldout": {"from": "default", "split": "heldout", "samples": 2, "seq_len": 32},
                               "heal": [{"from": "text", "path": str(corpus)},
                                        {"from": "teacher", "prompts": PROMPTS, "max_new_tokens": 16}]})
    corpus_tokens = len(data.token_stream(data.load_texts(mix.heal_sources()[0]), smollm2_tokenizer))
    settings = Heal(budget={"minutes": 0.02}, batch_size=2, seq_len=32, dtype="float32", checkpoint_every=0,
                    patience=0, loss={"kl": 1.0})
    lines: list[str] = []
    result = heal_model(student, teacher, tmp_path / "healed", settings, mix, log=lines.append)
    # the first steps set the step count; then the chat is written for exactly those steps
    assert result["steps"] > 2 and result["planned_tokens"] == budget_tokens_planned(result["steps"], settings)
    assert result["heal_tokens"] >= result["planned_tokens"] / data.MAX_WINDOW_VIEWS > corpus_tokens
    assert result["window_views"] <= data.MAX_WINDOW_VIEWS
    assert any(f"({result['steps']} steps fit in the budget)" in line for line in lines)


@pytest.mark.parametrize("setting, words", [
    ("{from: teacher, temperature: -1}", "temperature"),
    ("{from: teacher, top_p: 0}", "top_p"),
    ("{from: teacher, tokens: 0}", "tokens"),
])
def test_bad_teacher_settings_are_one_line(setting, words, tmp_path):
    assert TextSource.model_validate({"from": "teacher", "temperature": 0.5, "top_p": 0.5, "tokens": 100}).tokens == 100
    proc = cli("heal", str(tmp_path / "student"), "--teacher", str(tmp_path / "teacher"), "--out", str(tmp_path / "o"),
               "--set", f"data.heal={setting}")
    assert proc.returncode == 2
    assert_clean_error(proc, words)


@pytest.mark.slow
def test_smollm2_writes_chat_in_its_template(smollm2_gguf, smollm2_tokenizer, tmp_path):
    spec = TextSource.model_validate({"from": "teacher", "max_new_tokens": 48})
    texts = data.load_texts(spec, smollm2_tokenizer, model=smollm2_gguf, cache_dir=tmp_path, tokens=600)
    assert texts and all(t.count("<|im_start|>assistant") == 1 and t.rstrip().endswith("<|im_end|>") for t in texts)


def test_heal_records_how_often_each_window_is_seen(tiny_model_dir, smollm2_tokenizer, tmp_path):
    from ollama_compress.hooks.heal import heal_model

    student, teacher = tiny_model_dir("llama", 2), tiny_model_dir("llama", 2, seed=1)
    settings = Heal(steps=2, batch_size=2, seq_len=32, dtype="float32", checkpoint_every=0, loss={"kl": 1.0})
    mix = Data.model_validate({"heldout": {"from": "default", "split": "heldout", "samples": 2, "seq_len": 32},
                               "heal": [{"from": "default"}, {"from": "teacher"}]})
    lines: list[str] = []
    result = heal_model(student, teacher, tmp_path / "healed", settings, mix, log=lines.append)
    corpus = len(data.token_stream(data.default_texts(mix.heal_sources()[0]), smollm2_tokenizer))
    assert result["heal_tokens"] == corpus  # the corpus alone suffices: the teacher wrote nothing
    assert result["window_views"] == round(2 * 2 * 32 / corpus, 2)
    assert any("each window is seen" in line for line in lines)
