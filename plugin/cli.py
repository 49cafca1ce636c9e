"""The ``ollama-compress`` command line: thin commands over the Python API.

Built-in stages add their own commands through the ``register_commands`` hook, like any plugin.
"""
from __future__ import annotations

import json
import os
import sys

import click

from .context import RunOptions
from .errors import CompressError


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


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ollama-compress")
def cli():
    """Prune, heal, convert and quantize Hugging Face causal LMs into models that run in Ollama."""


@cli.command("run")
@click.argument("recipe")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a recipe key (prune.remove=8).")
@click.option("--out", type=click.Path(), help="Run directory (default: runs/<recipe name>).")
@click.option("--dry-run", is_flag=True, help="Print the stage plan without loading weights.")
@run_options
def run_command(recipe, overrides, out, dry_run, **flags):
    """Run RECIPE (a .yaml file or a shipped recipe name) end to end."""
    from rich.console import Console
    from rich.table import Table

    from . import pipeline

    result = pipeline.run(recipe, overrides=list(overrides), out=out, options=make_options(**flags), dry_run=dry_run)
    console = Console()
    if dry_run:
        table = Table("stage", "status", "directory", title=f"plan for {result['run_dir']}")
        for row in result["plan"]:
            table.add_row(row["stage"], row["status"], row.get("dir", ""))
        console.print(table)
        return
    _print_summary(console, result, out)


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


@cli.command("plugins")
def plugins_command():
    """Print installed plugins (built-in and third-party) with their hooks, as JSON."""
    from .plugins import describe_plugins

    echo_json(describe_plugins())


def _add_plugin_commands() -> None:
    from .plugins import get_plugin_manager

    get_plugin_manager().hook.register_commands(cli=cli)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one-line errors and exit codes (0 ok, 1 failure during work, 2 bad input)."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own progress is enough
    try:
        _add_plugin_commands()
        code = cli.main(args=argv, prog_name="ollama-compress", standalone_mode=False)
    except CompressError as exc:
        click.echo(f"Error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(1)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("Interrupted; finished outputs are kept, unfinished ones were removed.", err=True)
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)

