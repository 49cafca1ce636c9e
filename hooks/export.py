"""The export stage and the ``export`` command: an HF directory -> an unquantized GGUF (then quants).

Both go through ``export_model``; the GGUF writer itself is ``ollama_compress.gguf``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import click

from ollama_compress.cli import echo_json, make_options, run_options
from ollama_compress.context import StageContext
from ollama_compress.errors import NotAvailable, UserError
from ollama_compress.fsutil import check_output_dir, claimed_output_dir
from ollama_compress.hooks.data import read_text_file
from ollama_compress.hooks.source import resolve_model_dir
from ollama_compress.hookspecs import hookimpl
from ollama_compress.options import RunOptions
from ollama_compress.quant_names import QUANT_TYPES, UNQUANTIZED


def export_model(model_dir: Path, out_dir: Path, name: str, outtype: str = "F16", quants: Sequence[str] = (), *,
                 metadata: dict[str, Any] | None = None, imatrix: Path | str | None = None, texts: list[str] | None = None,
                 options: RunOptions | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Write ``{name}-{outtype}.gguf`` into ``out_dir``, then each of ``quants`` measured against it.

    The export stage (no quants: the stage runner quantizes through ``quantize_gguf``) and the
    ``export`` command both call this. ``quants`` adds ``{name}-{quant}.gguf`` files, made through
    the ``quantize_gguf`` hook with ``imatrix`` (a file, ``auto`` or None) as ``export.imatrix``,
    and ``quants.json``. Everything is checked before anything is written. Returns the GGUF's path,
    outtype, size, seconds and width warnings, plus ``quants``, ``rows`` and ``report`` with quants.
    """
    from ollama_compress.gguf.writer import check_outtype  # deferred: the writer loads numpy and gguf-py

    outtype = check_outtype(outtype)
    wanted = [q for q in _parse_quants(quants) if q != outtype]
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    check_output_dir(out_dir, "--out", inputs=(model_dir,))
    if imatrix is not None and str(imatrix) != "auto" and not Path(imatrix).is_file():
        raise UserError(f"importance matrix {imatrix} does not exist; give a file or 'auto'")
    quantize = _quantize_api() if wanted else None
    with claimed_output_dir(out_dir, "--out", inputs=(model_dir,)):
        return _write_and_quantize(model_dir, out_dir, name, outtype, wanted, quantize, metadata, imatrix, texts,
                                   options, log)


def _write_and_quantize(model_dir: Path, out_dir: Path, name: str, outtype: str, wanted: list[str], quantize,
                        metadata: dict[str, Any] | None, imatrix: Path | str | None, texts: list[str] | None,
                        options: RunOptions | None, log: Callable[[str], None] | None) -> dict[str, Any]:
    from ollama_compress.gguf.writer import write_gguf  # deferred: the writer loads numpy and gguf-py

    written = write_gguf(model_dir, out_dir / f"{name}-{outtype}.gguf", outtype, {"name": name, **(metadata or {})},
                         options)
    for line in written.width_warnings:
        (log or _warn)(line)
    result: dict[str, Any] = {**written.to_dict(), "quants": {}}
    if quantize is None:
        return result
    ctx = quantize.quant_context(out_dir, imatrix, model_dir=model_dir, options=options)
    for quant in wanted:
        result["quants"][quant] = str(quantize.quantize_through_hook(ctx, written.path, quant))
    rows = quantize.measure_quants(written.path, {q: Path(p) for q, p in result["quants"].items()}, texts)
    result["report"] = str(quantize.write_quants_report(rows, out_dir))
    result["rows"] = rows
    return result


def _warn(line: str) -> None:
    click.echo(f"width warning: {line}", err=True)


def _parse_quants(quants: Iterable[str]) -> list[str]:
    out: list[str] = []
    for q in quants:
        name = q.strip().upper()
        if name not in QUANT_TYPES:
            raise UserError(f"unknown quant '{q}'; known: {', '.join(QUANT_TYPES)}")
        if name not in out:
            out.append(name)
    return out


def _quantize_api():
    try:
        from ollama_compress.hooks import quantize
    except ImportError as exc:
        raise NotAvailable(f"the quantize plugin is not available ({exc}); export without --quant") from None
    return quantize


# ------------------------------------------------------------------------- stage
def _stage_metadata(ctx: StageContext) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": ctx.recipe.name, "recipe": ctx.recipe.name}
    source = getattr(ctx.recipe, "source", None)
    if source is not None and getattr(source, "model", None):
        meta["source_model"] = source.model
        if "/" in source.model and not Path(source.model).exists() and not source.model.endswith(".gguf"):
            meta["base_model"] = source.model
    pruned = ctx.inputs.get("pruned_dir")
    if pruned and Path(pruned).is_dir():  # a healed directory may not carry the prune stage's layer map
        from ollama_compress.gguf.writer import layer_map_keys  # deferred: the writer loads numpy and gguf-py

        meta.update(layer_map_keys(Path(pruned)))
    return meta


# The stage hook shares its name with the writer's Python API, so it is bound by ``specname``.
@hookimpl(specname="export_gguf", trylast=True)
def export_gguf_stage(ctx: StageContext, model_dir: Path, outtype: str) -> Path:
    """The export stage: ``{recipe name}-{outtype}.gguf`` in the stage directory, figures in its metrics."""
    outtype = outtype or getattr(ctx.settings, "outtype", None) or "F16"
    result = export_model(Path(model_dir), Path(ctx.out_dir), ctx.recipe.name, outtype,
                          metadata=_stage_metadata(ctx), options=ctx.options,
                          log=lambda line: ctx.log(f"[yellow]width warning:[/] {line}"))
    path = Path(result.pop("gguf"))
    result.pop("quants")
    ctx.metrics.update({"gguf": path.name, **result})
    return path


# ------------------------------------------------------------------------- command
def _model_name(spec: str) -> str:
    """What the files are named after: the GGUF's stem, the directory's name, the embedded model's or the hub id's."""
    path = Path(spec).expanduser()
    if path.exists():
        return path.stem if path.is_file() else path.resolve().name
    scheme, sep, rest = spec.partition(":")
    if sep and "/" not in scheme:
        return rest  # embedded:NAME
    return spec.rstrip("/").rsplit("/", 1)[-1]  # org/name


def _print_rows(rows: list[dict]) -> None:
    try:
        from rich.console import Console

        from ollama_compress.hooks.quantize import format_quants_table

        Console().print(format_quants_table(rows))
    except (ImportError, KeyError, TypeError):
        keys = list(rows[0]) if rows else []
        click.echo("\t".join(keys))
        for row in rows:
            click.echo("\t".join(str(row.get(k, "")) for k in keys))


@hookimpl
def register_commands(cli: click.Group) -> None:
    @cli.command("export")
    @click.argument("model")
    @click.option("--quant", "-q", "quants", multiple=True, help="llama.cpp quant to make (repeatable), e.g. Q4_K_M.")
    @click.option("--outtype", default="F16", show_default=True,
                  type=click.Choice(UNQUANTIZED, case_sensitive=False), help="Type of the unquantized GGUF.")
    @click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="Output directory.")
    @click.option("--imatrix", help="Importance matrix for low-bit quants: a file, or 'auto' to compute one "
                  "over the shipped calibration text (as the recipe's export.imatrix).")
    @click.option("--heldout", type=click.Path(path_type=Path),
                  help="UTF-8 text file to measure the quants on (default: the built-in held-out text).")
    @click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
    @run_options
    def export_command(model, quants, outtype, out_dir, imatrix, heldout, as_json, **opts):
        """Convert MODEL (an HF directory, a .gguf file or embedded:NAME) to GGUF, then quantize it with llama.cpp."""
        options = make_options(**opts)
        texts = [read_text_file(heldout, "held-out text")] if heldout else None
        from ollama_compress.gguf.writer import check_outtype  # deferred: the writer loads numpy and gguf-py

        outtype = check_outtype(outtype)
        _parse_quants(quants)  # bad arguments are errors before a GGUF is imported
        check_output_dir(out_dir, "--out", inputs=(Path(model),))
        model_dir = resolve_model_dir(model, options)
        result = export_model(model_dir, out_dir, _model_name(model), outtype, quants,
                              imatrix=imatrix, texts=texts, options=options)
        if as_json:
            echo_json(result)
            return
        click.echo(f"wrote {result['gguf']} ({result['size_bytes'] / 2**20:.1f} MiB)")
        for quant, path in result["quants"].items():
            click.echo(f"wrote {path} ({quant})")
        if result.get("rows"):
            _print_rows(result["rows"])
            click.echo(f"report: {result['report']}")
