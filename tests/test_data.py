"""Calibration data sources (ollama_compress.hooks.data): kinds, token batches and bad input."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from helpers import recipe_dict
from ollama_compress.context import StageContext
from ollama_compress.errors import UserError
from ollama_compress.hooks import data
from ollama_compress.hooks.heal import heal_tokens_needed
from ollama_compress.recipe import TextSource, validate

PROSE = ("The ferry leaves the harbour at seven and crosses the bay in forty minutes. "
         "Gulls follow it, hoping for bread from the passengers on the upper deck. ") * 30


def _spec(**fields) -> TextSource:
    return TextSource.model_validate(fields)


def _write(path, text: str):
    path.write_text(text, encoding="utf-8")
    return str(path)


# ---------------------------------------------------------------- default corpus
def test_default_corpus_ships_two_disjoint_texts(smollm2_tokenizer):
    calibration = data.load_texts(_spec())
    heldout = data.load_texts(_spec(split="heldout"))
    assert len(calibration) == 1 and len(heldout) == 1
    cal_paragraphs = {p.strip() for p in calibration[0].split("\n\n") if p.strip()}
    held_paragraphs = {p.strip() for p in heldout[0].split("\n\n") if p.strip()}
    assert len(cal_paragraphs) > 50 and len(held_paragraphs) > 20
    assert not cal_paragraphs & held_paragraphs
    # Enough tokens for the recipe defaults without reusing text: 32 x 256 and 16 x 256.
    assert len(data.token_stream(calibration, smollm2_tokenizer)) >= 32 * 256
    assert len(data.token_stream(heldout, smollm2_tokenizer)) >= 16 * 256


def test_default_batches_are_deterministic_and_follow_the_seed(smollm2_tokenizer):
    spec = _spec(samples=8, seq_len=64)
    first = data.calibration_batches(spec, smollm2_tokenizer)
    again = data.calibration_batches(spec, smollm2_tokenizer)
    other = data.calibration_batches(_spec(samples=8, seq_len=64, seed=1), smollm2_tokenizer)
    assert len(first) == 8 and all(b.shape == (1, 64) and b.dtype == torch.long for b in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, other))
    # Enough text: windows don't overlap, so no sequence repeats.
    assert len({tuple(b[0].tolist()) for b in first}) == 8


def test_batches_are_windows_of_the_token_stream(smollm2_tokenizer, tmp_path):
    spec = _spec(**{"from": "text", "path": _write(tmp_path / "t.txt", PROSE)}, samples=4, seq_len=32)
    stream = data.token_stream(data.load_texts(spec), smollm2_tokenizer)
    batches = data.calibration_batches(spec, smollm2_tokenizer, batch_size=2)
    assert [b.shape for b in batches] == [(2, 32), (2, 32)]
    for row in torch.cat(batches).tolist():
        starts = [i for i in range(0, len(stream) - 31, 32) if stream[i:i + 32] == row]
        assert starts, "every sequence is an aligned window of the tokenized text"


def test_short_text_fills_up_with_overlapping_windows(smollm2_tokenizer, tmp_path):
    text = "Short text about a cat who sleeps on a warm windowsill all afternoon long."
    spec = _spec(**{"from": "text", "path": _write(tmp_path / "s.txt", text)}, samples=5, seq_len=8)
    stream = data.token_stream(data.load_texts(spec), smollm2_tokenizer)
    assert 8 <= len(stream) < 5 * 8, "the text must be too short for 5 separate windows"
    rows = [b[0].tolist() for b in data.calibration_batches(spec, smollm2_tokenizer)]
    assert len(rows) == 5 and all(len(r) == 8 for r in rows)
    starts = [[i for i in range(len(stream) - 7) if stream[i:i + 8] == row] for row in rows]
    assert all(starts), "every sequence is a window of the tokenized text"
    taken = sorted(s[0] for s in starts)
    assert any(b - a < 8 for a, b in zip(taken, taken[1:])), "some windows overlap"


def test_text_shorter_than_one_sequence_is_a_user_error(smollm2_tokenizer, tmp_path):
    spec = _spec(**{"from": "text", "path": _write(tmp_path / "s.txt", "Too short.")}, seq_len=64)
    with pytest.raises(UserError, match="fewer than seq_len=64"):
        data.calibration_batches(spec, smollm2_tokenizer)


@pytest.mark.parametrize("content", ["", "  \n\n \t\n"])
def test_empty_text_file_is_a_user_error(tmp_path, content):
    spec = _spec(**{"from": "text", "path": _write(tmp_path / "e.txt", content)})
    with pytest.raises(UserError, match="is empty"):
        data.load_texts(spec)


def test_missing_file_and_missing_path_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        data.load_texts(_spec(**{"from": "text", "path": str(tmp_path / "nope.txt")}))
    with pytest.raises(UserError, match="needs 'path'"):
        data.load_texts(_spec(**{"from": "jsonl"}))


def test_unknown_kind_lists_the_known_ones():
    with pytest.raises(UserError, match="known: .*jsonl.*teacher.*text"):
        data.load_texts(_spec(**{"from": "parquet"}))


# ---------------------------------------------------------------- held-out windows and the unseen check
def test_heldout_windows_are_seq_len_windows_after_the_bos_prefix(smollm2_tokenizer, tmp_path):
    spec = _spec(**{"from": "text", "path": _write(tmp_path / "h.txt", PROSE)}, samples=3, seq_len=16)
    prefix = data.bos_prefix(smollm2_tokenizer)
    stream = data.token_stream(data.load_texts(spec), smollm2_tokenizer)
    windows = data.heldout_windows(spec, smollm2_tokenizer)
    assert len(windows) == 3 and all(w[:len(prefix)] == prefix and len(w) == len(prefix) + 16 for w in windows)
    body = [w[len(prefix):] for w in windows]
    assert body == data.chunk_stream(stream, 3, 16, 0)


def test_heldout_text_in_the_heal_data_is_refused(smollm2_tokenizer):
    heldout = data.load_texts(_spec(split="heldout"))
    held = data.heldout_windows(_spec(split="heldout", samples=4, seq_len=64), smollm2_tokenizer)
    skip = len(data.bos_prefix(smollm2_tokenizer))
    leaked = data.token_stream(["some intro", heldout[0]], smollm2_tokenizer)
    with pytest.raises(UserError, match="data.heldout shares text with data.heal"):
        data.check_heldout_unseen(held, {"data.heal": [leaked]}, skip=skip)
    data.check_heldout_unseen(held, {"data.heal": [data.token_stream(data.load_texts(_spec()), smollm2_tokenizer)]},
                              skip=skip)


def test_a_shared_span_is_found_at_any_offset_but_a_shorter_one_is_not():
    held = [[1] + list(range(100, 164))]  # a BOS, then two 32-token spans
    inside = list(range(7)) + list(range(132, 164)) + list(range(7))
    with pytest.raises(UserError, match="1 of 2 held-out 32-token spans"):
        data.check_heldout_unseen(held, {"data.heal": [inside]}, skip=1)
    data.check_heldout_unseen(held, {"data.heal": [list(range(133, 164))]}, skip=1)


def test_the_unseen_check_covers_calibration_and_every_heal_source(smollm2_tokenizer, tmp_path, recipe_file):
    from ollama_compress.recipe import load_recipe

    held = _write(tmp_path / "held.txt", data.load_texts(_spec(split="heldout"))[0][:4000])
    heldout = {"from": "text", "path": held, "samples": 4, "seq_len": 64}
    every_window = {"from": "text", "path": held, "samples": 64, "seq_len": 64}
    cases = {"data.calibration": {"calibration": every_window, "heal": {"from": "default"}},
             "data.heal\\[1\\]": {"heal": [{"from": "default"}, {"from": "text", "path": held}]}}
    for key, fields in cases.items():
        recipe = load_recipe(str(recipe_file(data={"heldout": heldout, **fields})))
        with pytest.raises(UserError, match=f"shares text with {key}"):
            data.unseen_heldout_windows(recipe.data, smollm2_tokenizer)
    recipe = load_recipe(str(recipe_file(data={"heldout": heldout, "heal": {"from": "default"}})))
    assert len(data.unseen_heldout_windows(recipe.data, smollm2_tokenizer)) == 4


# ---------------------------------------------------------------- JSON lines
def test_jsonl_text_and_messages_use_the_model_chat_template(smollm2_tokenizer, tmp_path):
    messages = [{"role": "user", "content": "What is a lighthouse?"},
                {"role": "assistant", "content": "A tower with a bright light that guides ships."}]
    lines = [json.dumps({"text": "Plain text line."}), "", json.dumps({"messages": messages})]
    spec = _spec(**{"from": "jsonl", "path": _write(tmp_path / "d.jsonl", "\n".join(lines))})
    texts = data.load_texts(spec, smollm2_tokenizer)
    assert texts == ["Plain text line.", smollm2_tokenizer.apply_chat_template(messages, tokenize=False)]
    assert "What is a lighthouse?" in texts[1] and texts[1] != messages[0]["content"]


@pytest.mark.parametrize("line, message", [
    (json.dumps({"content": "no text field"}), "line 2: no 'text' or 'messages' field"),
    ("{not json", "line 2: not valid JSON"),
    (json.dumps(["a", "list"]), "line 2: expected a JSON object"),
    (json.dumps({"messages": [{"role": "user"}]}), "line 2: 'messages' must be"),
])
def test_bad_jsonl_lines_are_user_errors_naming_the_line(smollm2_tokenizer, tmp_path, line, message):
    content = json.dumps({"text": "fine"}) + "\n" + line + "\n"
    spec = _spec(**{"from": "jsonl", "path": _write(tmp_path / "bad.jsonl", content)})
    with pytest.raises(UserError, match=message):
        data.load_texts(spec, smollm2_tokenizer)


@pytest.mark.parametrize("line, message", [
    ("{not json", r"p\.jsonl line 3: not valid JSON"),
    (json.dumps({"prompt": [1, 2, 3]}), r"p\.jsonl line 3: expected a JSON object with a 'prompt' string"),
    ("[" * 500 + "]" * 500, r"p\.jsonl line 3 nests deeper"),
])
def test_bad_teacher_prompt_lines_are_user_errors_naming_the_line(tmp_path, line, message):
    content = json.dumps({"prompt": "fine", "category": "c"}) + "\n\n" + line + "\n"
    spec = _spec(**{"from": "teacher", "path": _write(tmp_path / "p.jsonl", content)})
    with pytest.raises(UserError, match=message):
        data.teacher_prompts(spec)
    spec = _spec(**{"from": "teacher", "path": _write(tmp_path / "p.jsonl", content.replace(line, ""))})
    assert data.teacher_prompts(spec) == [("c", "fine")]



# ---------------------------------------------------------------- HF datasets
def test_hf_dataset_unavailable_is_a_user_error():
    import importlib.util

    # Without the optional package it says how to install it; with it, tests never reach a hub.
    installed = importlib.util.find_spec("datasets") is not None
    with pytest.raises(UserError, match="cannot load dataset" if installed else "needs the datasets package"):
        data.load_texts(_spec(**{"from": "hf", "dataset": "no-such-org/no-such-dataset"}))
    with pytest.raises(UserError, match="needs 'dataset'"):
        data.load_texts(_spec(**{"from": "hf"}))


# ---------------------------------------------------------------- teacher
def test_teacher_generates_chat_text_once_and_caches_it(tiny_model_dir, smollm2_tokenizer, tmp_path):
    model_dir = tiny_model_dir("llama")
    prompts = ["Name a fruit.", "Say hello."]
    spec = _spec(**{"from": "teacher", "prompts": prompts, "max_new_tokens": 8}, samples=2, seq_len=24)
    cache = tmp_path / "cache"
    texts = data.load_texts(spec, smollm2_tokenizer, model=model_dir, cache_dir=cache)
    assert len(texts) == 2
    for prompt, text in zip(prompts, texts):
        reply = text.split(prompt, 1)[1]
        assert text.startswith(smollm2_tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False))
        assert len(reply) > 0
    (cached,) = cache.glob("*.jsonl")
    stamp = cached.stat().st_mtime_ns
    again = data.load_texts(spec, smollm2_tokenizer, model=model_dir, cache_dir=cache)
    assert again == texts and cached.stat().st_mtime_ns == stamp  # read back, not regenerated
    batches = data.calibration_batches(spec, smollm2_tokenizer, model=model_dir, cache_dir=cache)
    assert len(batches) == 2 and batches[0].shape == (1, 24)


def test_teacher_takes_the_model_from_the_stage_and_caches_in_the_user_cache(tiny_model_dir, smollm2_tokenizer,
                                                                            tmp_path, monkeypatch):
    monkeypatch.setenv("OLLAMA_COMPRESS_CACHE", str(tmp_path / "user-cache"))
    model_dir = tiny_model_dir("qwen2")
    recipe = validate(recipe_dict(model_dir, "t"))
    ctx = StageContext(stage="importance", recipe=recipe, run_dir=tmp_path, out_dir=tmp_path / "out",
                       inputs={"model_dir": str(model_dir)})
    spec = _spec(**{"from": "teacher", "prompts": ["Count to three."], "max_new_tokens": 8}, samples=1, seq_len=16)
    texts = data.load_texts(spec, smollm2_tokenizer, ctx=ctx)
    assert len(texts) == 1 and "Count to three." in texts[0]
    assert list((tmp_path / "user-cache" / "teacher-chat").glob("*.jsonl"))
    assert list((tmp_path / "user-cache" / "teacher-gguf").glob("*-Q8_0.gguf"))  # exported through the hooks


def test_teacher_without_a_model_is_a_user_error(smollm2_tokenizer):
    with pytest.raises(UserError, match="needs the model"):
        data.load_texts(_spec(**{"from": "teacher"}), smollm2_tokenizer)


# ---------------------------------------------------------------- the default heal data
def test_default_heal_data_is_the_corpus_plus_teacher_chat_and_text_sized_by_the_heal(smollm2_tokenizer):
    from ollama_compress.recipe import Data, Heal, load_recipe

    for heal_data in (Data(), load_recipe("smollm2-135m-demo").data):
        assert [(s.from_, s.write) for s in heal_data.heal_sources()] == [
            ("default", "chat"), ("teacher", "chat"), ("teacher", "text")]
    corpus = len(data.token_stream(data.default_texts(_spec()), smollm2_tokenizer))
    chat, text = Data().heal_sources()[1:]
    demo = Heal(steps=60, batch_size=4, seq_len=256)
    tokens = data.heal_chat_tokens(chat, Data(), demo, smollm2_tokenizer)
    half = lambda n: -(-n // 2)  # noqa: E731  (the two teacher sources split what the corpus lacks)
    assert tokens == data.heal_chat_tokens(text, Data(), demo, smollm2_tokenizer) == half(
        -(-60 * 4 * 256 // data.MAX_WINDOW_VIEWS) - corpus)
    assert data.window_views(heal_tokens_needed(demo), corpus + 2 * tokens) <= data.MAX_WINDOW_VIEWS
    assert data.heal_chat_tokens(chat, Data(), Heal(steps=2, batch_size=1, seq_len=64), smollm2_tokenizer) == 0
    sized = Data.model_validate({"heal": [{"from": "default"}, {"from": "teacher", "tokens": 1234}]})
    assert data.heal_chat_tokens(sized.heal_sources()[1], sized, demo, smollm2_tokenizer) == 1234
    # a minutes budget: sized for the tokens the heal is expected to train here, when that was measured
    budget = Heal(steps=60, batch_size=4, seq_len=256, budget={"minutes": 10})
    assert data.heal_chat_tokens(chat, Data(), budget, smollm2_tokenizer) == tokens  # unmeasured: heal.steps
    assert data.heal_chat_tokens(chat, Data(), budget, smollm2_tokenizer, planned=40960) == half(20480 - corpus)
    assert data.heal_chat_tokens(chat, Data(), budget, smollm2_tokenizer, planned=8192) == 0
    healed_run = SimpleNamespace(inputs={data.HEAL_PLANNED_KEY: 40960})  # a later stage of a healed run
    assert data.heal_chat_tokens(text, Data(), budget, smollm2_tokenizer, healed_run) == half(20480 - corpus)
