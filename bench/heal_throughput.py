"""Heal throughput against the machine's own matmul rate, measured in the same run.

CPU mode (the default without CUDA): the demo's heal. Teacher: the embedded SmolLM2-135M-Instruct
(30 layers); student: the teacher pruned to 24 layers by block influence (``bench/heal.py``'s);
batch 4 x seq 256, ``kl`` + ``hidden_mse``, train all, ``heal.dtype: auto``, through
``hooks.heal.heal_model`` (the function behind the heal stage and command). In the same process it
first measures the CPU's bf16 and fp32 matmul rates at the heal's shapes with
``machine.matmul_rate`` (the measurement ``heal.dtype: auto`` decides by; the heal reuses it).
Then ``--warmup`` untimed steps (by default the trainer's own ``WARMUP_STEPS``, which are slower),
``--steps`` timed ones and one profiled step. Held-out checks are off (``heal.eval_every=0``): the
figure is the training step, and a check inside a timed step would be counted as training.

It prints one JSON line: tokens/s, achieved GFLOP/s counting (2 x teacher params + 6 x student
params) per token, the ratio to the faster matmul rate (the issue's goal: >= 0.6), peak RSS, the
heal's dtype choice; and writes the profile of one step (backward functions and the optimizer, then top ops by self CPU time)
to ``--profile-out``. About 3-5 minutes on a 2-core CPU; run it with nothing else running:

    python bench/heal_throughput.py --cpu [--steps 8] [--profile-out runs/bench-heal/profile-step.txt]

GPU mode (with CUDA, or ``--gpu``): a teacher of Qwen2.5-3B-Instruct's shape (36 layers, random
weights) and a 28-layer student (layers 24-31 removed) at seq 2048, for ``train: neighbours`` and
``train: all``; tokens/s, model FLOPs utilisation against ``--peak-tflops`` (PaLM count: N without
embeddings, attention added) and against the bf16 matmul rate measured here, peak GPU memory.

    python bench/heal_throughput.py --gpu [--seq-len 2048] [--batch 8] [--steps 6] [--modes neighbours all]
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path

QWEN25_3B = dict(hidden_size=2048, intermediate_size=11008, num_attention_heads=16, num_key_value_heads=2,
                 vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, use_sliding_window=False)
REMOVED = list(range(24, 32))


def stated_flops_per_token(teacher_params: int, student_params: int) -> float:
    """The issue's count: teacher forward 2 N_teacher, student forward and backward 6 N_student."""
    return 2.0 * teacher_params + 6.0 * student_params


def peak_rss_gib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)


# ---------------------------------------------------------------- CPU: the demo's heal
class StepClock:
    """Times each optimizer step (any optimizer, through torch's global step hook) and profiles one."""

    def __init__(self, profile_step: int, profile_out: Path):
        self.ends: list[float] = [time.perf_counter()]
        self.profile_step, self.profile_out = profile_step, profile_out
        self.profiler = None

    def __enter__(self) -> "StepClock":
        from torch.optim.optimizer import register_optimizer_step_post_hook

        self.handle = register_optimizer_step_post_hook(self._after_step)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            self.profiler = None

    def _after_step(self, optimizer, args, kwargs) -> None:
        import torch

        self.ends.append(time.perf_counter())
        done = len(self.ends) - 1
        if self.profiler is not None:
            self.profiler.__exit__(None, None, None)
            write_profile(self.profiler, self.profile_out)
            self.profiler = None
        if done == self.profile_step - 1:
            self.profiler = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])
            self.profiler.__enter__()

    def step_seconds(self) -> list[float]:
        return [b - a for a, b in zip(self.ends, self.ends[1:])]


def write_profile(profiler, path: Path) -> None:
    averages = profiler.key_averages()
    sections = [e for e in averages if e.key.startswith(("Optimizer.step", "autograd::engine"))]
    total = sum(e.self_cpu_time_total for e in averages) or 1
    lines = ["# one heal step: backward functions and the optimizer step (CPU time inside each, ms)"]
    lines += [f"{e.cpu_time_total / 1e3:10.1f}  {e.key}" for e in sorted(sections, key=lambda e: -e.cpu_time_total)]
    lines += ["", f"# top ops by self CPU time (ms, share of {total / 1e3:.0f} ms)"]
    for e in sorted(averages, key=lambda e: -e.self_cpu_time_total)[:30]:
        lines.append(f"{e.self_cpu_time_total / 1e3:10.1f}  {100 * e.self_cpu_time_total / total:5.1f}%  "
                     f"{e.count:6d}x  {e.key}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def run_cpu(args) -> dict:
    import torch
    from heal import heal_once, teacher_and_pruned  # bench/heal.py: the demo's teacher and cut, heal_model

    from ollama_compress import machine, modelio

    from ollama_compress.hooks.heal import command_settings
    from ollama_compress.planner import parameter_count

    threads = machine.use_physical_cores()
    teacher, pruned = teacher_and_pruned()
    steps = args.warmup + args.steps + 1
    overrides = [f"heal.steps={steps}", "heal.checkpoint_every=0", "heal.eval_every=0", "data.heal={from: default}",
                 "data.heldout={from: default, split: heldout, samples: 2, seq_len: 256}", *args.overrides]
    settings, _ = command_settings(str(pruned), overrides)  # the demo's heal: the recipe defaults
    tokens = settings.batch_size * settings.seq_len
    micro = (settings.micro_batch or settings.batch_size) * settings.seq_len
    config = modelio.read_config(pruned)
    shapes = machine.heal_shapes(micro, config["hidden_size"], config["intermediate_size"], config["vocab_size"])
    rates = dict(machine.measure_rates(tuple(shapes)))  # cached: the heal's dtype: auto decides by these
    with StepClock(profile_step=steps, profile_out=args.profile_out) as clock:
        result = heal_once("throughput", overrides)
    timed = clock.step_seconds()[args.warmup:args.warmup + args.steps]
    tokens_per_s = tokens * len(timed) / sum(timed)
    flops = stated_flops_per_token(parameter_count(teacher), parameter_count(pruned))
    achieved = tokens_per_s * flops / 1e9
    best = max(rates.values())
    # The probe above caps rows to stay short; the machine's dense rate is measured at the heal's
    # full micro-batch shapes, in the dtype the heal chose, after the heal (same process, same load).
    full = [(micro, config["hidden_size"], config["intermediate_size"]),
            (micro, config["intermediate_size"], config["hidden_size"]),
            (config["intermediate_size"], micro, config["hidden_size"]),
            (micro, config["hidden_size"], config["vocab_size"])]
    chosen = getattr(torch, (result.get("dtype") or {}).get("name", "float32"))
    dense = machine.matmul_rate(chosen, full, seconds=8.0)
    return {"mode": "cpu", "threads": threads, "torch": torch.__version__,
            "matmul_gflops": {k: round(v, 1) for k, v in rates.items()}, "shapes": shapes,
            "dtype": result.get("dtype"), "steps_timed": len(timed),
            "step_s": [round(s, 2) for s in timed], "tokens_per_s": round(tokens_per_s, 1),
            "gflop_per_token": round(flops / 1e9, 4), "achieved_gflops": round(achieved, 1),
            "ratio_to_faster_matmul": round(achieved / best, 3),
            "dense_gflops_full_shapes": round(dense, 1), "ratio_to_dense_rate": round(achieved / dense, 3),
            "peak_rss_gib": peak_rss_gib(),
            "profile": str(args.profile_out), "heal_wall_s": result["wall_s"]}


# ---------------------------------------------------------------- GPU: Qwen2.5-3B shape
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


def all_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def flops_per_token(teacher, student, seq_len: int) -> float:
    cfg_t, cfg_s = teacher.config, student.config
    d = cfg_t.hidden_size
    head = 2 * d * cfg_t.vocab_size  # LM head forward per token
    teacher_f = 2 * non_embedding_params(teacher) + head + 4 * cfg_t.num_hidden_layers * d * seq_len
    student_f = 6 * non_embedding_params(student) + 3 * head + 12 * cfg_s.num_hidden_layers * d * seq_len
    return teacher_f + student_f


def run_mode(mode: str, args, bf16_gflops: float) -> dict:
    import torch

    from ollama_compress import trainer
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
    cfg = trainer.TrainConfig.from_heal(
        defaults, steps=args.warmup + args.steps, batch_size=args.batch, micro_batch=args.micro or args.batch,
        seq_len=args.seq_len, warmup=1, checkpoint_every=0, patience=0, device=device, compute_dtype=torch.bfloat16,
        student_to_teacher=s2t, matched_layers=list(range(len(s2t))), vocab=QWEN25_3B["vocab_size"])
    run = trainer.Trainer(student, teacher, stream, cfg)
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
    stated = tokens_per_s * stated_flops_per_token(all_params(teacher), all_params(student)) / 1e9
    result = {"mode": mode, "seq_len": args.seq_len, "batch": args.batch, "micro_batch": run.state.micro_batch,
              "tokens_per_s": round(tokens_per_s, 1), "mfu": round(mfu, 4),
              "ratio_to_bf16_matmul": round(stated / bf16_gflops, 3),
              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
              "losses": list(default_loss_names(defaults))}
    del run, student, teacher
    return result


def default_loss_names(defaults) -> list[str]:
    return [k for k, v in defaults.loss.items() if v > 0]


def run_gpu(args) -> int:
    import torch

    from ollama_compress import machine

    print(f"device: {torch.cuda.get_device_name()}", file=sys.stderr)
    cfg = QWEN25_3B
    shapes = [(args.batch * args.seq_len, cfg["hidden_size"], cfg["intermediate_size"]),
              (args.batch * args.seq_len, cfg["intermediate_size"], cfg["hidden_size"])]
    bf16 = machine.matmul_rate(torch.bfloat16, shapes, device="cuda", seconds=2.0)
    print(json.dumps({"matmul_gflops": {"bfloat16": round(bf16, 1)}}))
    for mode in args.modes:
        started = time.perf_counter()
        result = run_mode(mode, args, bf16)
        result["wall_s"] = round(time.perf_counter() - started, 1)
        print(json.dumps(result))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--cpu", action="store_true", help="the demo's heal on this CPU (default without CUDA)")
    where.add_argument("--gpu", action="store_true", help="the Qwen2.5-3B-shaped heal on CUDA")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default: cpu 8, gpu 6)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default: cpu the trainer's WARMUP_STEPS, gpu 2)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="cpu: a heal.* or data.* override (e.g. heal.dtype=float32)")
    parser.add_argument("--profile-out", type=Path, default=Path("runs/bench-heal/profile-step.txt"))
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--micro", type=int, default=None, help="micro-batch (default: the batch; halved on OOM)")
    parser.add_argument("--modes", nargs="+", default=["neighbours", "all"])
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    args = parser.parse_args()
    import torch

    gpu = args.gpu or (not args.cpu and torch.cuda.is_available())
    if gpu and not torch.cuda.is_available():
        print("heal_throughput --gpu: needs a CUDA GPU; none is visible here, nothing measured")
        return 0
    if args.steps is None:
        args.steps = 6 if gpu else 8
    if args.warmup is None:
        from ollama_compress.trainer import WARMUP_STEPS

        args.warmup = 2 if gpu else WARMUP_STEPS
    args.warmup = max(args.warmup, 0 if gpu else 1)  # cpu: the first step's time also holds the loading
    if gpu:
        return run_gpu(args)
    print(json.dumps(run_cpu(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
