"""Every hook of ollama-compress. Built-in stages are plugins of these hooks like any other.

Two kinds of hook:

* Capability hooks run once, when the plugin manager starts. Each gets a ``register`` callable and
  adds named things a recipe can then refer to by name (``metric: block_influence``).
* Stage hooks run when the pipeline reaches a stage. Unless a docstring says otherwise, the first
  plugin to return something other than ``None`` wins, so a plugin can take over a stage by
  returning a result, or decline by returning ``None``. Built-in implementations are
  ``trylast``, so any installed plugin runs before them, whatever the discovery order.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import click
import pluggy

from .context import StageContext

hookspec = pluggy.HookspecMarker("ollama_compress")
hookimpl = pluggy.HookimplMarker("ollama_compress")

Register = Callable[..., None]


# ---------------------------------------------------------------- capability hooks
@hookspec
def register_importance_metrics(register: Register) -> None:
    """Add layer-importance metrics.

    Call ``register(name, fn, description)``. ``fn(model, batches, **options) -> list[float]``
    gets a causal LM in eval mode and a list of ``input_ids`` tensors and returns one score per
    layer, higher meaning more important (the prune stage removes the lowest).
    """


@hookspec
def register_losses(register: Register) -> None:
    """Add heal (distillation) losses: ``register(name, fn, description, needs_layers=False)``.

    Runs once, when the plugin manager first lists losses; every plugin's losses are kept (a
    plugin's loss wins over a built-in of the same name). A recipe uses a loss by name with a
    weight (``heal: {loss: {kl: 1.0, my_loss: 0.5}}``).

    ``fn(student, teacher, batch) -> torch.Tensor`` returns a scalar (accumulated in fp32):
    ``student``/``teacher`` are ``ollama_compress.distill.ForwardOut`` (``final``: hidden states
    after the final norm [B, T, H]; ``head``: the LM head, ``head.logits(h)``; ``layers``: decoder
    layer outputs by index, filled only when a loss in use registered ``needs_layers=True``;
    ``norm``: the final norm); ``batch`` is ``ollama_compress.distill.Batch`` (``input_ids``,
    ``mask`` of real tokens, ``temperature``, ``student_to_teacher``, ``matched_layers``).
    The teacher's tensors carry no gradient.
    """


@hookspec
def register_sources(register: Register) -> None:
    """Add model source schemes: ``register(scheme, fn, description)``.

    A recipe ``source.model`` of ``scheme:rest`` is resolved by ``fn(rest, options) -> Path``,
    which returns a local HF directory or GGUF file.
    """


@hookspec
def register_data_sources(register: Register) -> None:
    """Add calibration/held-out text sources: ``register(kind, fn, description)``.

    ``fn(spec, tokenizer, ctx) -> list[str]`` returns texts for a recipe ``data`` entry whose
    ``from`` is ``kind``.
    """


@hookspec
def register_chat_templates(register: Register) -> None:
    """Add Ollama chat families: ``register(family, match, description, template_path=..., stops=[...])``.

    ``match(hf_chat_template: str) -> bool`` tells whether an HF Jinja template belongs to the
    family; ``template_path`` is a Go-template TEMPLATE file; ``stops`` are stop strings.
    Families of plugins are tried before the built-in ones.
    """


@hookspec
def register_commands(cli: click.Group) -> None:
    """Add subcommands to the ``ollama-compress`` command line (``cli.command()`` etc.)."""


# ---------------------------------------------------------------- stage hooks
@hookspec(firstresult=True)
def run_stage(ctx: StageContext) -> dict[str, Any] | None:
    """Run one pipeline stage (``ctx.stage``) and return its JSON-able result.

    The built-in implementation dispatches to the stage hooks below. Implement it as a
    ``wrapper=True`` hookimpl to time, log or guard every stage. First non-None result wins.
    """


@hookspec(firstresult=True)
def load_source(ctx: StageContext) -> Path | None:
    """Make ``ctx.recipe.source`` available as a local HF directory and return its path.

    Runs first. A local directory may be returned as is; anything converted (a GGUF file,
    a download) is written into ``ctx.out_dir``. First non-None result wins.

    Before any stage runs, the pipeline also asks where the source is, to hash it for the stage
    cache and to read its shape: then ``ctx.inputs[LOCATE_SOURCE]`` (``"locate_source"``) is
    True, and the hook returns the local file or directory that holds the source (a GGUF file
    as is), converting and writing nothing.
    """


LOCATE_SOURCE = "locate_source"  # the ctx.inputs key of load_source's "where is it" call


@hookspec(firstresult=True)
def score_layers(ctx: StageContext, model_dir: Path) -> dict[str, list[float]] | None:
    """Score each transformer layer of ``model_dir`` on calibration text.

    Runs after ``load_source``. Returns ``{metric_name: [score per layer]}`` (higher = more
    important) and writes ``scores.json`` and plots into ``ctx.out_dir``. First non-None wins.
    """


@hookspec(firstresult=True)
def prune_layers(ctx: StageContext, model_dir: Path, scores: dict[str, list[float]]) -> Path | None:
    """Remove layers chosen from ``scores`` and the recipe's ``prune`` section.

    Writes an HF directory with ``layer_map.json`` under ``ctx.out_dir`` and returns it.
    First non-None result wins.
    """


@hookspec(firstresult=True)
def heal(ctx: StageContext, student_dir: Path, teacher_dir: Path) -> Path | None:
    """Fine-tune the pruned student by distillation from the teacher; return the healed HF dir.

    Runs after pruning, before export (quantizing first loses quality). ``ctx.settings`` is the
    recipe's ``heal`` section, ``ctx.recipe.data.heal`` the heal text and ``data.heldout`` the
    held-out text (never trained on). ``student_dir`` is the pruned HF directory (with
    ``layer_map.json``), ``teacher_dir`` the unpruned model (``heal.teacher`` or the run's
    source). Write the healed HF directory under ``ctx.out_dir`` and return its path; put figures
    (held-out KL before/after, steps, tokens/s) into ``ctx.metrics``. First non-None wins.
    """


@hookspec(firstresult=True)
def export_gguf(ctx: StageContext, model_dir: Path, outtype: str) -> Path | None:
    """Convert an HF directory to one GGUF file of ``outtype`` (F32, F16, BF16) in ``ctx.out_dir``.

    Returns the GGUF path. First non-None result wins.
    """


@hookspec(firstresult=True)
def quantize_gguf(ctx: StageContext, gguf_path: Path, quant: str) -> Path | None:
    """Quantize an F16/F32 GGUF to ``quant`` (llama.cpp spelling, e.g. Q4_K_M); return the path.

    Runs after ``export_gguf``, once per quant, and for every other GGUF the tool quantizes: the
    ``export`` and ``quantize`` commands and evaluate's teacher quants (``ctx.settings`` is then an
    ``export`` section holding the importance-matrix choice). First non-None result wins.
    """


@hookspec(firstresult=True)
def write_modelfile(ctx: StageContext, gguf_path: Path, quant: str, model_dir: Path) -> Path | None:
    """Write an Ollama Modelfile (FROM, TEMPLATE, stops, parameters) for one quant; return it.

    First non-None result wins.
    """


@hookspec(firstresult=True)
def create_ollama_model(ctx: StageContext, modelfile: Path, name: str, host: str | None) -> str | None:
    """Create ``name`` in the Ollama server at ``host`` from ``modelfile``; return the registered name.

    Runs in the ollama stage, once per Modelfile, after ``write_modelfile``; a server answers at
    ``host`` (the stage started one if none was running). First non-None result wins.
    """


@hookspec
def evaluate(ctx: StageContext, model_path: Path) -> dict[str, Any] | None:
    """Measure one model against the teacher; every plugin's result is merged into its row.

    Runs in the evaluate stage (after export and ollama) and in ``ollama-compress evaluate``, once
    per row of the table: the teacher, the pruned and the healed HF directories, each GGUF of the
    export, and the teacher's own quants when ``evaluate.teacher_quants`` asks for them.

    ``model_path``: an HF directory (PyTorch) or a ``.gguf`` file (llama.cpp). ``ctx.settings`` is
    the recipe's ``evaluate`` section (None from the command means the defaults); ``ctx.inputs``
    holds the stage inputs (``teacher_dir``, ``pruned_dir``, ``healed_dir``, ``gguf``, ...) plus
    ``candidate`` (``{name, model, quant, kind}`` of this row) and ``heldout_reference``: the
    held-out token windows (``windows``, a JSON file of token-id lists, BOS included) and the
    teacher's log-probabilities on them (``teacher_logprobs``, a ``.npy`` of shape
    ``[tokens, vocab]``, row i of a window predicting its token i+1), with ``teacher_perplexity``
    and ``key`` (the cached reference's name: teacher hash, windows hash, dtype).

    Returns ``{column: JSON-able value}`` for this row, or None to add nothing. Not first-result:
    every plugin's dict is merged, and on a shared key a third-party plugin wins over the built-in
    one (which is ``trylast``). The built-in columns are ``perplexity``, ``kl``,
    ``top1_agreement``, ``knowledge_accuracy``, ``answers``, ``size_bytes`` and, for GGUF files,
    ``prompt_tokens_per_s`` / ``gen_tokens_per_s`` (with the speed meter's rounds and load average).
    For a GGUF the export stage (or evaluate's teacher quants) measured against the same teacher
    reference (``key``), the quality and speed figures are those of the ``quants.json`` beside it,
    reused rather than measured again.
    """
