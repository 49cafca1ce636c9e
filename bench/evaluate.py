"""The demo's evaluate table: SmolLM2-135M-Instruct pruned 30 -> 24, every row against the teacher.

    python bench/evaluate.py [--out DIR] [--teacher-quants Q4_K_M,Q8_0] [--set key=value]...

Runs the shipped recipe ``smollm2-135m-demo`` through the pipeline (Modelfiles written, nothing
registered: ``ollama.register=false``), with ``evaluate.teacher_quants`` so each quant of the
pruned (or healed, when a heal plugin is installed) model has the original at the same quant
beside it. Writes bench/results-evaluate.md: the table, the decode tokens/s of pruned vs teacher
at the same quant in llama.cpp, and the stage times.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import time
from pathlib import Path

import psutil

from ollama_compress import pipeline
from ollama_compress.evaluation import QUALITY_RETAINED
from ollama_compress.report import table_lines

RESULTS = Path(__file__).with_name("results-evaluate.md")


def machine() -> str:
    mem = psutil.virtual_memory().total / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, CPU only, {platform.python_version()}"


def remeasure_pairs(rows: list[dict], rounds: int) -> None:
    """Measure each compressed quant and the teacher's same quant again, alternating, keeping the
    fastest run of each: both see the same moments of a shared machine."""
    from ollama_compress.evaluation import llama_speed

    by_name = {r["name"]: r for r in rows}
    prompt = list(range(1000, 1256))  # token ids only set the work, not the speed
    for row in rows:
        teacher = by_name.get(f"teacher {row['quant']}")
        if row["kind"] != "gguf" or row["model"] == "teacher" or teacher is None:
            continue
        for _ in range(rounds):
            for r in (row, teacher):
                fresh = llama_speed(Path(r["path"]), prompt)
                for key in ("prompt_tokens_per_s", "gen_tokens_per_s"):
                    r[key] = max(r[key], fresh[key])


def speed_lines(rows: list[dict]) -> list[str]:
    """Decode (and prompt) tokens/s of the compressed model vs the teacher at each shared quant."""
    by_name = {r["name"]: r for r in rows}
    lines = ["| quant | model | size MiB | decode tok/s | prompt tok/s | decode speed-up vs teacher |",
             "|---|---|---:|---:|---:|---:|"]
    for row in rows:
        teacher = by_name.get(f"teacher {row['quant']}")
        if row["kind"] != "gguf" or row["model"] == "teacher" or teacher is None:
            continue
        for r in (row, teacher):
            ratio = row["gen_tokens_per_s"] / teacher["gen_tokens_per_s"] if r is row else 1.0
            lines.append(f"| {row['quant']} | {r['name']} | {r['size_bytes'] / 2**20:.1f} | {r['gen_tokens_per_s']:.1f} "
                         f"| {r['prompt_tokens_per_s']:.0f} | {ratio:.2f}x |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-evaluate/run"))
    parser.add_argument("--teacher-quants", default="Q4_K_M,Q8_0")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--speed-rounds", type=int, default=2,
                        help="Extra alternating speed runs per pair (compressed, teacher) after the run.")
    args = parser.parse_args()
    overrides = ["ollama.register=false", f"evaluate.teacher_quants=[{args.teacher_quants}]", *args.overrides]
    load_before = os.getloadavg()
    started = time.perf_counter()
    lock = pipeline.run("smollm2-135m-demo", overrides=overrides, out=args.out)
    seconds = time.perf_counter() - started
    load_after = os.getloadavg()
    stages = lock["stages"]
    evaluation = stages["evaluate"]["metrics"]["evaluation"]
    rows = evaluation["rows"]
    remeasure_pairs(rows, args.speed_rounds)
    threads = next((r["threads"] for r in rows if r.get("threads")), "?")
    timing = ", ".join(f"{name} {s.get('seconds', 0):.1f} s" if s["status"] in ("done", "cached")
                       else f"{name} {s['status']}" for name, s in stages.items())
    text = "\n".join([
        "## Evaluate: the demo's table (SmolLM2-135M-Instruct, 30 -> 24 layers)", "",
        f"- date: {dt.datetime.now().isoformat(timespec='minutes')}; machine: {machine()}",
        f"- command: `python bench/evaluate.py --teacher-quants {args.teacher_quants}"
        + "".join(f" --set {o}" for o in args.overrides) + "` (recipe smollm2-135m-demo, "
        "ollama.register=false)",
        f"- load average before {', '.join(f'{x:.1f}' for x in load_before)}; after "
        f"{', '.join(f'{x:.1f}' for x in load_after)} (shared machine: tokens/s are lower bounds)",
        f"- held-out: {evaluation['heldout_tokens']} tokens in {evaluation['heldout_windows']} windows of the shipped "
        f"held-out corpus; knowledge: {evaluation['knowledge_questions']} questions; llama.cpp threads: {threads}",
        f"- wall clock {seconds:.0f} s; stages: {timing}", "",
        f"*{QUALITY_RETAINED}.*", "", *table_lines(rows), "",
        "Decode speed in llama.cpp, compressed model vs the original at the same quant "
        f"({threads} thread(s), 64 greedy tokens after a 256-token prompt; fastest of the stage's 3 runs and "
        f"{args.speed_rounds} more alternating rounds of 3, so both models saw the same load):", "",
        *speed_lines(rows), "",
        f"Greedy answer to \"{evaluation['prompts'][0]}\":", "",
        *[f"- {r['name']}: {json.dumps((r.get('answers') or [''])[0])}" for r in rows], "",
    ])
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
