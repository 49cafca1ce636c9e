"""Heal throughput on a CUDA GPU at Qwen2.5-3B scale (random weights, no download).

Builds a teacher of Qwen2.5-3B-Instruct's shape (36 layers) and a student of 28 layers (layers
24-31 of the teacher removed, as a layer map), and runs the heal loop (``ollama_compress.trainer``)
with the recipe's default settings at seq 2048, for ``train: neighbours`` and ``train: all``.
Reports tokens/s, model FLOPs utilisation and peak GPU memory.

MFU counts, per trained token, 2 N_teacher (teacher forward) + 6 N_student (student forward and
backward, as if every weight trained) + attention (PaLM: 4 L d T teacher forward, 12 L d T student),
N without the embedding table, divided by the GPU's dense bf16 peak (--peak-tflops, default 989
for H100/H200 SXM). On a machine without CUDA it says so and exits 0.

    python bench/heal_throughput.py [--seq-len 2048] [--batch 8] [--steps 6] [--modes neighbours all]
"""
from __future__ import annotations

import argparse
import json
import sys
import time

QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                 vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, use_sliding_window=False)
REMOVED = list(range(24, 32))


def build(num_layers: int, dtype, device):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("qwen2", num_hidden_layers=num_layers, **QWEN25_3B)
    config._attn_implementation = "sdpa"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model


def non_embedding_params(model) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if "embed_tokens" not in n and "lm_head" not in n)


def flops_per_token(teacher, student, seq_len: int) -> float:
    cfg_t, cfg_s = teacher.config, student.config
    d = cfg_t.hidden_size
    head = 2 * d * cfg_t.vocab_size  # LM head forward per token
    teacher_f = 2 * non_embedding_params(teacher) + head + 4 * cfg_t.num_hidden_layers * d * seq_len
    student_f = 6 * non_embedding_params(student) + 3 * head + 12 * cfg_s.num_hidden_layers * d * seq_len
    return teacher_f + student_f


def run_mode(mode: str, args) -> dict:
    import torch

    from ollama_compress import distill, trainer
    from ollama_compress.recipe import Heal

    defaults = Heal()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    device = "cuda"
    teacher = build(36, torch.bfloat16, device).eval().requires_grad_(False)
    student = build(36, torch.float32, device)
    from ollama_compress.hooks.prune import prune_model

    prune_model(student, REMOVED)
    s2t = [i for i in range(36) if i not in REMOVED]
    student = trainer.select_trainable(student, mode, s2t)
    student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    stream = torch.randint(0, QWEN25_3B["vocab_size"], (args.seq_len * args.batch * 4,)).tolist()
    cfg = trainer.TrainConfig(steps=args.warmup + args.steps, lr=defaults.lr, batch_size=args.batch,
                              micro_batch=args.micro or args.batch, seq_len=args.seq_len,
                              temperature=defaults.temperature, warmup=1)
    terms = distill.loss_terms(defaults.loss)
    run = trainer.Trainer(student, teacher, terms, stream, cfg, device=device, compute_dtype=torch.bfloat16,
                          student_to_teacher=s2t, matched_layers=list(range(len(s2t))),
                          vocab=QWEN25_3B["vocab_size"])
    times: list[float] = []

    def on_step(record):
        if "seconds" in record:
            torch.cuda.synchronize()
            times.append(record["seconds"])

    run.on_step = on_step
    run.run()
    timed = times[args.warmup:]
    tokens_per_s = args.batch * args.seq_len * len(timed) / sum(timed)
    mfu = tokens_per_s * flops_per_token(teacher, student, args.seq_len) / (args.peak_tflops * 1e12)
    result = {"mode": mode, "seq_len": args.seq_len, "batch": args.batch, "micro_batch": run.state.micro_batch,
              "tokens_per_s": round(tokens_per_s, 1), "mfu": round(mfu, 4),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "losses": list(default_loss_names(defaults))}
    del run, student, teacher
    return result


def default_loss_names(defaults) -> list[str]:
    return [k for k, v in defaults.loss.items() if v > 0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro", type=int, default=None, help="micro-batch (default: the batch; halved on OOM)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--modes", nargs="+", default=["neighbours", "all"])
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("heal_throughput: needs a CUDA GPU; none is visible here, nothing measured")
        return 0
    print(f"device: {torch.cuda.get_device_name()}", file=sys.stderr)
    for mode in args.modes:
        started = time.perf_counter()
        result = run_mode(mode, args)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
