"""The demo's evaluate table: SmolLM2-135M-Instruct pruned 30 -> 24, every row against the teacher.

    python bench/evaluate.py [--out DIR] [--teacher-quants Q4_K_M,Q8_0] [--set key=value]...

Runs the shipped recipe ``smollm2-135m-demo`` through the pipeline (Modelfiles written, nothing
registered: ``ollama.register=false``), with ``evaluate.teacher_quants`` (default ``auto``: the
original at the same quant and at the sizes nearest each compressed quant). Writes
bench/results-evaluate.md: the table, each compressed quant against its size-matched teacher quant
(KL, decode-speed ratio of the two run in turn), and the stage times. Run it alone on the machine.
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


def verdict_lines(verdicts: list[dict]) -> list[str]:
    """Each compressed quant against its size-matched teacher quant: KL and the decode-speed ratio
    of the two files run in turn (``evaluation.equal_size_verdicts``)."""
    lines = ["| compressed | MiB | KL | teacher quant | MiB | KL | decode ratio | load |", "|---|---:|---:|---|---:|---:|---:|---:|"]
    for v in verdicts:
        ratio = f"{v['decode_ratio']:.2f}x" if v.get("decode_ratio") is not None else "-"
        load = f"{v['load_average'][0]:.1f}" if v.get("load_average") else "-"
        lines.append(f"| {v['name']} | {v['size_bytes'] / 2**20:.1f} | {v['kl']:.3f} | {v['teacher_quant']} | "
                     f"{v['teacher_size_bytes'] / 2**20:.1f} | {v['teacher_kl']:.3f} | {ratio} | {load} |")
    return lines + ["", *(f"- {v['sentence']}" for v in verdicts)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/bench-evaluate/run"))
    parser.add_argument("--teacher-quants", default="auto")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
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
    threads = next((r["speed_threads"] for r in rows if r.get("speed_threads")), "?")
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
        "Worth it at equal size: each compressed quant against the teacher quant with the lowest KL at its size "
        f"or smaller; decode ratio from the two files run in turn ({threads} thread(s), median of 3 rounds):", "",
        *verdict_lines(evaluation.get("verdicts") or []), "",
        f"Greedy answer to \"{evaluation['prompts'][0]}\":", "",
        *[f"- {r['name']}: {json.dumps((r.get('answers') or [''])[0])}" for r in rows], "",
    ])
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
