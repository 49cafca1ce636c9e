"""Linear repair and measured cut: SmolLM2-135M-Instruct 30 -> 24 layers, the demo's prune settings, no heal.

    python bench/repair.py                      # the demo's settings (calibration 32 x 256, held-out 16 x 256)
    python bench/repair.py --samples 4 --heldout 2 --seq-len 64   # a quick check that it runs

Rows, each on ``data.heldout`` (held-out text no stage trains on), against the unpruned teacher:

* plain cut of block_influence's pick (what prune wrote before repair);
* the same cut with linear repair (``prune.repair: linear``);
* ``prune.select: measured``: every 6-layer span and block_influence's pick, each repaired, scored on
  calibration windows; the chosen cut, repaired, on held-out text.

Uses the functions the prune stage uses (``hooks.prune.score``/``select_layers``/``choose_and_repair``,
``ollama_compress.repair``) and heal's held-out measure (``trainer.heldout_metrics``, the teacher's
logits computed once). Prints two JSON lines
(repair, then the measured cut). Wall times are only meaningful on an idle machine.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads, as the CLI does: no spinning on a busy CPU

METRIC = "block_influence"
REMOVE = 6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=32, help="calibration windows (demo: 32)")
    parser.add_argument("--heldout", type=int, default=16, help="held-out windows (demo: 16)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--no-measured", action="store_true", help="only the plain cut and its repair")
    args = parser.parse_args()

    import torch

    from ollama_compress import modelio, trainer
    from ollama_compress.embedded import smollm2_gguf
    from ollama_compress.hooks import prune
    from ollama_compress.hooks.data import calibration_batches, heldout_windows
    from ollama_compress.hooks.source import imported_gguf_dir
    from ollama_compress.recipe import TextSource

    torch.manual_seed(0)
    source = imported_gguf_dir(smollm2_gguf())
    teacher = modelio.load_model(source)
    tokenizer = modelio.load_tokenizer(source)
    batches = calibration_batches(TextSource(samples=args.samples, seq_len=args.seq_len), tokenizer)
    held = torch.tensor(heldout_windows(TextSource(split="heldout", samples=args.heldout, seq_len=args.seq_len),
                                        tokenizer))
    vocab = teacher.get_output_embeddings().weight.shape[0]
    teacher_logits: list = []

    def heldout(removed: list[int], tensors: dict | None) -> dict[str, float]:
        from ollama_compress.repair import apply_tensors

        student = copy.deepcopy(teacher)
        if tensors:
            apply_tensors(student, tensors)
        prune.prune_model(student, removed)
        figures = trainer.heldout_metrics(student, teacher, held, "cpu", vocab, teacher_logits)
        return {k: round(v, 4) for k, v in figures.items()}

    num_layers = teacher.config.num_hidden_layers
    protect = ["first", "last"]
    scores, _ = prune.score(teacher, batches, METRIC)
    pick = prune.select_layers(scores, num_layers, remove=REMOVE, protect=protect)
    common = dict(scores={METRIC: scores}, num_layers=num_layers, block=False, protect=protect, block_scores=None,
                  metric=METRIC, log=lambda message: None)
    start = time.perf_counter()
    _, repaired, repair_info = prune.choose_and_repair(teacher, batches, pick, select="metric", repair_mode="linear",
                                                       **common)
    repair_s = time.perf_counter() - start
    plain = heldout(pick, None)
    linear = heldout(pick, repaired)
    print(json.dumps({  # first line: the repair alone (the measured cut takes much longer)
        "model": "SmolLM2-135M-Instruct", "layers": f"{num_layers} -> {num_layers - REMOVE}",
        "calibration": f"{args.samples} x {args.seq_len}", "heldout": f"{args.heldout} x {args.seq_len}",
        "teacher_ppl": round(plain["teacher_ppl"], 3), "metric_pick": pick, "plain_cut": plain,
        "linear_repair": linear, "kl_reduction_by_repair": round(1 - linear["kl"] / plain["kl"], 4),
        "repair_spans": repair_info["repair"]["spans"], "repair_seconds": round(repair_s, 1)}), flush=True)
    if args.no_measured:
        return
    start = time.perf_counter()
    chosen, chosen_tensors, measured = prune.choose_and_repair(teacher, batches, pick, select="measured",
                                                               repair_mode="linear", **common)
    measured_s = time.perf_counter() - start
    print(json.dumps({  # second line: prune.select: measured
        "measured_choice": chosen, "measured_repaired": heldout(chosen, chosen_tensors),
        "candidates": sorted(({"removed": c["removed"], "by": c["by"], "calibration_kl": round(c["kl"], 4)}
                              for c in measured["select"]["candidates"]), key=lambda c: c["calibration_kl"]),
        "measured_select_seconds": round(measured_s, 1)}), flush=True)


if __name__ == "__main__":
    main()
