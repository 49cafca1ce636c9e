"""KL to the F16 file with and without the PyTorch importance matrix, for low-bit quants of SmolLM2.

    python bench/imatrix.py [--hf DIR] [--out DIR] [--max-tokens 2048] [--n-ctx 512]

SmolLM2 HF dir (as bench/quants.py finds it) -> F16 GGUF (``ollama-compress export``) ->
``compute_imatrix`` over the shipped calibration corpus (the recipe default: 32 x 256 tokens,
seed 0) -> each quant in QUANTS without the matrix (llama-cpp-python) and with it (the built
llama-quantize) -> ``measure_quants`` against the F16 on the shipped held-out text, which no
stage calibrates on. Writes bench/results-imatrix.md.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import subprocess
import sys
import time
from pathlib import Path

from ollama_compress.errors import UserError
from ollama_compress.hooks.quantize import shipped_heldout_text, measure_quants, quant_file_name, quantize_file
from ollama_compress.imatrix import compute_imatrix
from quants import machine, smollm2_hf_dir

QUANTS = ("IQ4_XS", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ2_XS")
RESULTS = Path(__file__).with_name("results-imatrix.md")


def export_f16(hf: Path, out: Path) -> Path:
    found = sorted(out.glob("*-F16.gguf"))
    if not found:
        subprocess.run([sys.executable, "-m", "ollama_compress", "export", str(hf), "--out", str(out)], check=True)
        found = sorted(out.glob("*-F16.gguf"))
    return found[0]


def calibration_imatrix(hf: Path, f16: Path, out: Path) -> tuple[Path, float]:
    from ollama_compress.hooks.data import calibration_batches
    from ollama_compress.modelio import load_tokenizer
    from ollama_compress.recipe import Data

    spec = Data().calibration
    tokenizer = load_tokenizer(hf)
    batches = calibration_batches(spec, tokenizer, batch_size=4)
    t0 = time.perf_counter()
    path = compute_imatrix(hf, f16, batches, out / "imatrix.gguf",
                           f"calibration: default ({spec.samples}x{spec.seq_len} tokens, seed {spec.seed})")
    return path, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hf", type=Path, help="SmolLM2 HF directory")
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench-imatrix"))
    ap.add_argument("--max-tokens", type=int, default=2048)
    ap.add_argument("--n-ctx", type=int, default=512)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    hf = smollm2_hf_dir(args.hf, args.out)
    f16 = export_f16(hf, args.out)
    imatrix, imatrix_s = calibration_imatrix(hf, f16, args.out)
    print(f"imatrix in {imatrix_s:.1f} s", flush=True)

    files, refused = {}, {}
    for quant in QUANTS:
        try:
            files[quant] = quantize_file(f16, quant, args.out / quant_file_name(f16, quant))
        except UserError as exc:
            refused[quant] = str(exc).split(":")[0]
        files[f"{quant}+imatrix"] = quantize_file(f16, quant, args.out / f"imatrix-{quant_file_name(f16, quant)}",
                                                  imatrix=imatrix)
        print(f"{quant} done", flush=True)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows = measure_quants(f16, files, texts=shipped_heldout_text(), n_ctx=args.n_ctx, max_tokens=args.max_tokens, speed=False)
    measure_s = time.perf_counter() - t0
    by_name = {r["name"]: r for r in rows}
    lines = [
        "## Importance matrix: KL to F16 with and without it (SmolLM2-135M-Instruct)",
        "",
        f"Date {dt.datetime.now().isoformat(timespec='minutes')}, machine: {machine()}; load average "
        f"{load_before[0]:.1f} before and {os.getloadavg()[0]:.1f} after the {measure_s:.0f} s measurement "
        "(other agents were using the machine). Command: "
        f"`python bench/imatrix.py --max-tokens {args.max_tokens} --n-ctx {args.n_ctx}`.",
        f"Importance matrix: `compute_imatrix` (PyTorch) over the shipped calibration corpus, 32 x 256 tokens, "
        f"{imatrix_s:.0f} s. KL(F16 || quant) per token in nats and perplexity on the shipped held-out text "
        f"({rows[0]['tokens']} tokens, windows of {args.n_ctx}), from llama.cpp logits. F16 perplexity "
        f"{rows[0]['perplexity']:.3f}. SmolLM2's 576-wide rows are not a multiple of 256, so llama.cpp "
        "quantizes most matrices with a fallback type (K and IQ quants -> Q4_0/Q5_0/IQ4_NL), which use the "
        "importance matrix too; only the 1536-wide ffn_down rows get the named type.",
        "",
        "| quant | MiB | KL without | KL with imatrix | change | PPL without | PPL with |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for quant in QUANTS:
        with_ = by_name[f"{quant}+imatrix"]
        without = by_name.get(quant)
        if without is None:
            lines.append(f"| {quant} | {with_['size_mib']:.1f} | refused by llama.cpp ({refused[quant]}) | "
                         f"{with_['mean_kl']:.4f} | - | - | {with_['perplexity']:.2f} |")
            continue
        change = 100 * (with_["mean_kl"] / without["mean_kl"] - 1)
        lines.append(f"| {quant} | {with_['size_mib']:.1f} | {without['mean_kl']:.4f} | {with_['mean_kl']:.4f} | "
                     f"{change:+.0f}% | {without['perplexity']:.2f} | {with_['perplexity']:.2f} |")
    RESULTS.write_text("\n".join(lines) + "\n")
    print(RESULTS.read_text())


if __name__ == "__main__":
    sys.exit(main())
