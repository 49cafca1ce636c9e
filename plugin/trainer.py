"""The heal training loop: distil a pruned student from its frozen teacher, on CUDA, MPS or CPU.

* Precision: fp32 master weights and optimizer state; the forward runs under bf16 autocast on
  CUDA and on CPUs with native bf16 (AVX-512 BF16 or AMX, about 4x the fp32 matmul rate), losses
  are accumulated in fp32. The teacher is loaded in bf16 when the forward runs in bf16.
* Memory: only the layer outputs some loss uses are kept (forward hooks), the KL is computed in
  token chunks from the final hidden states (``distill.head_loss``); micro-batches with gradient
  accumulation; an out-of-memory error in the first step halves the micro-batch (down to 1) and
  keeps the effective batch; optional gradient checkpointing (default on for CUDA).
* Never loses work: an atomic checkpoint (trainable weights, optimizer, scheduler, RNG, step)
  every ``checkpoint_every`` steps, a resume that reaches the same weights as an uninterrupted
  run (the batch of step k depends only on the seed and k), a non-finite loss stops without
  touching the last good checkpoint, SIGINT/SIGTERM save a checkpoint and stop.
* Multi-GPU: run the same command under ``accelerate launch`` (data parallel): each process
  takes every n-th sequence of a step and gradients are averaged before the optimizer step.
"""
from __future__ import annotations

import json
import math
import os
import re
import signal
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .distill import Batch, ForwardOut, Head, LossTerm, combined_loss, plain_kl
from .errors import StageFailed, UserError
from .fsutil import atomic_path, write_json

CHECKPOINT_RE = re.compile(r"^step-(\d{7})$")
STATE_FILE = "state.json"


class HealInterrupted(StageFailed):
    """SIGINT or SIGTERM during heal: a checkpoint was saved; exit like the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# ---------------------------------------------------------------- device and precision
def cpu_has_bf16() -> bool:
    """Whether this CPU multiplies bf16 natively (AVX-512 BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(avx512_bf16|amx_bf16)\b", flags))


def autocast_dtype(device: str, setting: str) -> torch.dtype | None:
    """The autocast dtype for ``heal.dtype`` on ``device`` (None: plain fp32)."""
    kind = device.split(":")[0]
    if setting == "float32":
        return None
    if setting == "bfloat16":
        return torch.bfloat16
    if kind == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else None
    if kind == "cpu":
        return torch.bfloat16 if cpu_has_bf16() else None
    return None


def autocast(device: str, dtype: torch.dtype | None):
    if dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


# ---------------------------------------------------------------- model access
def decoder(model) -> Any:
    """The inner decoder (``.layers``, ``.norm``) of a causal LM, through a peft wrapper if any."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.model


def head_of(model) -> Head:
    linear = model.get_output_embeddings()
    return Head(linear.weight, linear.bias, getattr(model.config, "final_logit_softcapping", None) or None)


@contextmanager
def capture_layers(model, indices: list[int]) -> Iterator[dict[int, torch.Tensor]]:
    """Collect the outputs of decoder layers ``indices`` during forward passes in the block.

    Recomputations during a checkpointed backward are ignored (``captured`` is filled only once
    per key until cleared).
    """
    captured: dict[int, torch.Tensor] = {}
    handles = []
    layers = decoder(model).layers
    for index in indices:
        def hook(module, args, output, _i=index):
            if _i not in captured:
                captured[_i] = output[0] if isinstance(output, tuple) else output
        handles.append(layers[index].register_forward_hook(hook))
    try:
        yield captured
    finally:
        for handle in handles:
            handle.remove()


def forward(model, input_ids: torch.Tensor, mask: torch.Tensor, layers: list[int]) -> ForwardOut:
    """Final hidden states, the captured layer outputs and the head; no logits."""
    inner = decoder(model)
    with capture_layers(model, layers) as captured:
        attention = None if bool(mask.all()) else mask.long()
        out = inner(input_ids=input_ids, attention_mask=attention, use_cache=False)
        found = dict(captured)
    return ForwardOut(final=out.last_hidden_state, head=head_of(model), layers=found, norm=inner.norm)


# ---------------------------------------------------------------- what trains
def neighbour_layers(student_to_teacher: list[int]) -> list[int]:
    """Student layers next to a cut: their teacher neighbour below or above was removed."""
    kept = set(student_to_teacher)
    first, last = min(kept), max(kept)
    return [s for s, t in enumerate(student_to_teacher)
            if (t - 1 >= 0 and t - 1 not in kept and t > first) or (t + 1 not in kept and t < last)]


def select_trainable(model, mode: str, student_to_teacher: list[int] | None, lora_rank: int = 16):
    """Freeze everything except what ``mode`` trains; return the (possibly peft-wrapped) model.

    all: every decoder layer and the final norm (embeddings and LM head stay the teacher's);
    neighbours: the layers next to each cut and the final norm (as ILD); lora: LoRA adapters on
    the decoder's linear layers (peft), merged back before saving.
    """
    model.requires_grad_(False)
    inner = decoder(model)
    if mode == "lora":
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise UserError("heal.train: lora needs peft: pip install 'ollama-compress[lora]'") from None
        config = LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, lora_dropout=0.0,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
        return get_peft_model(model, config)
    if mode == "all":
        inner.layers.requires_grad_(True)
    elif mode == "neighbours":
        if student_to_teacher is None:
            raise UserError("heal.train: neighbours needs the student's layer_map.json (a model written by prune); "
                            "use train: all")
        for index in neighbour_layers(student_to_teacher):
            inner.layers[index].requires_grad_(True)
    else:
        raise UserError(f"heal.train: unknown mode '{mode}'; use all, neighbours or lora")
    inner.norm.requires_grad_(True)
    return model


def trainable_parameters(model) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ---------------------------------------------------------------- data
def step_windows(stream: list[int], step: int, count: int, seq_len: int, seed: int) -> torch.Tensor:
    """The ``count`` token windows of optimizer step ``step``: a function of (seed, step) only."""
    if len(stream) < seq_len + 1:
        raise UserError(f"the heal text has only {len(stream)} tokens, fewer than seq_len={seq_len}; "
                        "give more text (data.heal) or a smaller seq_len")
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts = torch.randint(0, len(stream) - seq_len + 1, (count,), generator=gen).tolist()
    return torch.tensor([stream[s:s + seq_len] for s in starts], dtype=torch.long)


# ---------------------------------------------------------------- schedule
def lr_factor(step: int, steps: int, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup, then decay to 10%."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, steps - warmup)
    if schedule == "linear":
        return 1.0 - 0.9 * progress
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------- checkpoints
def latest_checkpoint(directory: Path) -> Path | None:
    """The newest complete checkpoint (a renamed ``step-NNNNNNN`` directory with its state file)."""
    if not directory.is_dir():
        return None
    found = [p for p in directory.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: p.name) if found else None


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, state: dict[str, Any]) -> Path:
    """Write checkpoint ``step`` atomically and drop older ones; return its path."""
    from safetensors.torch import save_file

    final = directory / f"step-{step:07d}"
    with atomic_path(final, is_dir=True) as tmp:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in trainable_parameters(model).items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
                   tmp / "optimizer.pt")
        write_json(tmp / STATE_FILE, {**state, "step": step})
    for old in directory.iterdir():
        if old != final and CHECKPOINT_RE.match(old.name):
            import shutil

            shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict[str, Any]:
    from safetensors.torch import load_file

    params = trainable_parameters(model)
    weights = load_file(str(path / "trainable.safetensors"))
    if set(weights) != set(params):
        raise UserError(f"checkpoint {path} holds different trainable weights than these settings train; "
                        "resume with the settings it was made with")
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
    extra = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"]["cpu"])
    if "cuda" in extra["rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(extra["rng"]["cuda"])
    return json.loads((path / STATE_FILE).read_text())


# ---------------------------------------------------------------- signals
@contextmanager
def stop_on_signals() -> Iterator[dict[str, int]]:
    """While inside, SIGINT/SIGTERM only set ``flag["signal"]``; the loop saves and stops."""
    flag: dict[str, int] = {}
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        if "signal" in flag:  # a second signal: stop now
            raise KeyboardInterrupt
        flag["signal"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


# ---------------------------------------------------------------- evaluation
@torch.no_grad()
def heldout_metrics(student, teacher, windows: torch.Tensor, device: str, vocab: int,
                    teacher_cache: list | None = None) -> dict[str, float]:
    """KL(teacher || student) at T=1, top-1 agreement, and perplexity, over held-out windows (fp32)."""
    was_training = student.training
    student.eval()
    kl_sum = agree = nll = count = 0.0
    teacher_nll = 0.0
    for i, row in enumerate(windows):
        ids = row[None].to(device)
        mask = torch.ones_like(ids, dtype=torch.bool)
        if teacher_cache is not None and i < len(teacher_cache):
            zt = teacher_cache[i]
        else:
            t = forward(teacher, ids, mask, [])
            zt = t.head.sliced(vocab).logits(t.final[0])
            if teacher_cache is not None:
                teacher_cache.append(zt)
        s = forward(student, ids, mask, [])
        zs = s.head.sliced(vocab).logits(s.final[0])
        kl_sum += float(plain_kl(zs, zt)) * zs.shape[0]
        agree += float((zs.argmax(-1) == zt.argmax(-1)).sum())
        nll += float(torch.nn.functional.cross_entropy(zs[:-1], ids[0, 1:], reduction="sum"))
        teacher_nll += float(torch.nn.functional.cross_entropy(zt[:-1].float(), ids[0, 1:], reduction="sum"))
        count += zs.shape[0]
    student.train(was_training)
    pairs = count - len(windows)
    return {"kl": kl_sum / count, "top1": agree / count, "ppl": math.exp(nll / pairs),
            "teacher_ppl": math.exp(teacher_nll / pairs)}


# ---------------------------------------------------------------- the loop
@dataclass
class TrainConfig:
    steps: int
    lr: float
    batch_size: int
    micro_batch: int
    seq_len: int
    temperature: float
    schedule: str = "cosine"
    warmup: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    checkpoint_every: int = 0
    seed: int = 0
    chunk_tokens: int = 1024


@dataclass
class TrainState:
    step: int = 0
    micro_batch: int = 1
    log: list[dict[str, Any]] = field(default_factory=list)


Progress = Callable[[dict[str, Any]], None]


def init_distributed(device: str) -> str:
    """Join the process group when started by ``accelerate launch``/torchrun; return this process's device."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or not torch.distributed.is_available():
        return device
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        device = f"cuda:{local}"
        torch.cuda.set_device(local)
    if not torch.distributed.is_initialized():
        torch.distributed.init_process_group(backend="nccl" if device.startswith("cuda") else "gloo")
    return device


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Trainer:
    """One heal run over a token stream; ``run()`` returns the per-step log."""

    def __init__(self, student, teacher, terms: list[LossTerm], stream: list[int], config: TrainConfig, *,
                 device: str, compute_dtype: torch.dtype | None, student_to_teacher: list[int],
                 matched_layers: list[int], vocab: int, checkpoint_dir: Path | None = None,
                 fingerprint: str = "", on_step: Progress | None = None, log_file: Path | None = None):
        self.student, self.teacher, self.terms, self.stream, self.config = student, teacher, terms, stream, config
        self.device, self.compute_dtype, self.vocab = device, compute_dtype, vocab
        self.student_to_teacher, self.matched_layers = student_to_teacher, matched_layers
        self.checkpoint_dir, self.fingerprint, self.on_step, self.log_file = checkpoint_dir, fingerprint, on_step, log_file
        needs_layers = any(t.needs_layers for t in terms)
        self.student_layers = sorted(matched_layers) if needs_layers else []
        self.teacher_layers = sorted({student_to_teacher[s] for s in matched_layers}) if needs_layers else []
        params = list(trainable_parameters(student).values())
        if not params:
            raise UserError("heal has nothing to train with these settings; check heal.train")
        self.optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay,
                                           betas=(0.9, 0.95), foreach=True)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, config.steps, config.warmup, config.schedule))
        self.state = TrainState(micro_batch=config.micro_batch)
        self.rank, self.world = _distributed()

    # -------------------------------------------------------- checkpoints
    def resume(self, path: Path) -> int:
        state = load_checkpoint(path, self.student, self.optimizer, self.scheduler)
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(f"checkpoint {path} was made with other settings or models; "
                            "resume with the same ones, or delete it to start over")
        self.state = TrainState(step=state["step"], micro_batch=state["micro_batch"], log=state.get("log", []))
        return self.state.step

    def checkpoint(self) -> Path | None:
        if self.checkpoint_dir is None or self.rank != 0:
            return None
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        return save_checkpoint(self.checkpoint_dir, self.state.step, self.student, self.optimizer, self.scheduler,
                               {"fingerprint": self.fingerprint, "micro_batch": self.state.micro_batch,
                                "log": self.state.log})

    # -------------------------------------------------------- one step
    def _micro_step(self, ids: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
        mask = torch.ones_like(ids, dtype=torch.bool)
        batch = Batch(ids, mask, self.config.temperature, self.student_to_teacher, self.matched_layers,
                      self.config.chunk_tokens)
        with autocast(self.device, self.compute_dtype):
            with torch.no_grad():
                t_out = forward(self.teacher, ids, mask, self.teacher_layers)
            s_out = forward(self.student, ids, mask, self.student_layers)
            s_out.head, t_out.head = s_out.head.sliced(self.vocab), t_out.head.sliced(self.vocab)
            loss, values = combined_loss(self.terms, s_out, t_out, batch)
        if not torch.isfinite(loss):
            values["loss"] = loss.detach()
            return values
        (loss * scale).backward()
        values["loss"] = loss.detach()
        return values

    def _step(self, step: int) -> dict[str, float]:
        cfg = self.config
        windows = step_windows(self.stream, step, cfg.batch_size, cfg.seq_len, cfg.seed)
        mine = windows[self.rank::self.world]
        totals: dict[str, float] = {}
        micro = self.state.micro_batch
        for part in mine.split(micro):
            values = self._micro_step(part.to(self.device), part.shape[0] / len(mine))
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + float(v) * part.shape[0] / len(mine)
            if not math.isfinite(totals["loss"]):
                return totals
        if self.world > 1:
            for p in trainable_parameters(self.student).values():
                if p.grad is not None:
                    torch.distributed.all_reduce(p.grad)
                    p.grad /= self.world
        if cfg.grad_clip > 0:
            totals["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(
                list(trainable_parameters(self.student).values()), cfg.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def _first_step_with_oom_retry(self, step: int) -> dict[str, float]:
        while True:
            try:
                return self._step(step)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc) or self.state.micro_batch == 1:
                    if _is_oom(exc):
                        raise StageFailed("out of memory with micro_batch 1; use train: neighbours or lora, "
                                          "a smaller seq_len, or a device with more memory") from None
                    raise
                self.optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.state.micro_batch = max(1, self.state.micro_batch // 2)
                if self.on_step:
                    self.on_step({"message": f"out of memory: micro_batch halved to {self.state.micro_batch}"})

    # -------------------------------------------------------- the run
    def run(self) -> list[dict[str, Any]]:
        cfg = self.config
        self.student.train()
        self.teacher.eval()
        tokens_per_step = cfg.batch_size * cfg.seq_len
        started = time.perf_counter()
        done_here = 0
        with stop_on_signals() as flag:
            while self.state.step < cfg.steps:
                step = self.state.step
                t0 = time.perf_counter()
                if done_here == 0:
                    totals = self._first_step_with_oom_retry(step)
                else:
                    totals = self._step(step)
                if not math.isfinite(totals["loss"]):
                    kept = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
                    where = f"; the last good checkpoint is {kept}" if kept else ""
                    raise StageFailed(f"the heal loss became non-finite at step {step + 1}{where}; "
                                      "lower heal.lr or use heal.dtype: float32")
                seconds = time.perf_counter() - t0
                done_here += 1
                self.state.step = step + 1
                record = {"step": self.state.step, **{k: round(v, 6) for k, v in totals.items()},
                          "lr": self.scheduler.get_last_lr()[0], "seconds": round(seconds, 3),
                          "tokens_per_s": round(tokens_per_step / seconds, 1)}
                self.state.log.append(record)
                self._write_log(record)
                if self.on_step:
                    elapsed = time.perf_counter() - started
                    eta = elapsed / done_here * (cfg.steps - self.state.step)
                    self.on_step({**record, "eta_s": eta, "total": cfg.steps})
                if "signal" in flag:
                    path = self.checkpoint()
                    name = signal.Signals(flag["signal"]).name
                    raise HealInterrupted(f"{name} at step {self.state.step}: checkpoint saved at {path}; "
                                          "rerun with --resume to continue", flag["signal"])
                if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0 \
                        and self.state.step < cfg.steps:
                    self.checkpoint()
        return self.state.log

    def _write_log(self, record: dict[str, Any]) -> None:
        if self.log_file is None or self.rank != 0:
            return
        with open(self.log_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")


def rewrite_log(log_file: Path, records: list[dict[str, Any]]) -> None:
    """Make ``train_log.jsonl`` hold exactly ``records`` (after a resume)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(log_file) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def available_memory(device: str) -> int | None:
    """Bytes free on ``device`` (None when unknown)."""
    kind = device.split(":")[0]
    if kind == "cuda":
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free)
    if kind == "cpu":
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            return None
    return None
