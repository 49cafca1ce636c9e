"""Per-quant size, bits per weight, perplexity, KL and top-1 agreement for SmolLM2-135M-Instruct.

    python bench/quants.py [--hf DIR] [--out DIR] [--max-tokens 4096] [--n-ctx 512]

SmolLM2 HF dir (``--hf``, else /tmp/smol/hf, else imported from the embedded GGUF with
``hooks.source.import_gguf``) -> F16 GGUF (``ollama_compress.gguf.export_gguf``) -> each quant with
``quantize_file`` (timed) -> ``measure_quants`` against the F16 on the shipped held-out text.
Writes bench/results-quants.md (and quants.json in --out).
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import time
from pathlib import Path

import psutil

from ollama_compress.embedded import smollm2_gguf
from ollama_compress.gguf_verify import verify_gguf
from ollama_compress.hooks.quantize import (
    heldout_texts,
    measure_quants,
    quant_file_name,
    quantize_file,
    write_quants_report,
)

QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
RESULTS = Path(__file__).with_name("results-quants.md")
# Used only when the shipped held-out corpus is missing.
FALLBACK_TEXT = [
    "The river rose slowly through the night, and by morning the lower fields were under water. "
    "Farmers moved their animals to the hills while the children watched from the church steps.",
    "A compiler translates source code into machine instructions. Most compilers first build an "
    "abstract syntax tree, then check types, optimise an intermediate form and finally emit code.",
]


def smollm2_hf_dir(given: Path | None, work: Path) -> Path:
    if given:
        return given
    if (Path("/tmp/smol/hf") / "config.json").is_file():
        return Path("/tmp/smol/hf")
    from ollama_compress.fsutil import atomic_path
    from ollama_compress.hooks.source import import_gguf

    target = work / "smollm2-hf"
    if not (target / "config.json").is_file():
        with atomic_path(target, is_dir=True) as tmp:
            import_gguf(smollm2_gguf(), tmp)
    return target


def machine() -> str:
    mem = psutil.virtual_memory().total / 2**30
    return f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, {platform.platform()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path, help="SmolLM2 HF directory")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-quants"))
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--n-ctx", type=int, default=512)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    from ollama_compress.gguf import export_gguf

    hf = smollm2_hf_dir(args.hf, args.out)
    f16 = args.out / "smollm2-F16.gguf"
    t0 = time.perf_counter()
    export_gguf(hf, f16, "F16")
    export_s = time.perf_counter() - t0
    print(f"exported {f16} in {export_s:.1f} s", flush=True)

    quant_paths, quant_s = {}, {}
    for quant in QUANTS:
        t0 = time.perf_counter()
        quant_paths[quant] = quantize_file(f16, quant, args.out / quant_file_name(f16, quant))
        quant_s[quant] = time.perf_counter() - t0
        print(f"{quant}: {quant_s[quant]:.1f} s", flush=True)

    try:
        texts, text_source = heldout_texts(), "ollama_compress/data/heldout.txt"
    except Exception:  # noqa: BLE001 - the bench still runs, and says which text it used
        texts, text_source = FALLBACK_TEXT, "bench/quants.py FALLBACK_TEXT (heldout.txt missing)"
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    rows = measure_quants(f16, quant_paths, texts=texts, n_ctx=args.n_ctx, max_tokens=args.max_tokens)
    measure_s = time.perf_counter() - t0
    load = f"1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after the measurement"
    write_quants_report(rows, args.out)
    write_results(rows, quant_s, export_s, measure_s, text_source, args, verify_gguf(f16).n_weights, load)
    print(RESULTS.read_text())


def types(path: str) -> str:
    counts = verify_gguf(path).type_counts()
    return ", ".join(f"{t} {n}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def write_results(rows, quant_s, export_s, measure_s, text_source, args, n_weights, load) -> None:
    lines = [
        "# Quants of SmolLM2-135M-Instruct: size and quality (llama.cpp)",
        "",
        f"- date: {dt.datetime.now().isoformat(timespec='minutes')}",
        f"- machine: {machine()}",
        f"- script: `python bench/quants.py --max-tokens {args.max_tokens} --n-ctx {args.n_ctx}`",
        f"- model: SmolLM2-135M-Instruct (from the embedded Q4_1 GGUF, imported to HF, exported to F16; "
        f"{n_weights / 1e6:.1f} M weights). Reference = the F16 export.",
        f"- held-out text: {text_source}; {rows[0]['tokens']} scored tokens in windows of {args.n_ctx}.",
        "- perplexity, KL(F16 || quant) per token (nats) and top-1 agreement all from llama.cpp logits "
        "(llama-cpp-python, `logits_all`).",
        f"- F16 export: {export_s:.1f} s; quality measurement of all rows: {measure_s:.1f} s ({load}; "
        "the machine may be shared, so times are upper bounds).",
        "- SmolLM2's hidden size 576 is not a multiple of 256: llama.cpp gives tensors with such rows a "
        "fallback type, visible in the tensor-types column (count of tensors per ggml type).",
        "- The only SmolLM2 weights here are the Q4_1 GGUF's, so the F16 reference is dequantized Q4_1: "
        "every weight already sits on a Q4_1 grid, which other 4/5-bit grids do not reproduce. The order "
        "among close quants (e.g. Q5_K_M vs Q4_K_M, whose fallbacks are Q5_1 vs Q5_0) can differ from a "
        "model with original weights.",
        "",
        "| quant | size (MiB) | bits/weight | quantize (s) | perplexity | KL vs F16 | top-1 agreement | tensor types |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        secs = "-" if r.get("reference") else f"{quant_s[r['name']]:.1f}"
        lines.append(f"| {r['name']}{' (ref)' if r.get('reference') else ''} | {r['size_mib']:.1f} | "
                     f"{r['bits_per_weight']:.2f} | {secs} | {r['perplexity']:.3f} | {r['mean_kl']:.5f} | "
                     f"{100 * r['top1_agreement']:.1f}% | {types(r['path'])} |")
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
