"""Per-quant size, bits per weight, perplexity, KL and top-1 agreement for SmolLM2-135M-Instruct.

    python bench/quants.py [--hf DIR] [--out DIR] [--max-tokens 4096] [--n-ctx 512]
    python bench/quants.py --speed [--hf DIR] [--out DIR]   # teacher vs pruned 24/30, tokens/s

SmolLM2 HF dir (``--hf``, else /tmp/smol/hf, else imported from the embedded GGUF with
``hooks.source.import_gguf``) -> F16 GGUF (``ollama_compress.gguf.export_gguf``) -> each quant with
``quantize_file`` (timed) -> ``measure_quants`` against the F16 on the shipped held-out text.
Writes bench/results-quants.md (and quants.json in --out).

``--speed``: the teacher and a 24/30-layer SmolLM2 (layers 12-17 removed, block influence's
choice; speed does not depend on which) exported to F16 and quantized to SPEED_QUANTS, then
``measure_speed`` (prompt and generation tokens/s in llama-cpp-python) on each; writes
bench/results-speed.md.
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
    shipped_heldout_text,
    measure_quants,
    quant_file_name,
    quantize_file,
    write_quants_report,
)

QUANTS = ("Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0", "Q3_K_M", "Q2_K")
RESULTS = Path(__file__).with_name("results-quants.md")
SPEED_RESULTS = Path(__file__).with_name("results-speed.md")
SPEED_QUANTS = ("Q4_K_M", "Q8_0", "F16")
PRUNED_LAYERS = (12, 13, 14, 15, 16, 17)
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
    ap.add_argument("--speed", action="store_true", help="only the teacher vs pruned speed table")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.speed:
        return speed(smollm2_hf_dir(args.hf, args.out), args.out)

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
        texts, text_source = shipped_heldout_text(), "ollama_compress/data/heldout.txt"
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


def speed(hf: Path, out: Path) -> None:
    import subprocess

    import llama_cpp

    from ollama_compress.hooks.prune import prune_dir
    from ollama_compress.hooks.quantize import measure_speed

    models = {"teacher (30 layers)": hf, "pruned (24 layers)": out / "smollm2-pruned-24"}
    if not (models["pruned (24 layers)"] / "config.json").is_file():
        prune_dir(hf, models["pruned (24 layers)"], PRUNED_LAYERS)
    text = "\n\n".join(shipped_heldout_text()).encode()
    ggufs = {}
    for label, model in models.items():
        gguf_dir = out / f"speed-{model.name}"
        if not list(gguf_dir.glob("*-F16.gguf")):
            subprocess.run([sys.executable, "-m", "ollama_compress", "export", str(model), "--out", str(gguf_dir)],
                           check=True)
        (ggufs[label],) = gguf_dir.glob("*-F16.gguf")
    tokens = llama_cpp.Llama(str(ggufs["teacher (30 layers)"]), vocab_only=True, verbose=False).tokenize(text, add_bos=True)
    rows = []
    for quant in SPEED_QUANTS:  # teacher and pruned back to back, so both see about the same load
        for label, f16 in ggufs.items():
            path = f16 if quant == "F16" else f16.with_name(quant_file_name(f16, quant))
            if not path.is_file():
                quantize_file(f16, quant, path)
            rows.append({"model": label, "quant": quant, "mib": path.stat().st_size / 2**20,
                         "load": os.getloadavg()[0]} | measure_speed(path, tokens))
            print(rows[-1], flush=True)
    teacher = {r["quant"]: r for r in rows if r["model"].startswith("teacher")}
    lines = [
        "## Speed: teacher vs pruned 24/30 SmolLM2 in llama.cpp",
        "",
        f"Date {dt.datetime.now().isoformat(timespec='minutes')}, machine: {machine()}. Command: "
        "`python bench/quants.py --speed`. `measure_speed` (hooks/quantize.py): llama-cpp-python with its "
        f"default threads ({rows[0]['speed_threads']}), a 128-token prompt evaluated as one batch, then 32 "
        "tokens fed one at a time (a generation step without sampling); median of 3 after a warm-up. "
        "Other agents were using the 2 cores (1-minute load average in the table) and this ran at nice 15, "
        "so wall-clock rates mostly show the CPU share it got; the per-CPU-second rates (tokens per second "
        "of this process's CPU time, one thread) show the speed of the model itself.",
        "",
        "| model | quant | MiB | prompt tok/s | gen tok/s | prompt tok/CPU-s | gen tok/CPU-s | gen speed-up (CPU) | load |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        up = r["gen_tokens_per_cpu_s"] / teacher[r["quant"]]["gen_tokens_per_cpu_s"]
        lines.append(f"| {r['model']} | {r['quant']} | {r['mib']:.1f} | {r['prompt_tokens_per_s']:.1f} | "
                     f"{r['gen_tokens_per_s']:.1f} | {r['prompt_tokens_per_cpu_s']:.1f} | "
                     f"{r['gen_tokens_per_cpu_s']:.1f} | {up:.2f}x | {r['load']:.1f} |")
    SPEED_RESULTS.write_text("\n".join(lines) + "\n")
    print(SPEED_RESULTS.read_text())


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
                     f"{100 * r['top1_agreement']:.1f}% | {types(args.out / r['file'])} |")
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
