"""Heal benchmark: SmolLM2-135M-Instruct pruned 30 -> 24 layers (the demo's selection), healed once.

One configuration per invocation (run them one at a time; they are timing-sensitive):

    python bench/heal.py --name all-default                       # the recipe defaults
    python bench/heal.py --name nb --set heal.train=neighbours
    python bench/heal.py --name corpus --set "data.heal={from: default}"

Runs the same function as the heal stage and command (``hooks.heal.heal_model``) and prints one
JSON line: held-out KL to the teacher, top-1 agreement and perplexity of teacher / pruned /
healed (on ``data.heldout``, never trained on), steps, tokens/s, wall time (data generation
included) and peak RSS. ``--answers`` also exports teacher, pruned and healed to Q4_K_M with
``ollama-compress export`` and prints their greedy chat answers to five fixed questions
(llama-cpp-python, the model's chat template).
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

QUESTIONS = (
    "What is the capital of France?",
    "Name three primary colors.",
    "How many days are there in a week?",
    "Write one sentence about the ocean.",
    "What is 12 plus 7?",
)
WORK = Path("runs/bench-heal")


def teacher_and_pruned() -> tuple[Path, Path]:
    from ollama_compress.embedded import smollm2_gguf
    from ollama_compress.hooks.prune import plan_and_prune
    from ollama_compress.hooks.source import imported_gguf_dir

    teacher = imported_gguf_dir(smollm2_gguf())
    pruned = WORK / "pruned"
    if not (pruned / "layer_map.json").is_file():
        plan_and_prune(teacher, pruned, metric="block_influence", remove=6)
    return teacher, pruned


def heal_once(name: str, overrides: list[str], recipe: str | None = None, student: Path | None = None,
              teacher: Path | None = None) -> dict:
    """One heal; ``recipe`` takes its heal and data sections from a recipe (then ``--set``), and
    ``student``/``teacher`` replace the default pair (e.g. a finished run's 20-pruned and 00-source)."""
    from ollama_compress.hooks.heal import command_settings, default_checkpoint_dir, heal_model
    from ollama_compress.recipe import load_recipe

    if student is None or teacher is None:
        teacher, pruned = teacher_and_pruned()
    else:
        pruned = student
    if recipe:
        loaded = load_recipe(recipe, overrides)
        settings, data = loaded.heal, loaded.data
    else:
        settings, data = command_settings(str(pruned), overrides)
    out = WORK / name
    if out.exists():
        import shutil

        shutil.rmtree(out)
    started = time.perf_counter()
    result = heal_model(pruned, teacher, out, settings, data, checkpoint_dir=default_checkpoint_dir(out),
                        resume=False, log=lambda m: print(m, file=sys.stderr))
    result.update(name=name, overrides=overrides, wall_s=round(time.perf_counter() - started, 1),
                  peak_rss_gib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
                  settings=settings.model_dump(mode="json"), data=data.model_dump(mode="json", by_alias=True))
    return result


def q4(model_dir: Path, name: str) -> Path:
    """The Q4_K_M GGUF of ``model_dir`` (the export stage's converter and quantizer; no quality table)."""
    from ollama_compress.gguf import export_gguf
    from ollama_compress.hooks.quantize import quantize_file

    target = WORK / "gguf" / name
    found = sorted(target.glob("*Q4_K_M*.gguf")) if target.is_dir() else []
    if found:
        return found[0]
    target.mkdir(parents=True, exist_ok=True)
    f16 = export_gguf(model_dir, target / f"{name}-F16.gguf", "F16")
    return quantize_file(Path(f16), "Q4_K_M", target / f"{name}-Q4_K_M.gguf")


def answers(gguf: Path) -> list[str]:
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=512, n_threads=1, verbose=False, seed=0)
    replies = []
    for question in QUESTIONS:
        out = llm.create_chat_completion([{"role": "user", "content": question}], temperature=0.0, max_tokens=48)
        replies.append(" ".join(out["choices"][0]["message"]["content"].split()))
    return replies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", required=True, help="output directory name under runs/bench-heal")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--recipe", help="take heal and data from this recipe (name or file), then --set")
    parser.add_argument("--student", type=Path, help="pruned HF model dir (with --teacher), e.g. a run's 20-pruned/model")
    parser.add_argument("--teacher", type=Path, help="unpruned HF model dir, e.g. a run's 00-source")
    parser.add_argument("--answers", action="store_true", help="also compare Q4_K_M chat answers")
    parser.add_argument("--results", type=Path, default=WORK / "results.jsonl")
    args = parser.parse_args()
    result = heal_once(args.name, args.overrides, args.recipe, args.student, args.teacher)
    if args.answers:
        teacher, pruned = teacher_and_pruned()
        result["answers"] = {label: answers(q4(path, label)) for label, path in
                             (("teacher", teacher), ("pruned", pruned), ("healed", WORK / args.name))}
        result["questions"] = list(QUESTIONS)
    line = json.dumps(result)
    print(line)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with open(args.results, "a") as f:
        f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
