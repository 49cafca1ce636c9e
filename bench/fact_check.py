"""A fact check and held-out text the project does not ship: MMLU's dev questions, scored like evaluate's
knowledge column, and KL to the teacher on outside text.

lm-evaluation-harness (``lm_eval``, installed with the project's extras) carries MMLU's 285 dev questions (5 per
subject, 57 subjects) inside its chain-of-thought few-shot prompts (``tasks/mmlu/flan_cot_fewshot/
_cot_prompts.json``), each with its four choices and "The answer is (X)"; the 248 whose question and choices each
sit on one line are used. No stage trains or calibrates on them.
Each question is scored zero-shot by ``evaluation.knowledge_accuracy`` (the function behind evaluate's
``knowledge_accuracy``): the choice with the highest log-likelihood after "Question: ...\\nAnswer:" wins.

    python bench/fact_check.py --run runs/smollm2-135m-demo      # the teacher, pruned and healed models, the GGUFs
    python bench/fact_check.py --models PATH [PATH ...] --limit 20

Held-out text the project does not ship (``--text FILE ...``; by default the Python language reference that
every CPython carries in ``pydoc_data``, and the public-domain books that ``.ci/install-ollama`` leaves in Go's
module cache: Tom Sawyer, War and Peace, Shakespeare): 16 windows of 256 tokens of each, cut by the rule of
``data.heldout`` (``hooks.data.text_windows``), refused if any 32-token span also occurs in the shipped texts.
Each model's perplexity, KL(teacher || model) at T = 1 and top-1 agreement against the teacher's cached
reference on them come from the functions evaluate uses (``teacher_reference``, ``quality_against``,
``measure_against_teacher``); ``--no-text`` skips them.

Prints one JSON line: questions, then per model the share right and its binomial standard error (chance is
25%); then per text the teacher's perplexity and each model's KL, perplexity ratio and top-1 agreement.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import subprocess
import sys
from pathlib import Path

OUTSIDE_SAMPLES, OUTSIDE_SEQ_LEN = 16, 256  # as many windows as data.heldout's default
BOOKS = {  # public-domain books in the Go modules that .ci/install-ollama builds Ollama from
    "Tom Sawyer": "github.com/klauspost/compress@*/testdata/Mark.Twain-Tom.Sawyer.txt",
    "War and Peace": "github.com/ollama/ollama@*/tokenizer/testdata/war-and-peace.txt",
    "Shakespeare": "github.com/ollama/ollama@*/integration/testdata/shakespeare.txt",
}
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
    """The teacher, the pruned and healed models and the exported GGUFs of a run directory (run.json's
    relative paths are from the folder the run was started in, RUN_DIR)."""
    stages = json.loads((run / "run.json").read_text())["stages"]
    run_dir = run.parent.parent

    def located(path: str) -> Path:
        return Path(path) if Path(path).is_absolute() or Path(path).exists() else run_dir / path

    models = {"teacher": run / "00-source"}
    models["teacher"] = next(p.parent for p in sorted(models["teacher"].rglob("config.json")))
    for stage, name in (("prune", "pruned"), ("heal", "healed")):
        out = (stages.get(stage) or {}).get("outputs") or {}
        if out.get("model_dir"):
            models[name] = located(out["model_dir"])
    for quant, path in ((stages.get("export") or {}).get("outputs") or {}).get("gguf", {}).items():
        models[f"GGUF {quant}"] = located(path)
    return models


def go_module_cache() -> Path:
    """``go env GOMODCACHE``, or Go's default when ``go`` is missing."""
    try:
        found = subprocess.run(["go", "env", "GOMODCACHE"], capture_output=True, text=True, timeout=60).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        found = ""
    return Path(found) if found else Path.home() / "go" / "pkg" / "mod"


def outside_texts(files: list[Path]) -> dict[str, str]:
    """Name -> text: ``files``, else the Python language reference and the books found in Go's module cache."""
    if files:
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            refuse(f"no such text file: {missing[0]}")
        return {f.name: f.read_text(encoding="utf-8", errors="replace") for f in files}
    from pydoc_data.topics import topics

    texts = {"Python language reference (pydoc_data)": "\n\n".join(topics[key] for key in sorted(topics))}
    cache = go_module_cache()
    for name, pattern in BOOKS.items():
        found = sorted(cache.glob(pattern))
        if found:
            texts[name] = found[-1].read_text(encoding="utf-8", errors="replace")
        else:
            print(f"fact_check: {name} not found under {cache} (run .ci/install-ollama); left out", file=sys.stderr)
    return texts


def shipped_streams(tokenizer) -> dict[str, list[list[int]]]:
    """The shipped calibration and held-out texts as token streams, for ``check_heldout_unseen``."""
    from ollama_compress.hooks.data import default_texts, token_stream
    from ollama_compress.recipe import TextSource

    return {f"the shipped {split} text": [token_stream(default_texts(TextSource(split=split)), tokenizer)]
            for split in ("calibration", "heldout")}


def outside_windows(text: str, tokenizer, shipped: dict[str, list[list[int]]]) -> list[list[int]]:
    """``text`` cut like ``data.heldout``; a UserError if it shares a 32-token span with a ``shipped`` stream."""
    from ollama_compress.hooks.data import check_heldout_unseen, text_windows

    windows = text_windows([text], tokenizer, OUTSIDE_SAMPLES, OUTSIDE_SEQ_LEN, seed=0)
    check_heldout_unseen(windows, shipped, skip=len(windows[0]) - OUTSIDE_SEQ_LEN)
    return windows


def heldout_figures(teacher_dir: Path, models: dict[str, Path], texts: dict[str, str], run: Path | None) -> dict:
    """Per text: the teacher's perplexity and, per model but the teacher, KL(teacher || model),
    perplexity over the teacher's and top-1 agreement, on ``outside_windows`` of the text; the teacher's
    reference is cached in ``run``'s cache (the user cache without a run)."""
    from ollama_compress import modelio
    from ollama_compress.hooks.quantize import measure_against_teacher, quality_against
    from ollama_compress.options import RunOptions
    from ollama_compress.reference import HFModel, teacher_reference

    tokenizer = modelio.load_tokenizer(teacher_dir)
    shipped = shipped_streams(tokenizer)
    figures = {}
    for text_name, text in texts.items():
        windows = outside_windows(text, tokenizer, shipped)
        reference = teacher_reference(teacher_dir, windows, run_dir=run, text=text_name)
        rows = {}
        for name, path in models.items():
            if Path(path).resolve() == Path(teacher_dir).resolve():
                continue
            if Path(path).suffix == ".gguf":
                row = measure_against_teacher(reference, {name: Path(path)}, speed=False)[0]
                quality = {"kl": row["mean_kl"], "perplexity": row["perplexity"], "top1_agreement": row["top1_agreement"]}
            else:
                backend = HFModel(Path(path), RunOptions())
                try:
                    quality = quality_against(backend, windows, reference.logprobs())
                finally:
                    backend.close()
            rows[name] = {"kl": round(quality["kl"], 4),
                          "perplexity_ratio": round(quality["perplexity"] / reference.teacher_perplexity, 4),
                          "top1": round(quality["top1_agreement"], 4)}
            print(text_name, name, rows[name], file=sys.stderr, flush=True)
        figures[text_name] = {"tokens": reference.tokens, "teacher_perplexity": round(reference.teacher_perplexity, 3),
                              "models": rows}
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a run directory (RUN_DIR/runs/NAME)")
    parser.add_argument("--models", nargs="*", type=Path, default=[], help="HF directories or GGUF files")
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions (a quick check)")
    parser.add_argument("--tokenizer", type=Path, help="an HF directory with the tokenizer (default: the first HF model)")
    parser.add_argument("--teacher", type=Path, help="the teacher's HF directory for the held-out figures (default: the run's)")
    parser.add_argument("--text", nargs="*", type=Path, default=[], help="held-out text files (default: see above)")
    parser.add_argument("--no-text", action="store_true", help="the fact check only")
    args = parser.parse_args()

    from ollama_compress import modelio
    from ollama_compress.errors import UserError
    from ollama_compress.evaluation import LlamaModel, knowledge_accuracy, knowledge_sequences
    from ollama_compress.options import RunOptions
    from ollama_compress.reference import HFModel

    if args.run and not (args.run / "run.json").is_file():
        refuse(f"{args.run} has no run.json; give a run directory (RUN_DIR/runs/NAME)")
    models = run_models(args.run) if args.run else {}
    models.update({str(p): p for p in args.models})
    if not models:
        refuse("give --run or --models")
    texts = {} if args.no_text else outside_texts(args.text)
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
    teacher = args.teacher or models.get("teacher")
    if texts and teacher is not None:
        try:
            result["heldout"] = heldout_figures(teacher, models, texts, args.run)
        except UserError as exc:
            refuse(str(exc))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
