"""The ``ollama-compress`` command line: thin commands over the Python API.

Built-in stages add their own commands through the ``register_commands`` hook, like any plugin.
"""
from __future__ import annotations

import errno
import json
import os
import re
import sys
import types
import typing
from typing import Any, Sequence, TypeVar

import click
from pydantic import BaseModel

from .errors import CompressError
from .options import RunOptions, launcher_world

M = TypeVar("M", bound=BaseModel)


def run_options(fn):
    """Options only the command line may set: remote code, pickle weights, device."""
    fn = click.option("--online", is_flag=True, help="Allow downloading a hub model that is not in the HF cache.")(fn)
    fn = click.option("--device", default="auto", show_default=True, help="cpu, cuda, cuda:N or auto.")(fn)
    fn = click.option("--allow-pickle", is_flag=True, help="Allow .bin (pickle) weights; they can run code.")(fn)
    fn = click.option("--trust-remote-code", is_flag=True, help="Run model code from the model repository.")(fn)
    return fn


def make_options(trust_remote_code: bool = False, allow_pickle: bool = False, device: str = "auto",
                 online: bool = False, **_) -> RunOptions:
    return RunOptions(trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, device=device,
                      offline=not online)


def echo_json(data) -> None:
    click.echo(json.dumps(data, indent=2))


def add_command(group: click.Group, command: click.Command) -> None:
    """Add a built-in ``command`` unless a plugin registered one of that name first."""
    if command.name not in group.commands:
        group.add_command(command)


def json_option(fn):
    """``--json``, shared by every command that reports a result."""
    return click.option("--json", "as_json", is_flag=True, help="Print the result as JSON on stdout.")(fn)


# ---------------------------------------------------------------- options from a recipe section
def field_comments(model: type[BaseModel]) -> dict[str, str]:
    """Each field's trailing comment in the schema's source (``remove: int | None = None  # how many``)."""
    import ast
    import inspect
    import io
    import textwrap
    import tokenize

    comments: dict[str, str] = {}
    for cls in reversed(model.__mro__):
        if not (isinstance(cls, type) and issubclass(cls, BaseModel)) or cls is BaseModel:
            continue
        try:
            source = textwrap.dedent(inspect.getsource(cls))
        except (OSError, TypeError):
            continue
        body = ast.parse(source).body[0].body
        field_on_line = {node.end_lineno: node.target.id for node in body
                         if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)}
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT and token.start[0] in field_on_line:
                comments[field_on_line[token.start[0]]] = token.string.lstrip("# ").strip()
    return comments


def _choices(annotation: Any) -> list[str]:
    """The strings of the ``Literal`` members of ``annotation`` (itself or inside a Union)."""
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return [c for arg in typing.get_args(annotation) if typing.get_origin(arg) is typing.Literal
            for c in _choices(arg)]


def _option_kind(annotation: Any) -> tuple[str, Any] | None:
    """("flag" | "value" | "list", click type) for a field's annotation; None when a flag can't hold it."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation = args[0]
    origin = typing.get_origin(annotation)
    if annotation is bool:
        return "flag", None
    if annotation in (int, float, str):
        return "value", {int: click.INT, float: click.FLOAT, str: click.STRING}[annotation]
    if origin is typing.Literal:  # checked by the schema, like the recipe's value
        return "value", click.STRING
    members = typing.get_args(annotation) if origin in (typing.Union, types.UnionType) else (annotation,)
    if any(typing.get_origin(m) is list for m in members) and all(
            typing.get_origin(m) in (list, typing.Literal) for m in members):
        return "list", click.STRING
    return None


def _flag(name: str) -> str:
    return "--" + name.removesuffix("_").replace("_", "-")


def section_fields(model: type[BaseModel], skip: Sequence[str] = (), only: Sequence[str] | None = None) -> list[str]:
    """The fields of ``model`` (all, or ``only`` these, less ``skip``) that a command-line option can
    hold: not nested sections or mappings."""
    return [name for name, info in model.model_fields.items()
            if name not in skip and (only is None or name in only) and _option_kind(info.annotation) is not None]


def section_options(model: type[BaseModel], skip: Sequence[str] = (), only: Sequence[str] | None = None, *,
                    dest: str = ""):
    """click options for the fields of the recipe section ``model``, like mergekit's options object.

    Each field becomes ``--field-name`` typed from its annotation (bools are flags, ``Literal`` a
    choice, lists comma-separated with ``none`` for an empty one), with the field's trailing comment
    in the schema as help and the schema's default shown. An option not given arrives as None
    (in the keyword ``dest + name``), so ``section_from_options`` leaves the schema default.
    """
    comments = field_comments(model)

    def decorate(fn):
        for name in reversed(section_fields(model, skip, only)):
            info = model.model_fields[name]
            kind, click_type = _option_kind(info.annotation)
            default = info.get_default(call_default_factory=True)
            help_text = comments.get(name, "")
            if kind == "list":
                choices = _choices(info.annotation)
                help_text += f" (comma-separated{', or ' + ' | '.join(choices) if choices else ''}; none: empty)"
                default = ",".join(str(d) for d in default) if isinstance(default, list) else default
            flag = _flag(name)
            if kind == "flag" and default is not False:
                flag = f"{flag}/--no-{flag[2:]}"
            if default is not None and default is not False:  # shown, not passed: unset keeps the schema's default
                help_text += f"  [default: {str(default).lower() if isinstance(default, bool) else default}]"
            choices = _choices(info.annotation)
            metavar = f"[{'|'.join(choices)}]" if kind == "value" and choices else None
            option = click.option(flag, dest + name, type=click_type, is_flag=kind == "flag", default=None,
                                  metavar=metavar, help=help_text[:1].upper() + help_text[1:])
            fn = option(fn)
            fn.__click_params__[-1].section_field = f"{model.__name__}.{name}"
        return fn

    return decorate


def _list_value(text: str, choices: list[str]) -> Any:
    if text in choices:
        return text
    if text.strip().lower() in ("none", ""):
        return []
    return [part.strip() for part in text.split(",")]


def option_values(model: type[BaseModel], given: dict[str, Any], skip: Sequence[str] = (),
                  only: Sequence[str] | None = None, *, dest: str = "") -> dict[str, Any]:
    """The section fields the user gave on the command line (``given``: click's keywords), as recipe data."""
    values: dict[str, Any] = {}
    for name in section_fields(model, skip, only):
        value = given.get(dest + name)
        if value is None:
            continue
        info = model.model_fields[name]
        if _option_kind(info.annotation)[0] == "list":
            value = _list_value(value, _choices(info.annotation))
        values[info.alias or name] = value
    return values


def section_from_options(model: type[M], values: dict[str, Any]) -> M:
    """``values`` (from ``option_values``, perhaps with more keys) validated by the recipe's own
    schema; a UserError naming the option (``--remove: ...``) when it refuses them."""
    from pydantic import ValidationError

    from .errors import UserError
    from .recipe import format_error

    try:
        return model.model_validate(values)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = _flag(str(first["loc"][0])) if first["loc"] else ""
        line = format_error({**first, "loc": ()}).removeprefix("recipe: ")
        raise UserError(f"{where}: {line}" if where else line) from None


CALIBRATION_FIELDS = ("samples", "seq_len", "seed")  # of the calibration TextSource, for prune and analyze


def calibration_options(fn):
    """``--calibration FILE`` and the calibration ``TextSource`` fields (``--samples``, ``--seq-len``, ``--seed``)."""
    from pathlib import Path

    from .recipe import TextSource

    fn = section_options(TextSource, only=CALIBRATION_FIELDS, dest="calibration_")(fn)
    return click.option("--calibration", "calibration_path", type=click.Path(path_type=Path),
                        help="Calibration text (.txt) or JSON lines (.jsonl); default: the shipped corpus.")(fn)


def calibration_from_options(given: dict[str, Any]):
    """The calibration ``TextSource`` of ``calibration_options`` (a ``.jsonl`` file is read as JSON lines)."""
    from .errors import UserError
    from .recipe import TextSource

    values = option_values(TextSource, given, only=CALIBRATION_FIELDS, dest="calibration_")
    path = given.get("calibration_path")
    if path is not None:
        if not path.is_file():
            raise UserError(f"--calibration {path} is not a file; give a .txt or .jsonl file")
        values.update({"from": "jsonl" if path.suffix.lower() in (".jsonl", ".json") else "text", "path": str(path)})
    return section_from_options(TextSource, values)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ollama-compress")
def cli():
    """Prune, heal, convert and quantize Hugging Face causal LMs into models that run in Ollama."""


@cli.command("run")
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (prune.remove=8).")
@click.option("--out", type=click.Path(), help="Run directory (default: runs/<recipe name>).")
@click.option("--dry-run", is_flag=True, help="Print the stage plan without loading weights.")
@click.option("--from", "first", metavar="STAGE", help="Rerun from STAGE; earlier stages must have finished.")
@click.option("--until", "last", metavar="STAGE", help="Stop after STAGE.")
@click.option("--force", is_flag=True, help="With a run.json: run even if the source or package versions differ.")
@run_options
def run_command(recipe, overrides, out, dry_run, first, last, force, **flags):
    """Run RECIPE end to end: a .yaml file, a shipped recipe name, or a run's run.json (reproduce it)."""
    from rich.console import Console
    from rich.table import Table

    from . import pipeline

    result = pipeline.run(recipe, overrides=list(overrides), out=out, options=make_options(**flags),
                          dry_run=dry_run, first=first, last=last, force=force)
    console = Console(quiet=launcher_world()[0] != 0)  # under a launcher, rank 0 speaks
    if dry_run:
        table = Table("stage", "status", "directory", title=f"plan for {result['run_dir']}")
        for row in result["plan"]:
            table.add_row(row["stage"], row["status"], row.get("dir", ""))
        console.print(table)
        _print_estimate(console, result["estimate"])
        return
    _print_summary(console, result, out)


def _print_estimate(console, estimate: dict) -> None:
    (before, after), (params_before, params_after) = estimate["layers"], estimate["params"]
    console.print(f"layers {before} -> {after}; parameters {params_before:,} -> {params_after:,} (estimated)")
    if "gguf_mib" in estimate:
        console.print("GGUF size (estimated): " + ", ".join(f"{q} {mib:.1f} MiB" for q, mib in estimate["gguf_mib"].items()))
    if "select_measured" in estimate:
        from .planner import MEASURED_AUTO_FLOPS

        cost = estimate["select_measured"]
        console.print(f"prune.select measured (auto: if <= {MEASURED_AUTO_FLOPS:.0e} FLOPs): {cost['candidates']} candidate cuts, "
                      f"{cost['forward_passes']} forward passes of {cost['tokens'] // cost['forward_passes']} tokens, "
                      f"~{cost['flops']:.1e} FLOPs (estimated)")
    if "size_plan" in estimate:
        plan, cost = estimate["size_plan"], estimate["size_plan"]["cost"]
        console.print("size plan (prune.target.size_mb), candidates (estimated): " + "; ".join(
            f"{c['kind']}: {c['label']} {c['estimated_mib']:.1f} MiB" for c in plan["candidates"]))
        console.print(f"size plan cost: {cost['gguf_exports']} GGUF exports, {cost['quantizations']} quantizations, "
                      f"{cost['forward_passes']} forward passes ({cost['windows']} calibration windows each for the "
                      f"teacher and every candidate, {cost['tokens']} tokens), plus each cut's choice of layers"
                      + (f" (select measured: ~{plan['cut_select_flops']:.1e} FLOPs)" if plan.get("cut_select_flops") else ""))
    if "heal_memory_gib" in estimate:
        console.print(f"heal memory (estimated peak): {estimate['heal_memory_gib']:g} GiB")


def _print_summary(console, lock: dict, out) -> None:
    stages = lock["stages"]
    console.print(f"run finished; lock written to {out or 'runs/' + lock['recipe']['name']}/run.json")
    quants = (stages.get("export", {}).get("metrics") or {}).get("quants")
    if quants:
        from .hooks.quantize import format_quants_table

        console.print(format_quants_table(quants))
    for name, stage in stages.items():
        if stage["status"] in ("not available", "failed"):
            console.print(f"[yellow]{name}: {stage['status']} ({stage.get('reason', '')})[/yellow]")
    models = (stages.get("ollama", {}).get("outputs") or {}).get("ollama_models") or {}
    if models:
        _print_chat_hint(console, models, lock["recipe"].get("export", {}).get("quants", []))


def _print_chat_hint(console, models: dict[str, str], quants: list[str]) -> None:
    import shutil

    from .ollama_server import find_ollama

    first = next((models[q] for q in quants if q in models), next(iter(models.values())))
    binary = "ollama" if shutil.which("ollama") else str(find_ollama() or "ollama")
    console.print("Chat with the compressed model:")
    # soft_wrap: a command to copy must stay on one line however long the binary's path is
    console.print(f"  {binary} serve   # if no Ollama server is running\n  {binary} run {first}", soft_wrap=True)
    others = [name for name in models.values() if name != first]
    if others:
        console.print("Other quants: " + ", ".join(others))


@cli.command("validate")
@click.argument("recipes", nargs=-1, required=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key first.")
def validate_command(recipes, overrides):
    """Check recipe files; print every error with its location."""
    from .recipe import RecipeError, load_recipe

    failed = False
    for name in recipes:
        try:
            recipe = load_recipe(name, list(overrides))
        except RecipeError as exc:
            failed = True
            for line in exc.errors:
                click.echo(f"{exc.source}: {line}", err=True)
            continue
        click.echo(f"{name}: valid (recipe '{recipe.name}', version {recipe.recipe_version})")
    if failed:
        sys.exit(2)


@cli.group("recipes")
def recipes_group():
    """List and show the recipes that ship with ollama-compress."""


@recipes_group.command("list")
def recipes_list():
    """Name and first comment line of each shipped recipe."""
    from .recipe import shipped_recipes

    for name, path in sorted(shipped_recipes().items()):
        first = next((l.lstrip("# ").strip() for l in path.read_text().splitlines() if l.startswith("#")), "")
        click.echo(f"{name:32} {first}")


@recipes_group.command("show")
@click.argument("name")
def recipes_show(name):
    """Print a shipped recipe (copy it to start your own)."""
    from .recipe import resolve_recipe_path

    click.echo(resolve_recipe_path(name).read_text(), nl=False)


@recipes_group.command("copy")
@click.argument("name")
@click.argument("dest", type=click.Path())
def recipes_copy(name, dest):
    """Copy shipped recipe NAME to DEST (a file, or a directory to put NAME.yaml in) to edit it."""
    from pathlib import Path

    from .errors import UserError
    from .fsutil import atomic_path
    from .recipe import shipped_recipes

    shipped = shipped_recipes()
    if name not in shipped:
        raise UserError(f"no shipped recipe named '{name}'; see 'ollama-compress recipes list'")
    target = Path(dest) / f"{name}.yaml" if Path(dest).is_dir() else Path(dest)
    if target.exists():
        raise UserError(f"{target} exists; choose another destination or remove it first")
    with atomic_path(target) as tmp:
        tmp.write_text(shipped[name].read_text())
    click.echo(f"wrote {target}")


@cli.command("plugins")
def plugins_command():
    """Print installed plugins (built-in and third-party) with their hooks, as JSON."""
    from .plugins import describe_plugins

    echo_json(describe_plugins())


def _add_plugin_commands() -> None:
    from .plugins import get_plugin_manager

    get_plugin_manager().hook.register_commands(cli=cli)


DISK_FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def _one_line(text: str) -> str:
    """A message as one printable line: line breaks and other control characters (which a file
    name or a model's metadata may carry) become spaces or escapes."""
    text = " ".join(text.split())
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _disk_full(exc: BaseException) -> OSError | None:
    """The disk-full OSError behind ``exc``: itself, its cause, or one a native writer reported
    in its message ("I/O error: No space left on device (os error 28)")."""
    for candidate in (exc, exc.__cause__, exc.__context__):
        if isinstance(candidate, OSError) and candidate.errno in DISK_FULL:
            return candidate
        if isinstance(candidate, OSError) and candidate.errno is None \
                and re.search(r"requested and \d+ written", str(candidate)):  # numpy's short write
            return OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)} ({candidate})")
    found = re.search(r"os error (\d+)", str(exc))
    if found and int(found.group(1)) in DISK_FULL:
        code = int(found.group(1))
        return OSError(code, os.strerror(code))
    return None


def _click_error_line(exc: click.ClickException) -> str:
    """Click's usage errors as one line, with the command's --help as the hint."""
    message = " ".join(exc.format_message().split())
    ctx = getattr(exc, "ctx", None)
    if isinstance(exc, click.UsageError) and ctx is not None:
        message += f" (see '{ctx.command_path} --help')"
    return message


def _os_error_line(exc: OSError) -> str:
    where = f" {exc.filename}" if exc.filename else ""
    if exc.errno in DISK_FULL:
        return (f"no space left writing{where} ({exc.strerror}); the unfinished output was removed, "
                "finished ones are kept; free some space or choose another output directory")
    return f"cannot use{where}: {exc.strerror or exc}; check the path and its permissions"


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors and exit codes (0 ok, 1 failure during work, 2 bad input)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own progress is enough
    # Idle OpenMP threads that spin stall each other on a shared CPU (a SmolLM2 forward: 21 s spinning,
    # 1 s passive, on a busy 2-core machine). libgomp reads this once, when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        _add_plugin_commands()
        code = cli.main(args=argv, prog_name="ollama-compress", standalone_mode=False)
    except CompressError as exc:
        click.echo(f"Error: {_one_line(str(exc))}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        click.echo(f"Error: {_one_line(_click_error_line(exc))}", err=True)
        sys.exit(exc.exit_code)
    except OSError as exc:  # a filesystem refusal that no stage turned into a UserError
        full = _disk_full(exc)
        click.echo(f"Error: {_one_line(_os_error_line(full or exc))}", err=True)
        sys.exit(1 if full else 2)
    except KeyboardInterrupt:
        click.echo("Interrupted; finished outputs are kept, unfinished ones were removed.", err=True)
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - only a full disk reported by native writers (safetensors, gguf)
        full = _disk_full(exc)
        if full is None:
            raise
        click.echo(f"Error: {_one_line(_os_error_line(full))}", err=True)
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)

