"""Layer importance: how much each decoder layer changes what flows through the model.

Every metric returns one score per decoder layer, higher meaning more important (the prune stage
removes the lowest). All are measured with forward hooks on the decoder layers:

* ``block_influence`` (ShortGPT, Men et al. 2024): ``1 - mean cos(input, output)`` of each layer over
  every calibration token. A layer that barely turns the residual stream scores near 0.
* ``angular`` (Gromov et al. 2024): ``d(l, n) = arccos(cos(h_l, h_{l+n})) / pi`` on the last token,
  where ``h_l`` is the input of layer ``l``. With ``block_size`` n = 1 it is a per-layer score; for
  n > 1 a layer scores the smallest distance of any n-block containing it, so the n lowest layers
  form the best block. ``best_block`` returns that block directly.
* ``drop_one``: ``KL(full || layer skipped)`` of the next-token distributions, averaged over all
  tokens; one extra forward pass per layer, in which the skipped layer returns its input and the
  layers before it replay their recorded outputs (about half the work of a full pass). Slowest,
  and the most faithful to what removing one layer does.

``block_influence`` and ``angular`` share one hooked forward pass when computed together.
"""
from __future__ import annotations

import contextlib
import json
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import click
from rich.console import Console
from rich.table import Table

from ollama_compress import modelio
from ollama_compress.cli import make_options, run_options
from ollama_compress.errors import NotAvailable, StageFailed, UserError
from ollama_compress.fsutil import atomic_path, check_output_dir, claim_output_dir, file_in, write_json
from ollama_compress.hooks.data import batches_provider, text_source_from_options
from ollama_compress.hooks.source import resolve_model_dir
from ollama_compress.hookspecs import hookimpl
from ollama_compress.modelio import decoder_stack
from ollama_compress.options import RunOptions
from ollama_compress.plugins import capabilities, capability

if TYPE_CHECKING:  # pragma: no cover
    import torch

HIDDEN_STATE_METRICS = ("block_influence", "angular")


# ---------------------------------------------------------------- finding the layers
def get_decoder_layers(model) -> "torch.nn.ModuleList":
    """The decoder layer list of a causal LM (``model.model.layers`` for the supported families)."""
    return decoder_stack(model)[1]


def _layer_input(args: tuple, kwargs: dict):
    return args[0] if args else kwargs["hidden_states"]


def _layer_output(output):
    return output[0] if isinstance(output, tuple) else output


def _device_of(model):
    return next(model.parameters()).device


def _forward(model, batch):
    import torch

    with torch.no_grad():
        return model(input_ids=batch.to(_device_of(model)), use_cache=False)


# ---------------------------------------------------------------- one hooked pass: hidden states
@dataclass
class HiddenStateStats:
    """What one hooked pass over the calibration batches measured."""

    cos_sum: list[float]  # per layer: sum over tokens of cos(input, output)
    tokens: int  # tokens seen
    last_states: list["torch.Tensor"] = field(default_factory=list)  # h_0..h_L at the last token, [N, H]

    @property
    def num_layers(self) -> int:
        return len(self.cos_sum)


def collect_hidden_stats(model, batches: list) -> HiddenStateStats:
    """One forward per batch with hooks: per-layer token cosines and last-token residual states."""
    import torch
    import torch.nn.functional as F

    layers = get_decoder_layers(model)
    n = len(layers)
    cos_sum = torch.zeros(n, dtype=torch.float64)
    last_in: list[list[torch.Tensor]] = [[] for _ in range(n)]
    last_out: list[torch.Tensor] = []
    tokens = 0

    def make_hook(index: int):
        def hook(module, args, kwargs, output):
            h_in = _layer_input(args, kwargs).float()
            h_out = _layer_output(output).float()
            cos = F.cosine_similarity(h_in, h_out, dim=-1)  # [batch, seq]
            cos_sum[index] += cos.double().sum().cpu()
            last_in[index].append(h_in[:, -1].cpu())
            if index == n - 1:
                last_out.append(h_out[:, -1].cpu())
        return hook

    handles = [layer.register_forward_hook(make_hook(i), with_kwargs=True) for i, layer in enumerate(layers)]
    try:
        for batch in batches:
            _forward(model, batch)
            tokens += batch.numel()
    finally:
        for h in handles:
            h.remove()
    states = [torch.cat(s) for s in last_in] + [torch.cat(last_out)]
    return HiddenStateStats(cos_sum.tolist(), tokens, states)


def block_influence_from(stats: HiddenStateStats) -> list[float]:
    return [1.0 - s / stats.tokens for s in stats.cos_sum]


def block_distances_from(stats: HiddenStateStats, block_size: int) -> list[float]:
    """``d(l, n)`` for every start ``l`` (``L - n + 1`` values), averaged over sequences."""
    import torch
    import torch.nn.functional as F

    n = block_size
    if not 1 <= n < stats.num_layers:
        raise UserError(f"block size {n} must be between 1 and {stats.num_layers - 1} (the model has "
                        f"{stats.num_layers} layers)")
    h = stats.last_states
    out = []
    for start in range(stats.num_layers - n + 1):
        cos = F.cosine_similarity(h[start].double(), h[start + n].double(), dim=-1).clamp(-1.0, 1.0)
        out.append(float((torch.arccos(cos) / math.pi).mean()))
    return out


def angular_from(stats: HiddenStateStats, block_size: int = 1) -> list[float]:
    distances = block_distances_from(stats, block_size)
    n = block_size
    return [min(distances[max(0, l - n + 1):l + 1]) for l in range(stats.num_layers)]


# ---------------------------------------------------------------- metrics
def block_influence(model, batches: list, **options: Any) -> list[float]:
    """ShortGPT block influence per layer: 1 - mean cosine of its input and output."""
    return block_influence_from(collect_hidden_stats(model, batches))


def angular(model, batches: list, block_size: int = 1, **options: Any) -> list[float]:
    """Angular distance per layer (last token); for block_size > 1 the best block containing it."""
    return angular_from(collect_hidden_stats(model, batches), int(block_size))


def block_distances(model, batches: list, n: int) -> list[float]:
    """Angular distance ``d(l, n)`` for each start ``l`` of a contiguous block of ``n`` layers."""
    return block_distances_from(collect_hidden_stats(model, batches), n)


def best_block(model, batches: list, n: int) -> tuple[int, float]:
    """The contiguous block of ``n`` layers whose removal changes the last token least: (start, distance)."""
    distances = block_distances(model, batches, n)
    start = min(range(len(distances)), key=distances.__getitem__)
    return start, distances[start]


def _skip_hook(module, args, kwargs, output):
    """Forward hook making a decoder layer an identity: its output is its input, same structure."""
    h_in = _layer_input(args, kwargs)
    if isinstance(output, tuple):
        return (h_in,) + tuple(output[1:])
    return h_in


def _record_layers(model, batch) -> tuple["torch.Tensor", list]:
    """Reference forward: logits plus every decoder layer's raw output."""
    layers = get_decoder_layers(model)
    outputs: list = [None] * len(layers)

    def make_hook(index: int):
        def hook(module, args, output):
            outputs[index] = output
        return hook

    handles = [layer.register_forward_hook(make_hook(i)) for i, layer in enumerate(layers)]
    try:
        logits = _forward(model, batch).logits
    finally:
        for h in handles:
            h.remove()
    return logits, outputs


@contextlib.contextmanager
def skipping_layer(model, index: int, outputs: list | None = None):
    """Run the model with decoder layer ``index`` returning its input unchanged.

    With the reference pass's per-layer ``outputs`` for the same batch, the layers
    before ``index`` replay their recorded outputs instead of recomputing them (same values, about
    half the work on average); without them they run normally.
    """
    layers = get_decoder_layers(model)
    patched = []

    def replay(recorded):
        return lambda *args, **kwargs: recorded

    def identity(*args, **kwargs):
        h_in = _layer_input(args, kwargs)
        like = outputs[index] if outputs is not None else None
        return (h_in,) + tuple(like[1:]) if isinstance(like, tuple) else h_in

    handle = None
    try:
        if outputs is None:
            handle = layers[index].register_forward_hook(_skip_hook, with_kwargs=True)
        else:
            for i in range(index):
                layers[i].forward = replay(outputs[i])
                patched.append(layers[i])
            layers[index].forward = identity
            patched.append(layers[index])
        yield model
    finally:
        for layer in patched:
            del layer.forward  # back to the class's forward
        if handle is not None:
            handle.remove()


def drop_one(model, batches: list, **options: Any) -> list[float]:
    """Per layer: mean KL(full model || model with that layer skipped) of next-token distributions."""
    import torch
    import torch.nn.functional as F

    layers = get_decoder_layers(model)
    kl_sum = torch.zeros(len(layers), dtype=torch.float64)
    tokens = 0
    for batch in batches:
        logits, outputs = _record_layers(model, batch)
        ref = F.log_softmax(logits.float(), dim=-1)
        del logits
        tokens += batch.numel()
        for index in range(len(layers)):
            with skipping_layer(model, index, outputs):
                logp = F.log_softmax(_forward(model, batch).logits.float(), dim=-1)
            kl_sum[index] += float(F.kl_div(logp, ref, log_target=True, reduction="sum"))  # KL(ref || skipped)
        del ref, outputs
    return (kl_sum / tokens).tolist()


@hookimpl
def register_importance_metrics(register) -> None:
    register("block_influence", block_influence,
             "ShortGPT: 1 - mean cosine of each layer's input and output (one pass)")
    register("angular", angular,
             "Gromov et al.: arccos(cos)/pi across a block of block_size layers, last token (one pass)")
    register("drop_one", drop_one,
             "KL of next-token distributions when that one layer is skipped (one pass per layer)")


# ---------------------------------------------------------------- scoring several metrics
def _metric_fn(name: str) -> Callable:
    try:
        return capability("importance_metrics", name).fn
    except NotAvailable as exc:
        raise UserError(str(exc)) from None


def known_metrics() -> list[str]:
    return sorted(capabilities("importance_metrics"))


def _shared_pass_names(metrics: list[str]) -> list[str]:
    """Requested built-in hidden-state metrics that one hooked pass can serve together."""
    caps = capabilities("importance_metrics")
    builtin = {"block_influence": block_influence, "angular": angular}
    return [m for m in metrics if m in builtin and caps.get(m) and caps[m].fn is builtin[m]]


def score_model_timed(model, batches: list, metrics: list[str], **options: Any
                      ) -> tuple[dict[str, list[float]], dict[str, float]]:
    """Like ``score_model``, also returning seconds per metric (a shared pass counts for each)."""
    metrics = list(dict.fromkeys(metrics))
    fns = {m: _metric_fn(m) for m in metrics}
    get_decoder_layers(model)
    scores: dict[str, list[float]] = {}
    seconds: dict[str, float] = {}
    shared = _shared_pass_names(metrics)
    if len(shared) > 1:
        start = time.perf_counter()
        stats = collect_hidden_stats(model, batches)
        block_size = int(options.get("block_size", 1))
        computed = {"block_influence": lambda: block_influence_from(stats),
                    "angular": lambda: angular_from(stats, block_size)}
        for m in shared:
            scores[m] = computed[m]()
        elapsed = time.perf_counter() - start
        seconds.update({m: elapsed for m in shared})
    for m in metrics:
        if m in scores:
            continue
        start = time.perf_counter()
        scores[m] = [float(v) for v in fns[m](model, batches, **options)]
        seconds[m] = time.perf_counter() - start
    return {m: scores[m] for m in metrics}, seconds


def score_model(model, batches: list, metrics: list[str], **options: Any) -> dict[str, list[float]]:
    """``{metric: [score per layer]}`` for each named metric (registered importance metrics)."""
    return score_model_timed(model, batches, metrics, **options)[0]


def _check_scores(scores: dict[str, list[float]], num_layers: int) -> None:
    for name, values in scores.items():
        if len(values) != num_layers or not all(math.isfinite(v) for v in values):
            raise StageFailed(f"metric '{name}' did not give {num_layers} finite scores (got {values!r:.200})")


# ---------------------------------------------------------------- outputs
def rank_least_important(values: list[float]) -> list[int]:
    """Rank of each layer, 1 = least important (removed first)."""
    order = sorted(range(len(values)), key=lambda i: (values[i], i))
    ranks = [0] * len(values)
    for r, i in enumerate(order, 1):
        ranks[i] = r
    return ranks


def plot_scores(name: str, values: list[float], path: Path, title: str = "") -> Path:
    """A bar chart of one metric per layer, written atomically as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ranks = rank_least_important(values)
    lowest = max(1, len(values) // 5)
    colors = ["tab:red" if r <= lowest else "tab:blue" for r in ranks]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.28 * len(values) + 2), 3.6))
    ax.bar(range(len(values)), values, color=colors)
    ax.set_xlabel(f"layer (0-based); red: the {lowest} lowest")
    ax.set_ylabel(f"{name} (higher = more important)")
    ax.set_title(title or name)
    ax.set_xticks(range(len(values)))
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return path


def write_scores(out_dir: Path, scores: dict[str, list[float]], info: dict[str, Any], title: str = "") -> Path:
    """Write ``scores.json`` (metrics plus ``info``) and ``<metric>.png`` per metric into ``out_dir``."""
    out_dir = claim_output_dir(out_dir, "--out")
    for name, values in scores.items():
        plot_scores(name, values, file_in(out_dir, f"{name}.png", "metric name"), f"{title} {name}".strip())
    return write_json(out_dir / "scores.json", {**scores, **info})


@dataclass
class Analysis:
    """Result of ``analyze_model``: scores per metric and how they were obtained."""

    scores: dict[str, list[float]]
    num_layers: int
    tokens: int
    seconds: dict[str, float]

    def info(self) -> dict[str, Any]:
        return {"num_layers": self.num_layers, "tokens": self.tokens,
                "seconds": {k: round(v, 3) for k, v in self.seconds.items()}}


def analyze_model(model, batches: list, metrics: list[str], **options: Any) -> Analysis:
    """Score every decoder layer of a loaded model with ``metrics`` on calibration ``batches``."""
    num_layers = len(get_decoder_layers(model))
    scores, seconds = score_model_timed(model, batches, metrics, **options)
    _check_scores(scores, num_layers)
    return Analysis(scores, num_layers, sum(b.numel() for b in batches), seconds)


def _block_size(prune, num_layers: int) -> dict[str, int]:
    """With ``prune.block``, angular scores blocks of the size that will be removed."""
    if prune is None or not prune.block:
        return {}
    size = prune.remove if prune.remove is not None else num_layers - (prune.keep or num_layers)
    return {"block_size": size} if 0 < size < num_layers else {}


def score_model_dir(model_dir: Path, metrics: list[str], spec, out_dir: Path, *, options=None,
                    dtype: str = "float32", block_size: Callable[[int], dict[str, int]] = lambda n: {},
                    title: str = "", ctx=None, log: Callable[[str], None] = lambda m: None) -> Analysis:
    """Score every layer of the HF model in ``model_dir`` with ``metrics`` on the calibration text
    ``spec`` and write ``scores.json`` and one PNG per metric into ``out_dir``.

    The ``analyze`` command and the importance stage both run this. ``block_size(num_layers)``
    gives the angular block size, once the model's depth is known.
    """
    options = options or RunOptions()
    for m in metrics:
        _metric_fn(m)  # unknown names fail before any work
    torch_seed(spec.seed)
    tokenizer = modelio.load_tokenizer(model_dir, options)
    batches_fn = batches_provider(spec, tokenizer, ctx)
    log(f"loading {title or model_dir}")
    model = modelio.load_model(model_dir, options, dtype=dtype, device=options.resolved_device())
    batches = batches_fn(model)
    num_layers = len(get_decoder_layers(model))
    log(f"scoring {num_layers} layers with {', '.join(metrics)} ({spec.samples} x {spec.seq_len} tokens)")
    result = analyze_model(model, batches, metrics, **block_size(num_layers))
    write_scores(out_dir, result.scores, {**result.info(), "model": title}, title)
    return result


# ---------------------------------------------------------------- stage hook
@hookimpl(trylast=True)
def score_layers(ctx, model_dir: Path) -> dict[str, list[float]] | None:
    prune = ctx.recipe.prune
    metrics = list(dict.fromkeys([prune.metric, *prune.report_metrics])) if prune else ["block_influence"]
    result = score_model_dir(Path(model_dir), metrics, ctx.recipe.data.calibration, ctx.out_dir,
                             options=ctx.options, dtype=ctx.recipe.source.dtype,
                             block_size=lambda n: _block_size(prune, n), title=source_title(ctx.recipe.source.model),
                             ctx=ctx, log=ctx.log)
    ctx.metrics.update(result.info())
    return result.scores


def torch_seed(seed: int) -> None:
    import torch

    torch.manual_seed(seed)


def source_title(model: str) -> str:
    """A short model name for titles: the last path part, without ``.gguf`` or a scheme."""
    return Path(model.split(":", 1)[-1] if ":" in model and not Path(model).exists() else model).name.removesuffix(".gguf")


# ---------------------------------------------------------------- analyze command
def default_out_dir(model: str) -> Path:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", source_title(model)).strip("-") or "model"
    return Path.cwd() / f"analyze-{name}"


def print_table(scores: dict[str, list[float]], console, title: str) -> None:
    table = Table(title=title, caption="rank 1 = least important (removed first)")
    table.add_column("layer", justify="right")
    ranks = {m: rank_least_important(v) for m, v in scores.items()}
    for m in scores:
        table.add_column(m, justify="right")
        table.add_column("rank", justify="right")
    num_layers = len(next(iter(scores.values())))
    for layer in range(num_layers):
        cells = [str(layer)]
        for m, values in scores.items():
            cells += [f"{values[layer]:.5f}", str(ranks[m][layer])]
        table.add_row(*cells)
    console.print(table)


def analyze(model: str, metrics: list[str], calibration: str | None = None, samples: int | None = None,
            seq_len: int | None = None, block_size: int = 1, out: str | None = None, options=None,
            seed: int = 0, log: Callable[[str], None] = lambda m: None) -> tuple[Analysis, Path]:
    """The ``analyze`` command as a function: score ``model`` (any source form) and write the outputs."""
    options = options or RunOptions()
    for m in metrics:
        _metric_fn(m)
    spec = text_source_from_options(calibration, samples, seq_len, seed)
    out_dir = check_output_dir(Path(out) if out else default_out_dir(model), "--out")
    model_dir = resolve_model_dir(model, options)
    check_output_dir(out_dir, "--out", inputs=(model_dir,))
    result = score_model_dir(model_dir, metrics, spec, out_dir, options=options,
                             block_size=lambda n: {"block_size": block_size}, title=source_title(model), log=log)
    return result, out_dir


@hookimpl
def register_commands(cli) -> None:
    @cli.command("analyze")
    @click.argument("model")
    @click.option("--metric", "metrics", multiple=True, help="Importance metric (repeatable); default block_influence.")
    @click.option("--calibration", type=str, help="Calibration text (.txt) or JSON lines (.jsonl); default: shipped corpus.")
    @click.option("--samples", type=int, help="Number of calibration sequences (default 32).")
    @click.option("--seq-len", type=int, help="Tokens per sequence (default 256).")
    @click.option("--block-size", type=int, default=1, show_default=True, help="Block size n for 'angular'.")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed for choosing the sequences.")
    @click.option("--out", type=str, help="Output directory (default ./analyze-<model name>).")
    @click.option("--json", "as_json", is_flag=True, help="Print only {metric: [scores]} as JSON on stdout.")
    @run_options
    def analyze_command(model, metrics, calibration, samples, seq_len, block_size, seed, out, as_json, **run_opts):
        """Score each layer of MODEL (HF directory or .gguf file): higher = more important."""
        stderr = Console(stderr=True)
        result, out_dir = analyze(model, list(metrics) or ["block_influence"], calibration, samples, seq_len,
                                  block_size, out, make_options(**run_opts), seed,
                                  log=lambda m: stderr.print(f"[dim]{m}[/dim]"))
        if as_json:
            click.echo(json.dumps(result.scores))
            stderr.print(f"wrote {out_dir / 'scores.json'}")
            return
        console = Console()
        print_table(result.scores, console, f"{Path(model).name}: layer importance ({result.tokens} tokens)")
        times = ", ".join(f"{m} {s:.1f}s" for m, s in result.seconds.items())
        console.print(f"{times}; wrote {out_dir / 'scores.json'} and one PNG per metric")
