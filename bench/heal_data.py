"""Teacher-written heal chat for the demo: batch size, generation rate, and the heal data mix.

Uses the demo recipe (``recipes/smollm2-135m-demo.yaml``): the teacher is the embedded
SmolLM2-135M-Instruct GGUF, the chat size is what its heal needs (``heal_chat_tokens``).

1. Measures generated tokens/s of the batched llama.cpp decoder for each ``--batches`` size on the
   same ``--probe`` replies (sampled, ``--probe-tokens`` new tokens at most each).
2. Writes the demo's heal chat with the fastest size (``--batch`` forces one) into a fresh cache
   directory, and reports conversations, tokens, tokens/s and wall time.
3. Prints the heal data mix (corpus vs chat tokens) and how many times each heal window is seen.

Appends a section to bench/RESULTS.md with ``--record``. Run it alone on the machine: the rate
depends on what else runs (the load average is recorded).

    python bench/heal_data.py [--batches 1 4 8 16 32] [--probe 32] [--record]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores"


def probe_rates(gguf: Path, tokenizer, spec, batches: list[int], probe: int, probe_tokens: int) -> dict[int, float]:
    """Generated tokens/s of ``probe`` replies for each batch size (same prompts and seeds)."""
    from ollama_compress import teacher_chat
    from ollama_compress.hooks.data import prompt_text, teacher_prompts

    prompts = teacher_prompts(spec)
    sampling = teacher_chat.Sampling(spec.temperature, spec.top_p, probe_tokens, spec.seed)
    rates = {}
    for batch in batches:
        with teacher_chat.LlamaChat(gguf, batch, 256 + probe_tokens) as chat:
            started = time.perf_counter()
            replies = teacher_chat.generate_replies(chat, lambda i: prompt_text(tokenizer, prompts[i][1]), sampling,
                                                    lambda done: len(done) >= probe)
            seconds = time.perf_counter() - started
        rates[batch] = sum(len(r) for r in replies) / seconds
        print(f"batch {batch:>3}: {rates[batch]:7.1f} generated tokens/s ({chat.decode_calls} decode calls, "
              f"{seconds:.1f} s)", flush=True)
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default=str(ROOT / "recipes" / "smollm2-135m-demo.yaml"))
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4, 8, 16, 32])
    parser.add_argument("--probe", type=int, default=32, help="replies per batch-size probe")
    parser.add_argument("--probe-tokens", type=int, default=64, help="new tokens per probe reply, at most")
    parser.add_argument("--batch", type=int, help="skip the probe and write the chat with this batch size")
    parser.add_argument("--tokens", type=int, help="chat tokens to write (default: what the demo's heal needs)")
    parser.add_argument("--record", action="store_true", help="append the figures to bench/RESULTS.md")
    args = parser.parse_args()

    from ollama_compress.options import RunOptions
    from ollama_compress.hooks.data import (generate_teacher_chat, heal_chat_tokens, load_texts, teacher_gguf,
                                            token_stream, window_views)
    from ollama_compress.hooks.heal import heal_tokens_planned
    from ollama_compress.hooks.source import resolve_model_dir, source_path
    from ollama_compress.modelio import load_tokenizer
    from ollama_compress.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    options = RunOptions()
    gguf = source_path(recipe.source, options)
    tokenizer = load_tokenizer(resolve_model_dir(recipe.source.model, options), options)
    sources = recipe.data.heal_sources()
    (chat_spec,) = [s for s in sources if s.from_ == "teacher"]
    needed = heal_tokens_planned(recipe.heal)  # a minutes budget: as sized for `heal.steps`
    tokens = args.tokens or heal_chat_tokens(chat_spec, recipe.data, recipe.heal, tokenizer)
    load = os.getloadavg()[0]
    print(f"teacher {gguf.name}; heal consumes {needed} tokens; chat to write: {tokens} tokens; "
          f"load average {load:.2f}", flush=True)

    rates = {} if args.batch else probe_rates(teacher_gguf(gguf), tokenizer, chat_spec, args.batches, args.probe,
                                              args.probe_tokens)
    batch = args.batch or max(rates, key=rates.get)
    started = time.perf_counter()
    records, figures = generate_teacher_chat(chat_spec, gguf, tokenizer, tokens, batch=batch)
    wall = time.perf_counter() - started
    corpus = sum(len(token_stream(load_texts(s, tokenizer), tokenizer)) for s in sources if s.from_ != "teacher")
    chat_tokens = sum(r["tokens"] for r in records)
    total = corpus + chat_tokens
    by_category: dict[str, int] = {}
    for r in records:
        by_category[r["category"]] = by_category.get(r["category"], 0) + 1
    ended = sum(1 for r in records if r["new_tokens"] < chat_spec.max_new_tokens)
    result = {
        **figures, "wall_seconds": round(wall, 1), "batch_rates": {b: round(r, 1) for b, r in rates.items()},
        "corpus_tokens": corpus, "chat_tokens": chat_tokens, "heal_tokens_needed": needed,
        "window_views": round(window_views(needed, total), 2), "by_category": by_category,
        "replies_ended_before_the_limit": ended, "load_average": round(load, 2),
    }
    print(json.dumps(result, indent=2))
    if args.record:
        record(result, gguf.name, chat_spec, records)


def record(result: dict, gguf_name: str, spec, records: list[dict]) -> None:
    now = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    rates = ", ".join(f"{b}: {r:.0f}" for b, r in result["batch_rates"].items()) or "not probed"
    example = records[0]
    lines = [
        "", f"## Heal data: teacher-written chat for the demo (bench/heal_data.py, {now})", "",
        f"Machine: {machine()}; load average {result['load_average']} when it started (under load, times are "
        "upper bounds and rates lower bounds).",
        f"Teacher {gguf_name} in llama.cpp (llama-cpp-python, batched decoding); prompts: the shipped set; "
        f"temperature {spec.temperature}, top_p {spec.top_p}, at most {spec.max_new_tokens} new tokens.", "",
        f"- generated tokens/s by batch size: {rates}; written with batch {result['batch']}",
        f"- {result['conversations']} conversations, {result['chat_tokens']} tokens (rendered, as the heal reads "
        f"them), {result['new_tokens']} generated, {result['new_tokens_per_s']:.0f} generated tokens/s, "
        f"{result['wall_seconds']:.0f} s wall; {result['replies_ended_before_the_limit']} replies ended before the limit",
        f"- heal data mix: {result['corpus_tokens']} corpus + {result['chat_tokens']} chat = "
        f"{result['corpus_tokens'] + result['chat_tokens']} tokens for {result['heal_tokens_needed']} consumed: "
        f"each window seen {result['window_views']} times",
        f"- conversations by category: {json.dumps(result['by_category'])}",
        f"- first reply: {example['prompt']!r} -> {example['reply'][:160]!r}",
    ]
    with open(ROOT / "bench" / "RESULTS.md", "a", encoding="utf-8") as out:
        out.write("\n".join(lines) + "\n")
    print("appended to bench/RESULTS.md")


if __name__ == "__main__":
    main()
