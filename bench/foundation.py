"""Time `import-gguf` on the embedded SmolLM2 GGUF and `analyze` (block influence) on the result.

Run: python3 bench/foundation.py   (writes bench/results-foundation.md)
Each command runs in a fresh process, as a user runs it; peak RSS is that child's maximum.
"""
from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).parent


def timed(*args: str) -> tuple[float, float, str]:
    """(seconds, peak RSS MiB of this child, stdout) of `ollama-compress ARGS`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ollama_compress", *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed: {proc.stderr[-2000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return seconds, max(peak, before) / 1024, proc.stdout


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, CPU only, Python {platform.python_version()}"


def main() -> None:
    from ollama_compress.embedded import smollm2_gguf

    gguf = smollm2_gguf()
    with tempfile.TemporaryDirectory() as tmp:
        hf = Path(tmp) / "smollm2"
        import_s, import_rss, _ = timed("import-gguf", str(gguf), "--out", str(hf))
        rows = []
        for metric, extra in (("block_influence", []),):  # drop_one/angular timings: bench/metrics.py
            s, rss, out = timed("analyze", str(hf), "--metric", metric, "--json", "--out", str(Path(tmp) / metric), *extra)
            scores = json.loads(out)[metric]
            rows.append((metric, s, rss, len(scores)))
    lines = [
        "## Foundation: import-gguf and analyze (SmolLM2-135M-Instruct)",
        "",
        f"Date {date.today()}, machine: {machine()}. Command: `python3 bench/foundation.py`.",
        "Calibration: the shipped default corpus, 32 sequences x 256 tokens (analyze's defaults).",
        "",
        "| command | seconds | peak RSS (MiB) |",
        "| --- | ---: | ---: |",
        f"| `import-gguf SmolLM2-135M-Instruct.Q4_1.gguf` | {import_s:.1f} | {import_rss:.0f} |",
    ]
    lines += [f"| `analyze --metric {m} --json` ({n} scores) | {s:.1f} | {rss:.0f} |" for m, s, rss, n in rows]
    (HERE / "results-foundation.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
