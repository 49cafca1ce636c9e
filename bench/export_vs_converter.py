"""Benchmark: ``ollama-compress export`` against llama.cpp's ``convert_hf_to_gguf.py`` on the same HF directory.

Both write an F16 GGUF (no quants) of SmolLM2-135M-Instruct (imported once from the embedded GGUF,
the test suite's cache). Each run is a whole fresh process, timed from start to exit, with its
peak resident memory (``ru_maxrss`` from ``wait4``); the runs alternate between the two tools and
the median of ``--repeat`` runs is reported. The converter is the one vendored in the installed
llama-cpp-python's sdist (``ollama_compress.gguf.reference``). Results go to
``bench/results-export-vs-converter.md``.

    python bench/export_vs_converter.py [--model HF_DIR] [--repeat 3]
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from export import machine, smollm2_dir, write_results  # noqa: E402  (bench/export.py: same model, machine, output)


def timed(cmd: list[str]) -> dict[str, float]:
    """Wall seconds, CPU seconds (user + system) and peak RSS (MiB) of one process run to completion."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... failed:\n{err[-3000:]}")
    return {"seconds": seconds, "cpu": usage.ru_utime + usage.ru_stime, "rss_mib": usage.ru_maxrss / 1024}


def commands(model: Path, out: Path) -> dict[str, tuple[list[str], Path]]:
    from ollama_compress.gguf.reference import converter_script

    ours = out / "ours"
    converted = out / "converter.gguf"
    return {
        "ollama-compress export": ([sys.executable, "-m", "ollama_compress", "export", str(model), "--outtype", "F16",
                                    "--out", str(ours)], ours / f"{model.name}-F16.gguf"),
        "convert_hf_to_gguf.py": ([sys.executable, str(converter_script()), str(model), "--outtype", "f16",
                                   "--outfile", str(converted)], converted),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="HF directory (default: SmolLM2-135M-Instruct, imported once)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per tool; the median is reported")
    args = parser.parse_args()
    model = args.model or smollm2_dir()
    load = os.getloadavg()
    runs: dict[str, list[dict[str, float]]] = {}
    sizes: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cmds = commands(model, Path(tmp))
        for _ in range(args.repeat):
            for name, (cmd, output) in cmds.items():
                output.unlink(missing_ok=True)
                runs.setdefault(name, []).append(timed(cmd))
                sizes[name] = output.stat().st_size
    median = {name: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "cpu", "rss_mib")}
              for name, rs in runs.items()}
    ours, ref = median["ollama-compress export"], median["convert_hf_to_gguf.py"]
    lines = [
        "## Export vs llama.cpp's converter (F16, no quants)",
        "",
        f"Date {dt.datetime.now().isoformat(timespec='minutes')}, machine: {machine()}; "
        f"load average at start {load[0]:.1f}, {load[1]:.1f}, {load[2]:.1f} (the machine is shared). "
        f"Command: `python bench/export_vs_converter.py --repeat {args.repeat}`. Model: {model.name} (HF, float32). "
        f"Whole processes, median of {args.repeat} alternating runs; CPU seconds (user + system) and peak RSS "
        "from wait4.",
        "",
        "| tool | seconds (median) | runs | CPU seconds (median) | peak RSS MiB (median) | output MiB |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for name, rs in runs.items():
        each = ", ".join(f"{r['seconds']:.1f}" for r in rs)
        lines.append(f"| {name} | {median[name]['seconds']:.2f} | {each} | {median[name]['cpu']:.2f} "
                     f"| {median[name]['rss_mib']:.0f} | {sizes[name] / 2**20:.1f} |")
    lines += ["", f"Ratio ours / converter: time {ours['seconds'] / ref['seconds']:.2f}, "
                  f"CPU time {ours['cpu'] / ref['cpu']:.2f}, peak RSS {ours['rss_mib'] / ref['rss_mib']:.2f}."]
    write_results("export-vs-converter", lines)


if __name__ == "__main__":
    main()
