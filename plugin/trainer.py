"""The heal training loop: distil a pruned student from its frozen teacher, on CUDA, MPS or CPU.

* Precision: fp32 master weights and optimizer state; the forward runs under bf16 autocast on
  CUDA and on CPUs whose bf16 matmuls measure faster than fp32 ones (``machine.choose_dtype``:
  CPU flags do not tell), losses are accumulated in fp32. The teacher is loaded in bf16 when the
  forward runs in bf16.
* Memory: only the layer outputs some loss uses are kept (forward hooks), the KL is computed in
  token chunks from the final hidden states (``distill.head_loss``); micro-batches with gradient
  accumulation; an out-of-memory error in the first step halves the micro-batch (down to 1) and
  keeps the effective batch; optional gradient checkpointing (default on for CUDA).
* Never loses work: an atomic checkpoint (trainable weights, optimizer, scheduler, RNG, step)
  every ``checkpoint_every`` steps, a resume that reaches the same weights as an uninterrupted
  run (the batch of step k depends only on the seed and k), a non-finite loss stops without
  touching the last good checkpoint, SIGINT/SIGTERM save a checkpoint and stop.
* Several processes: ``accelerate.Accelerator`` prepares the student (DDP, or FSDP from an
  ``accelerate launch --config_file`` with FSDP), its optimizer and scheduler; the frozen teacher is
  prepared by the same accelerator (replicated under DDP, sharded under FSDP). Each process takes
  every n-th sequence of a step; micro-batches accumulate under ``Accelerator.no_sync`` and the
  gradients are synchronised once, by the engine, on the last one. Stop decisions (signal,
  non-finite loss, budget, plateau) are taken together; only rank 0 writes files.
* Held-out KL every ``eval_every`` steps: the best weights (lowest KL) are kept and are what the
  heal outputs; ``patience`` evaluations without improvement stop the heal early.
"""
from __future__ import annotations

import json
import math
import re
import signal
import threading
import time
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

from .distill import Batch, ForwardOut, Head, LossTerm, combined_loss
from .errors import StageFailed, UserError
from .fsutil import atomic_path, make_dir, move_made, remove_made, write_json
from .machine import MatmulShape, choose_dtype, heal_shapes
from .modelio import capture_outputs
from .recipe import Heal
from .reference import QualityMeter, log_softmax

DEFAULT_SHAPES = tuple(heal_shapes(1024, 576, 1536, 49152))  # the demo's (SmolLM2-135M) when none given
CHECKPOINT_RE = re.compile(r"step-(\d{7})")
STATE_FILE = "state.json"
BEST_FILE = "best.safetensors"  # trainable weights at the best held-out KL so far


class HealInterrupted(StageFailed):
    """SIGINT or SIGTERM during heal: a checkpoint was saved; exit like the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


# ---------------------------------------------------------------- device and precision
def autocast_dtype(device: str, setting: str, shapes: Sequence[MatmulShape] = DEFAULT_SHAPES) -> torch.dtype | None:
    """The autocast dtype for ``heal.dtype`` on ``device`` (None: plain fp32); on a CPU, ``auto``
    measures bf16 and fp32 matmuls of ``shapes`` (``machine.choose_dtype``, once per process)."""
    return choose_dtype(device, setting, shapes).dtype


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


def capture_layers(model, indices: list[int]) -> AbstractContextManager[dict[int, torch.Tensor]]:
    """Collect the outputs of decoder layers ``indices`` during forward passes in the block
    (``modelio.capture_outputs``: recomputations during a checkpointed backward are ignored)."""
    layers = decoder(model).layers
    return capture_outputs({index: layers[index] for index in indices})


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


def adamw_kernel(params: list[torch.nn.Parameter]) -> dict[str, bool]:
    """One fused pass over the weights where torch has that kernel for them (CPU, CUDA), else foreach."""
    fused = bool(params) and all(p.device.type in ("cpu", "cuda") and p.dtype.is_floating_point for p in params)
    return {"fused": True} if fused else {"foreach": True}


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
def lr_factor(step: int, steps: int | None, warmup: int, schedule: str) -> float:
    """Multiplier of the peak lr at ``step`` (0-based): linear warmup, then decay to 10% at ``steps``
    (``None``: not known yet, as in a minutes budget's first steps: the peak is held)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or steps is None:
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
    found = [p for p in directory.iterdir() if CHECKPOINT_RE.fullmatch(p.name) and (p / STATE_FILE).is_file()]
    return max(found, key=lambda p: p.name) if found else None


def save_checkpoint(directory: Path, step: int, model, optimizer, scheduler, state: dict[str, Any],
                    best: dict[str, torch.Tensor] | None = None) -> Path:
    """Write checkpoint ``step`` atomically and drop older ones; return its path."""
    from safetensors.torch import save_file

    final = directory / f"step-{step:07d}"
    with atomic_path(final, is_dir=True) as tmp:
        weights = {k: v.detach().to("cpu").contiguous() for k, v in trainable_parameters(model).items()}
        save_file(weights, str(tmp / "trainable.safetensors"))
        if best is not None:
            save_file({k: v.contiguous() for k, v in best.items()}, str(tmp / BEST_FILE))
        rng = {"cpu": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state_all()
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": rng},
                   tmp / "optimizer.pt")
        write_json(tmp / STATE_FILE, {**state, "step": step})
    _drop_older(directory, final)
    return final


def _drop_older(directory: Path, final: Path) -> None:
    for old in directory.iterdir():
        if old != final and CHECKPOINT_RE.fullmatch(old.name):
            remove_made(old)


def save_sharded_checkpoint(accelerator, final: Path, state: dict[str, Any]) -> None:
    """FSDP: every process writes its shards with ``Accelerator.save_state`` into a temporary directory
    that rank 0 completes with the state file and renames (the best weights are not kept across a
    resume here)."""
    tmp = final.with_name(f".{final.name}.tmp-sharded")
    if accelerator.is_main_process:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_made(tmp)  # an interrupted earlier attempt of this tool's, never a folder of the user's
        make_dir(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json(tmp / STATE_FILE, {**state, "step": int(final.name.split("-")[1])})
        move_made(tmp, final)
        _drop_older(final.parent, final)


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
    """KL(teacher || student) at T=1, top-1 agreement and perplexity over held-out windows (fp32),
    summed by ``reference.QualityMeter`` like evaluate's. The teacher's log-probabilities of window
    i are ``teacher_cache[i]`` when there (the cached teacher reference's rows, or this list filled
    by an earlier call); otherwise ``teacher`` computes them."""
    was_training = student.training
    student.eval()
    meter, teacher_meter = QualityMeter(), QualityMeter()
    for i, row in enumerate(windows):
        ids = row[None].to(device)
        if teacher_cache is not None and i < len(teacher_cache):
            reference = shared_vocab_rows(teacher_cache[i], vocab)
        else:
            reference = _log_probs(teacher, ids, vocab)
            if teacher_cache is not None:
                teacher_cache.append(reference)
        targets = row[1:].cpu().numpy()
        meter.add(_log_probs(student, ids, vocab), reference, targets)
        teacher_meter.add_nll(reference, targets)
    student.train(was_training)
    figures = meter.result()
    return {"kl": figures["kl"], "top1": figures["top1_agreement"], "ppl": figures["perplexity"],
            "teacher_ppl": teacher_meter.result()["perplexity"]}


def _log_probs(model, ids: torch.Tensor, vocab: int):
    """Log-softmax over the first ``vocab`` logits at each position but the last, as numpy."""
    out = _run_forward(model, ids, torch.ones_like(ids, dtype=torch.bool), [])
    logits = out.head.sliced(vocab).logits(out.final[0])[:-1].float()
    return torch.log_softmax(logits, dim=-1).cpu().numpy()


def shared_vocab_rows(log_probs, vocab: int):
    """``log_probs`` over the first ``vocab`` tokens, renormalised when the reference has more."""
    import numpy as np

    rows = np.asarray(log_probs[:, :vocab], dtype=np.float32)
    return rows if log_probs.shape[1] == vocab else log_softmax(rows)


# ---------------------------------------------------------------- the loop
@dataclass
class TrainConfig:
    """Everything one heal run keeps fixed: the hyperparameters (``from_heal``: the recipe's ``heal``
    section), where it runs, how student layers pair with teacher layers, and where it checkpoints."""

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
    eval_every: int = 0  # steps between held-out evaluations (0: none)
    patience: int = 0  # evaluations without improvement that stop the heal (0: never)
    budget_seconds: float | None = None  # heal.budget.minutes: ``steps`` is set after MEASURE_STEPS
    terms: list[LossTerm] = field(default_factory=list)  # the weighted losses (``distill.loss_terms``)
    device: str = "cpu"
    compute_dtype: torch.dtype | None = None  # autocast dtype; None: plain fp32
    student_to_teacher: list[int] = field(default_factory=list)  # the teacher layer of each student layer
    matched_layers: list[int] = field(default_factory=list)  # student layers a layer loss compares
    vocab: int = 0  # token ids both heads share
    checkpoint_dir: Path | None = None
    fingerprint: str = ""  # of the settings and models; a checkpoint of another one is refused
    log_file: Path | None = None  # train_log.jsonl, rewritten at each checkpoint

    @classmethod
    def from_heal(cls, settings: Heal, **given: Any) -> "TrainConfig":
        """The config of a heal per the recipe section ``settings``; ``given``: what the section does not
        hold (steps and warmup once derived, device, layer pairing, checkpoints) or overrides."""
        from .distill import loss_terms

        minutes = settings.budget.minutes if settings.budget is not None else None
        fields: dict[str, Any] = dict(
            lr=settings.lr, batch_size=settings.batch_size, micro_batch=settings.micro_batch or settings.batch_size,
            seq_len=settings.seq_len, temperature=settings.temperature, schedule=settings.schedule,
            weight_decay=settings.weight_decay, grad_clip=settings.grad_clip, checkpoint_every=settings.checkpoint_every,
            seed=settings.seed, patience=settings.patience, terms=loss_terms(settings.loss),
            budget_seconds=minutes * 60 if minutes is not None else None)
        return cls(**{**fields, **given})


@dataclass
class TrainState:
    step: int = 0
    micro_batch: int = 1
    log: list[dict[str, Any]] = field(default_factory=list)
    best_kl: float | None = None
    best_step: int = 0
    stale: int = 0  # evaluations since the last improvement
    planned_tokens: int | None = None  # what the heal text was sized for, once set after the first steps
    steps_fixed: bool = True  # False while a minutes budget's first steps run: the total is not known yet


Progress = Callable[[dict[str, Any]], None]


PROCESS_GROUP_TIMEOUT = timedelta(minutes=10)  # a collective that waits longer ends the run
MEASURE_STEPS = 5  # heal.budget.minutes: steps run before the total is set; the last 2 are timed
WARMUP_STEPS = 3  # the first steps run slower (allocations, kernels): 6.8, 6.4, 5.3, then 4.2-4.7 s in bf16
MIN_IMPROVEMENT = 1e-3  # relative drop of held-out KL that counts as progress for heal.patience


def make_accelerator(device: str):
    """The run's ``accelerate.Accelerator``; models are placed on ``process_device`` by the caller.

    Mixed precision stays ours (``autocast``), so accelerate's own is off; the scheduler steps once
    per optimizer step whatever the number of processes (each step is one global batch).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    return Accelerator(cpu=device.split(":")[0] == "cpu", mixed_precision="no", device_placement=False,
                       step_scheduler_with_optimizer=False,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=PROCESS_GROUP_TIMEOUT)])


def process_device(accelerator, requested: str) -> str:
    """This process's device: the requested one alone, the launcher's (cuda:LOCAL_RANK) with several."""
    if accelerator.num_processes == 1 or accelerator.device.type == "cpu":
        return requested
    if accelerator.device.type == "cuda":
        torch.cuda.set_device(accelerator.device)
    return str(accelerator.device)


def is_sharded(accelerator) -> bool:
    return accelerator.distributed_type.name == "FSDP"


class ForwardModule(torch.nn.Module):
    """``forward`` as a module call, so DDP/FSDP wrappers see every pass (hooks, gather/reshard)."""

    def __init__(self, model):
        super().__init__()
        self.model = model
        self._no_split_modules = getattr(model, "_no_split_modules", None)  # FSDP's auto-wrap reads it

    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor, layers: list[int]) -> ForwardOut:
        return forward(self.model, input_ids, mask, layers)


def _run_forward(model, ids: torch.Tensor, mask: torch.Tensor, layers: list[int]) -> ForwardOut:
    """A prepared ``ForwardModule`` (any wrapper) is called; a plain model goes through ``forward``."""
    inner = getattr(model, "module", model)
    if isinstance(inner, ForwardModule) or isinstance(model, ForwardModule):
        return model(ids, mask, layers)
    return forward(model, ids, mask, layers)


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower()


class Trainer:
    """One heal run over a token stream; ``run()`` returns the per-step log.

    ``evaluate`` (optional) returns the held-out KL of the student now (a float, or a dict with
    ``kl`` and other figures to log); it runs every ``config.eval_every`` steps and after the last
    one, in every process.
    """

    def __init__(self, student, teacher, stream: list[int], config: TrainConfig, *, on_step: Progress | None = None,
                 accelerator=None, evaluate: Callable[[], float | dict[str, float]] | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.student, self.teacher, self.stream, self.config = student, teacher, stream, config
        self.terms, self.device, self.vocab = config.terms, config.device, config.vocab
        self.compute_dtype = config.compute_dtype
        self.student_to_teacher, self.matched_layers = config.student_to_teacher, config.matched_layers
        self.checkpoint_dir, self.fingerprint, self.log_file = config.checkpoint_dir, config.fingerprint, config.log_file
        self.on_step, self.evaluate, self.clock = on_step, evaluate, clock
        needs_layers = any(t.needs_layers for t in self.terms)
        self.student_layers = sorted(self.matched_layers) if needs_layers else []
        self.teacher_layers = sorted({self.student_to_teacher[s] for s in self.matched_layers}) if needs_layers else []
        if not trainable_parameters(student):
            raise UserError("heal has nothing to train with these settings; check heal.train")
        self.accelerator = accelerator or make_accelerator(self.device)
        acc = self.accelerator
        self.rank, self.world, self.sharded = acc.process_index, acc.num_processes, is_sharded(acc)
        self.student_module = acc.prepare_model(ForwardModule(student))
        if self.sharded:  # sharded like the student; kept out of save_state (it never changes)
            self.teacher_module = acc.prepare_model(ForwardModule(teacher))
            acc._models = [m for m in acc._models if m is not self.teacher_module]
        else:  # replicated: DDP has nothing to do for a model without trainable weights
            self.teacher_module = ForwardModule(teacher)
        self.params = list(trainable_parameters(self.student_module).values())
        self.state = TrainState(micro_batch=config.micro_batch, steps_fixed=config.budget_seconds is None)
        optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay,
                                      betas=(0.9, 0.95), **adamw_kernel(self.params))
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(
            s, config.steps if self.state.steps_fixed else None, config.warmup, config.schedule))
        self.optimizer, self.scheduler = acc.prepare_optimizer(optimizer), acc.prepare_scheduler(scheduler)
        self.best: dict[str, torch.Tensor] | None = None  # trainable weights at the best held-out KL
        self.elapsed = 0.0  # seconds in ``run`` so far, across calls

    # -------------------------------------------------------- checkpoints
    def resume(self, path: Path) -> int:
        if self.sharded:
            self.accelerator.load_state(str(path))
            state = json.loads((path / STATE_FILE).read_text())
        else:
            state = load_checkpoint(path, self.student, self.optimizer, self.scheduler)
            best = path / BEST_FILE
            if best.is_file():
                from safetensors.torch import load_file

                self.best = load_file(str(best))
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(f"checkpoint {path} was made with other settings or models; "
                            "resume with the same ones, or delete it to start over")
        self.state = TrainState(step=state["step"], micro_batch=state["micro_batch"], log=state.get("log", []),
                                best_kl=state.get("best_kl"), best_step=state.get("best_step", 0),
                                stale=state.get("stale", 0), planned_tokens=state.get("planned_tokens"),
                                steps_fixed=state.get("steps_fixed", state["step"] >= MEASURE_STEPS))
        self.config.steps = state.get("steps_total", self.config.steps)
        if self.config.budget_seconds is not None and not self.state.steps_fixed:
            # stopped before the budget was timed: this process times its own first steps (the
            # seconds before the stop are not counted)
            self.config.steps = self.state.step + MEASURE_STEPS
        return self.state.step

    def _state_record(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "micro_batch": self.state.micro_batch, "log": self.state.log,
                "steps_total": self.config.steps, "best_kl": self.state.best_kl, "best_step": self.state.best_step,
                "stale": self.state.stale, "planned_tokens": self.state.planned_tokens,
                "steps_fixed": self.state.steps_fixed}

    def checkpoint(self) -> Path | None:
        """Save a resumable checkpoint (every process calls this; rank 0 writes, or all write shards)."""
        if self.checkpoint_dir is None:
            return None
        final = self.checkpoint_dir / f"step-{self.state.step:07d}"
        if self.sharded:
            save_sharded_checkpoint(self.accelerator, final, self._state_record())
        elif self.rank == 0:
            self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
            save_checkpoint(self.checkpoint_dir, self.state.step, self.student, self.optimizer, self.scheduler,
                            self._state_record(), best=self.best)
        self.accelerator.wait_for_everyone()
        return final

    # -------------------------------------------------------- one step
    def _micro_step(self, ids: torch.Tensor, scale: float) -> dict[str, torch.Tensor]:
        mask = torch.ones_like(ids, dtype=torch.bool)
        batch = Batch(ids, mask, self.config.temperature, self.student_to_teacher, self.matched_layers,
                      self.config.chunk_tokens)
        with autocast(self.device, self.compute_dtype):
            with torch.no_grad():
                t_out = self.teacher_module(ids, mask, self.teacher_layers)
            s_out = self.student_module(ids, mask, self.student_layers)
            s_out.head, t_out.head = s_out.head.sliced(self.vocab), t_out.head.sliced(self.vocab)
            loss, values = combined_loss(self.terms, s_out, t_out, batch)
        values["loss"] = loss.detach()
        # always: a process that skipped its backward would leave the others waiting in the gradient
        # all-reduce; a non-finite loss is caught after the step's losses are averaged over processes
        self.accelerator.backward(loss * scale)
        return values

    def _step(self, step: int) -> dict[str, float]:
        """One optimizer step over the global batch of ``step``; the loss terms are averaged over processes."""
        cfg = self.config
        windows = step_windows(self.stream, step, cfg.batch_size, cfg.seq_len, cfg.seed)
        mine = windows[self.rank::self.world]
        parts = list(mine.split(self.state.micro_batch))
        sums: dict[str, torch.Tensor] = {}
        for i, part in enumerate(parts):
            # accumulate locally; the engine synchronises gradients once, on the last micro-batch
            sync = nullcontext() if i == len(parts) - 1 else self.accelerator.no_sync(self.student_module)
            with sync:
                values = self._micro_step(part.to(self.device), part.shape[0] / len(mine))
            for k, v in values.items():
                sums[k] = sums.get(k, 0.0) + v.float().cpu() * part.shape[0] / len(mine)
        totals = self._mean_over_processes(sums)
        if not math.isfinite(totals["loss"]):
            self.optimizer.zero_grad(set_to_none=True)
            return totals
        if cfg.grad_clip > 0:
            params = list(self.student_module.parameters()) if self.sharded else self.params
            totals["grad_norm"] = float(self.accelerator.clip_grad_norm_(params, cfg.grad_clip))
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return totals

    def _mean_over_processes(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        names = sorted(sums)
        stacked = torch.stack([torch.as_tensor(sums[k], dtype=torch.float32) for k in names])
        if self.world > 1:
            stacked = self.accelerator.reduce(stacked.to(self.accelerator.device), reduction="mean").cpu()
        return {k: float(v) for k, v in zip(names, stacked)}

    def _first_step_with_oom_retry(self, step: int) -> dict[str, float]:
        while True:
            try:
                return self._step(step)
            except (torch.cuda.OutOfMemoryError, RuntimeError) as exc:
                if not _is_oom(exc):
                    raise
                if self.state.micro_batch == 1 or self.world > 1:
                    # several processes cannot retry one of them alone: the others wait in a collective
                    hint = "" if self.world == 1 else f"set heal.micro_batch below {self.state.micro_batch}, "
                    raise StageFailed(f"out of memory with micro_batch {self.state.micro_batch}; {hint}use "
                                      "train: neighbours or lora, a smaller seq_len, or a device with more "
                                      "memory") from None
                self.optimizer.zero_grad(set_to_none=True)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                self.state.micro_batch = max(1, self.state.micro_batch // 2)
                if self.on_step:
                    self.on_step({"message": f"out of memory: micro_batch halved to {self.state.micro_batch}"})

    # -------------------------------------------------------- held-out evaluation and the best weights
    def count_start(self, kl: float) -> None:
        """Make the untrained weights (held-out KL ``kl``) a candidate for the best, so a heal that only
        hurts gives the start back. Call before ``run`` on a fresh start, not after ``resume``."""
        checked = self.evaluate is not None and bool(self.config.eval_every)
        if checked and self.state.step == 0 and self.state.best_kl is None:
            self._keep_best(kl)

    def _keep_best(self, kl: float) -> None:
        self.state.best_kl, self.state.best_step = kl, self.state.step
        self.best = {k: v.detach().to("cpu", copy=True) for k, v in trainable_parameters(self.student).items()}

    def _evaluate(self) -> dict[str, Any]:
        """Held-out KL now (and whatever other figures ``evaluate`` gives, as ``heldout_<name>``); keep
        the weights when the KL is the best so far. Same result in every process."""
        figures = self.evaluate()
        figures = dict(figures) if isinstance(figures, dict) else {"kl": figures}
        kl = float(figures.pop("kl"))
        record: dict[str, Any] = {"heldout_kl": round(kl, 6),
                                  **{f"heldout_{name}": round(float(v), 6) for name, v in figures.items()}}
        best = self.state.best_kl
        if best is None or kl < best:
            self._keep_best(kl)
            record["best"] = True
        progress = best is None or kl < best * (1 - MIN_IMPROVEMENT)
        self.state.stale = 0 if progress else self.state.stale + 1
        return record

    def restore_best(self) -> int:
        """Put the best evaluated weights back into the student (the start's, counted by ``count_start``,
        when no check beat them); return their step (the last step when there was no evaluation)."""
        if self.best is None:
            return self.state.step
        params = trainable_parameters(self.student)
        with torch.no_grad():
            for name, value in self.best.items():
                params[name].copy_(value)
        return self.state.best_step

    def _plateau(self) -> bool:
        return bool(self.config.patience) and self.state.stale >= self.config.patience

    def _set_budget_steps(self, elapsed: float, seconds_per_step: float, eval_seconds: float) -> None:
        """heal.budget.minutes: the total steps that fit: ``elapsed`` seconds so far, then steps of the
        measured time (the steps after ``WARMUP_STEPS``) and their share of the evaluations."""
        cfg = self.config
        seconds = torch.tensor([[elapsed, seconds_per_step, eval_seconds]], dtype=torch.float64)
        if self.world > 1:  # every process takes the slowest one's figures, so all stop together
            seconds = self.accelerator.gather(seconds.to(self.accelerator.device)).cpu()
        spent, per_step, per_eval = (float(v) for v in seconds.max(dim=0).values)
        per_step_total = per_step + (per_eval / cfg.eval_every if cfg.eval_every else 0.0)
        cfg.steps = self.state.step + max(0, int((cfg.budget_seconds - spent) / per_step_total))
        self.state.steps_fixed = True

    # -------------------------------------------------------- the run
    def run(self, eval_seconds: float = 0.0, stop_at: int | None = None) -> list[dict[str, Any]]:
        """Train up to ``config.steps`` (set from the budget after MEASURE_STEPS when it is in minutes),
        or up to ``stop_at`` steps; a later call continues. ``eval_seconds``: the time of one held-out
        evaluation, counted in a minutes budget."""
        cfg = self.config
        self.student.train()
        self.teacher.eval()
        tokens_per_step = cfg.batch_size * cfg.seq_len
        started = self.clock()
        before = self.elapsed
        done_here = 0
        warmed = started  # the end of this call's WARMUP_STEPS-th step
        stopped_early = False
        with stop_on_signals() as flag:
            while self.state.step < min(cfg.steps, stop_at if stop_at is not None else cfg.steps):
                step = self.state.step
                t0 = self.clock()
                if done_here == 0:
                    totals = self._first_step_with_oom_retry(step)
                else:
                    totals = self._step(step)
                if not math.isfinite(totals["loss"]):
                    kept = latest_checkpoint(self.checkpoint_dir) if self.checkpoint_dir else None
                    where = f"; the last good checkpoint is {kept}" if kept else ""
                    raise StageFailed(f"the heal loss became non-finite at step {step + 1}{where}; "
                                      "lower heal.lr or use heal.dtype: float32")
                seconds = self.clock() - t0
                done_here += 1
                self.state.step = step + 1
                if done_here == WARMUP_STEPS:
                    warmed = self.clock()
                if not self.state.steps_fixed and done_here == MEASURE_STEPS:
                    now = self.clock()
                    self._set_budget_steps(now - started, (now - warmed) / (MEASURE_STEPS - WARMUP_STEPS),
                                           eval_seconds)
                record = {"step": self.state.step, **{k: round(v, 6) for k, v in totals.items()},
                          "lr": self.scheduler.get_last_lr()[0], "seconds": round(seconds, 3),
                          "tokens_per_s": round(tokens_per_step / max(seconds, 1e-9), 1)}
                last = self.state.step >= cfg.steps
                if self.evaluate is not None and cfg.eval_every and (self.state.step % cfg.eval_every == 0 or last):
                    record.update(self._evaluate())
                    record["elapsed_s"] = round(before + self.clock() - started, 3)  # in run, since the first step
                    if self._plateau() and not last:
                        stopped_early = True
                        record["stopped"] = f"plateau: no better held-out KL in {cfg.patience} evaluations"
                self.state.log.append(record)
                self._write_log(record)
                if self.on_step:
                    elapsed = self.clock() - started
                    eta = elapsed / done_here * (cfg.steps - self.state.step)
                    self.on_step({**record, "eta_s": eta, "total": cfg.steps})
                if stopped_early:
                    break
                if "signal" in flag:
                    self.accelerator.set_trigger()
                if self.accelerator.check_trigger():  # a signal reached some process: all stop here
                    path = self.checkpoint()
                    number = flag.get("signal", signal.SIGTERM)
                    name = signal.Signals(number).name
                    raise HealInterrupted(f"{name} at step {self.state.step}: checkpoint saved at {path}; "
                                          "rerun with --resume to continue", number)
                if cfg.checkpoint_every and self.state.step % cfg.checkpoint_every == 0 \
                        and self.state.step < cfg.steps:
                    self.checkpoint()
        self.elapsed = before + self.clock() - started
        return self.state.log

    def _write_log(self, record: dict[str, Any]) -> None:
        if self.log_file is None or self.rank != 0:
            return
        with open(self.log_file, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def eval_models(self) -> tuple[Any, Any]:
        """(student, teacher) for ``heldout_metrics``: the prepared modules when sharded, else the models."""
        if self.sharded:
            return self.student_module, self.teacher_module
        return self.student, self.teacher

    def full_student_state(self) -> dict[str, torch.Tensor] | None:
        """The student's complete weights on rank 0 (None elsewhere); every process must call it."""
        state = self.accelerator.get_state_dict(self.student_module)
        if self.rank != 0:
            return None
        return {k.removeprefix("model."): v for k, v in state.items()}


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
