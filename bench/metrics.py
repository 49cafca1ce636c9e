"""Which importance metric picks the best layers to remove? SmolLM2-135M-Instruct, 30 -> 24 layers.

For each metric: score the layers on the shipped calibration corpus, remove 6 of 30 layers
(block_influence, drop_one and per-layer angular: the 6 lowest-scoring unprotected layers;
angular block: the contiguous block of 6 with the smallest angular distance), then measure the
pruned model, unhealed, on the shipped held-out corpus: perplexity and KL(teacher || pruned) of
the next-token distributions. Also the seconds each metric took. First and last layers are
protected (the prune default).

Run: python3 bench/metrics.py [--samples 32] [--seq-len 256] [--heldout-samples 16] [--heldout-seq-len 256]
[--threads N]. The defaults are the recipe defaults. Writes bench/results-metrics.md. On one CPU
thread the defaults take about 20 minutes, most of it drop_one (a forward pass per layer and
sequence). On a CPU shared with other jobs, ``--threads 1`` is several times faster than letting
torch's threads contend.
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import platform
import time
from datetime import datetime
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).parent
REMOVE = 6


def machine() -> str:
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} cores, {mem:.0f} GiB RAM, CPU only, torch "
            f"{torch.__version__}, torch threads: {torch.get_num_threads()}; load average at start {load}")


def evaluate(teacher, students: dict[str, torch.nn.Module], batches: list) -> dict[str, tuple[float, float]]:
    """Per model: (held-out perplexity, mean KL(teacher || model) per token). 'full' is the teacher."""
    nll = {name: 0.0 for name in ["full", *students]}
    kl = {name: 0.0 for name in students}
    predicted = 0
    with torch.no_grad():
        for ids in batches:
            ref = F.log_softmax(teacher(input_ids=ids, use_cache=False).logits.float(), -1)
            targets = ids[:, 1:]
            nll["full"] += float(-ref[:, :-1].gather(-1, targets.unsqueeze(-1)).sum())
            for name, student in students.items():
                logp = F.log_softmax(student(input_ids=ids, use_cache=False).logits.float(), -1)
                nll[name] += float(-logp[:, :-1].gather(-1, targets.unsqueeze(-1)).sum())
                kl[name] += float(F.kl_div(logp, ref, log_target=True, reduction="sum"))
            predicted += targets.numel()
    tokens = sum(b.numel() for b in batches)
    return {name: (math.exp(nll[name] / predicted), kl.get(name, 0.0) / tokens) for name in nll}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="calibration sequences")
    parser.add_argument("--seq-len", type=int, default=256, help="calibration tokens per sequence")
    parser.add_argument("--heldout-samples", type=int, default=16)
    parser.add_argument("--heldout-seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from ollama_compress import modelio
    from ollama_compress.hooks import importance, prune
    from ollama_compress.hooks.data import calibration_batches
    from ollama_compress.hooks.source import resolve_model_dir
    from ollama_compress.recipe import TextSource

    started = datetime.now().strftime("%Y-%m-%d %H:%M")
    where = machine()
    model_dir = resolve_model_dir("embedded:smollm2-135m-instruct")
    tokenizer = modelio.load_tokenizer(model_dir)
    teacher = modelio.load_model(model_dir, dtype="float32", device="cpu")
    num_layers = len(importance.get_decoder_layers(teacher))
    calib = calibration_batches(TextSource(samples=args.samples, seq_len=args.seq_len), tokenizer)
    heldout = calibration_batches(TextSource(split="heldout", samples=args.heldout_samples,
                                             seq_len=args.heldout_seq_len), tokenizer)

    choices: dict[str, tuple[list[int], float]] = {}  # label -> (removed layers, seconds)
    t = time.perf_counter()
    stats = importance.collect_hidden_stats(teacher, calib)
    block_influence = importance.block_influence_from(stats)
    hidden_pass = time.perf_counter() - t
    choices["block_influence"] = (prune.select_layers(block_influence, num_layers, remove=REMOVE), hidden_pass)
    angular_1 = importance.angular_from(stats, 1)
    choices["angular (per layer, n=1)"] = (prune.select_layers(angular_1, num_layers, remove=REMOVE), hidden_pass)
    distances = importance.block_distances_from(stats, REMOVE)
    angular_n = importance.angular_from(stats, REMOVE)
    choices[f"angular (block of {REMOVE})"] = (
        prune.select_layers(angular_n, num_layers, remove=REMOVE, block=True, block_scores=distances), hidden_pass)
    print(f"hidden-state pass: {hidden_pass:.1f}s", flush=True)
    t = time.perf_counter()
    drop = importance.drop_one(teacher, calib)
    choices["drop_one"] = (prune.select_layers(drop, num_layers, remove=REMOVE), time.perf_counter() - t)
    print(f"drop_one: {choices['drop_one'][1]:.1f}s", flush=True)

    students = {label: prune.prune_model(copy.deepcopy(teacher), removed) for label, (removed, _) in choices.items()}
    t = time.perf_counter()
    results = evaluate(teacher, students, heldout)
    eval_s = time.perf_counter() - t

    lines = [
        f"## Importance metrics: SmolLM2-135M-Instruct, {REMOVE} of {num_layers} layers removed, unhealed",
        "",
        f"Date {started}, machine: {where}. Command: `python3 bench/metrics.py --samples {args.samples} "
        f"--seq-len {args.seq_len} --heldout-samples {args.heldout_samples} --heldout-seq-len {args.heldout_seq_len}"
        + (f" --threads {args.threads}" if args.threads else "") + "`.",
        f"Scores on the shipped calibration corpus ({args.samples} x {args.seq_len} tokens, seed 0); evaluated "
        f"on the shipped held-out corpus ({args.heldout_samples} x {args.heldout_seq_len} tokens; disjoint text). "
        "First and last layers protected. Model: the embedded Q4_1 GGUF imported to float32 (HF).",
        "block_influence and both angular rows come from one shared hooked pass (its time is shown for each).",
        "",
        "| metric | removed layers (0-based) | kept (mergekit layer_range) | scoring seconds | held-out PPL | KL(teacher‖pruned) |",
        "| --- | --- | --- | ---: | ---: | ---: |",
        f"| none (full model, {num_layers} layers) | - | [0, {num_layers}] | - | {results['full'][0]:.2f} | 0 |",
    ]
    for label, (removed, seconds) in choices.items():
        ppl, kl = results[label]
        kept = ", ".join(f"[{a}, {b}]" for a, b in prune.kept_slices(removed, num_layers))
        lines.append(f"| {label} | {removed} | {kept} | {seconds:.1f} | {ppl:.2f} | {kl:.4f} |")
    lines += [
        "",
        f"Held-out evaluation of all models took {eval_s:.0f} s. Lower PPL and KL are better. Load average "
        f"at the end {', '.join(f'{x:.1f}' for x in os.getloadavg())} (the machine is shared: seconds vary). "
        f"Smallest angular block distance d(start={min(range(len(distances)), key=distances.__getitem__)}, "
        f"n={REMOVE}) = {min(distances):.4f}.",
    ]
    (HERE / "results-metrics.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
