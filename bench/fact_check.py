"""A fact check the project does not ship: MMLU's dev questions, scored like evaluate's knowledge column.

lm-evaluation-harness (``lm_eval``, installed with the project's extras) carries MMLU's 285 dev questions (5 per
subject, 57 subjects) inside its chain-of-thought few-shot prompts (``tasks/mmlu/flan_cot_fewshot/
_cot_prompts.json``), each with its four choices and "The answer is (X)"; the 248 whose question and choices each
sit on one line are used. No stage trains or calibrates on them.
Each question is scored zero-shot by ``evaluation.knowledge_accuracy`` (the function behind evaluate's
``knowledge_accuracy``): the choice with the highest log-likelihood after "Question: ...\\nAnswer:" wins.

    python bench/fact_check.py --run runs/smollm2-135m-demo      # the teacher, the healed model and its GGUFs
    python bench/fact_check.py --models PATH [PATH ...] --limit 20

Prints one JSON line: questions, then per model the share right and its binomial standard error. Chance is 25%.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

QUESTION = re.compile(r"Q: (?P<question>.*?)\n\(A\) (?P<a>.*?) \(B\) (?P<b>.*?) \(C\) (?P<c>.*?) \(D\) (?P<d>.*?)\n"
                      r"A: .*?The answer is \((?P<answer>[ABCD])\)\.?", re.DOTALL)


def refuse(message: str) -> None:
    """Bad input: one line on stderr, exit 2."""
    print(f"fact_check: {message}", file=sys.stderr)
    sys.exit(2)


def mmlu_dev_questions() -> list[dict]:
    """``{"question", "choices", "answer"}`` for each dev question whose choices sit on one line."""
    from importlib import resources

    try:
        text = resources.files("lm_eval").joinpath("tasks/mmlu/flan_cot_fewshot/_cot_prompts.json").read_text()
    except (ModuleNotFoundError, FileNotFoundError):
        refuse("needs lm_eval with its MMLU task files (pip install lm_eval)")
    questions = []
    for prompt in json.loads(text).values():
        for block in prompt.split("\n\n"):
            match = QUESTION.fullmatch(block.strip())
            if match and "\n" not in match["question"]:
                questions.append({"question": match["question"],
                                  "choices": [match[k] for k in "abcd"], "answer": "ABCD".index(match["answer"])})
    return questions


def run_models(run: Path) -> dict[str, Path]:
    """The teacher, the healed (or pruned) model and the exported GGUFs of a run directory."""
    stages = json.loads((run / "run.json").read_text())["stages"]
    models = {"teacher": run / "00-source"}
    models["teacher"] = next(p.parent for p in sorted(models["teacher"].rglob("config.json")))
    for stage in ("heal", "prune"):
        out = (stages.get(stage) or {}).get("outputs") or {}
        if out.get("model_dir"):
            models[stage + "ed" if stage == "heal" else "pruned"] = Path(out["model_dir"])
            break
    for quant, path in ((stages.get("export") or {}).get("outputs") or {}).get("gguf", {}).items():
        models[f"GGUF {quant}"] = Path(path)
    return models


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run directory (RUN_DIR/runs/NAME)")
    parser.add_argument("--models", nargs="*", type=Path, default=[], help="HF directories or GGUF files")
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions (a quick check)")
    parser.add_argument("--tokenizer", type=Path, help="an HF directory with the tokenizer (default: the first HF model)")
    args = parser.parse_args()

    from ollama_compress import modelio
    from ollama_compress.evaluation import LlamaModel, knowledge_accuracy, knowledge_sequences
    from ollama_compress.options import RunOptions
    from ollama_compress.reference import HFModel

    if args.run and not (args.run / "run.json").is_file():
        refuse(f"{args.run} has no run.json; give a run directory (RUN_DIR/runs/NAME)")
    models = run_models(args.run) if args.run else {}
    models.update({str(p): p for p in args.models})
    if not models:
        refuse("give --run or --models")
    questions = mmlu_dev_questions()[: args.limit or None]
    tokenizer_dir = args.tokenizer or next((p for p in models.values() if p.is_dir()), None)
    if tokenizer_dir is None:
        refuse("GGUF files alone: give --tokenizer (the teacher's HF directory)")
    sequences = knowledge_sequences(modelio.load_tokenizer(tokenizer_dir), questions)
    longest = max(len(c) + max(map(len, ch)) for c, ch, _ in sequences)
    result = {"questions": len(questions), "source": "MMLU dev (lm_eval flan_cot_fewshot prompts)", "models": {}}
    for name, path in models.items():
        backend = LlamaModel(path, n_ctx=longest) if path.suffix == ".gguf" else HFModel(path, RunOptions())
        try:
            share = knowledge_accuracy(backend, sequences)
        finally:
            backend.close()
        result["models"][name] = {"right": round(share, 4),
                                  "stderr": round(math.sqrt(share * (1 - share) / len(questions)), 4)}
        print(name, result["models"][name], file=sys.stderr, flush=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
