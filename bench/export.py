"""Benchmark: GGUF export of SmolLM2-135M-Instruct (F16), then Q8_0 and Q4_K_M, time and peak RSS.

Each step runs in its own Python process, which reports its wall time, its peak resident memory
(``ru_maxrss``) and the peak it had before the step started (imports of torch/transformers/llama.cpp),
so the step's own memory is the difference. Results go to ``bench/results-export.md``.

    python bench/export.py [--model HF_DIR] [--out DIR]
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
CHILD = r"""
import json, resource, sys, time
from pathlib import Path
step, src, dst = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
import torch, transformers, gguf, llama_cpp  # noqa: F401  (imports counted in the baseline)
from ollama_compress import gguf as writer
from ollama_compress.hooks import quantize
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
if step == "export":
    writer.export_gguf(src, dst, "F16")
else:
    quantize.quantize_file(src, step, dst)
seconds = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "peak_kib": peak, "baseline_kib": base, "bytes": dst.stat().st_size}))
"""


def run_step(step: str, src: Path, dst: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, step, str(src), str(dst)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{step} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def smollm2_dir() -> Path:
    from ollama_compress.embedded import cache_dir, smollm2_gguf
    from ollama_compress.fsutil import atomic_path, file_sha256
    from ollama_compress.hooks.source import import_gguf

    gguf_path = smollm2_gguf()
    target = cache_dir() / "test" / f"smollm2-hf-{file_sha256(gguf_path)[:12]}"  # same cache as the tests
    if not (target / "config.json").is_file():
        with atomic_path(target, is_dir=True) as tmp:
            import_gguf(gguf_path, tmp)
    return target


def machine() -> str:
    import psutil

    ram = psutil.virtual_memory().total / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, Python {platform.python_version()}"


def write_results(name: str, lines: list[str]) -> None:
    """Write ``bench/results-NAME.md`` and print it."""
    text = "\n".join(lines) + "\n"
    (HERE / f"results-{name}.md").write_text(text)
    print(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="HF directory (default: SmolLM2-135M-Instruct, imported once)")
    parser.add_argument("--out", type=Path, help="where the GGUFs go (default: a temporary directory)")
    args = parser.parse_args()
    model = args.model or smollm2_dir()
    weights = sum(p.stat().st_size for p in model.glob("*.safetensors"))
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        f16 = out / "model-F16.gguf"
        rows = [("export F16", run_step("export", model, f16))]
        for quant in ("Q8_0", "Q4_K_M"):
            rows.append((f"quantize {quant}", run_step(quant, f16, out / f"model-{quant}.gguf")))
    lines = [
        "# GGUF export benchmark",
        "",
        f"- date: {dt.date.today().isoformat()}",
        f"- machine: {machine()}",
        f"- model: {model.name} ({weights / 2**20:.0f} MiB of float32 safetensors)",
        "- each step in its own process; 'step RSS' = peak RSS minus the peak after imports",
        "",
        "| step | seconds | output MiB | peak RSS MiB | step RSS MiB |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, r in rows:
        lines.append(f"| {name} | {r['seconds']:.1f} | {r['bytes'] / 2**20:.1f} | {r['peak_kib'] / 1024:.0f} "
                     f"| {(r['peak_kib'] - r['baseline_kib']) / 1024:.0f} |")
    write_results("export", lines)


if __name__ == "__main__":
    main()
