"""Register stage: create models in a real Ollama server through the official ``ollama`` client.

The GGUF is uploaded as a blob (``client.create_blob``), then ``client.create`` builds the model
from it with the Modelfile's TEMPLATE, SYSTEM and PARAMETERs. Each quant becomes a tag:
``NAME:Q4_K_M``.
"""
from __future__ import annotations

import contextlib
import re
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import click

from ollama_compress.errors import StageFailed, UserError
from ollama_compress.fsutil import file_sha256
from ollama_compress.gguf_verify import verify_gguf
from ollama_compress.hookspecs import hookimpl
from ollama_compress.hosts import DEFAULT_HOST, normalize_host
from ollama_compress.ollama_server import ensure_server, make_client, server_running
from ollama_compress.quant_names import QUANT_TYPES
from ollama_compress.recipe import check_ollama_name

from .modelfile import (
    ModelfileSpec,
    chat_family,
    parse_modelfile,
    read_hf_chat_template,
    write_modelfile,
)



# ---------------------------------------------------------------- names and checks
def has_tag(name: str) -> bool:
    return ":" in name.rsplit("/", 1)[-1]


def model_tag(name: str, quant: str | None) -> str:
    """``NAME:QUANT`` unless ``name`` already carries a tag or there is no quant."""
    return name if has_tag(name) or not quant else f"{name}:{quant}"


def check_model_name(name: str) -> str:
    """``name`` if Ollama accepts it (the one rule in ``recipe.check_ollama_name``), else UserError."""
    return check_ollama_name(name)


def verify_gguf_file(path: Path) -> str | None:
    """Check that ``path`` is a complete GGUF (UserError otherwise); return its quant type if known."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such GGUF file")
    return verify_gguf(path).file_type


def quant_from_filename(path: Path) -> str | None:
    stem = Path(path).stem.upper()
    for quant in sorted(QUANT_TYPES, key=len, reverse=True):
        if re.search(rf"(^|[-_.]){re.escape(quant)}\Z", stem):
            return quant
    return None


def no_server(host: str) -> StageFailed:
    return StageFailed(
        f"no Ollama server at {host}; start one with `ollama serve` (or `ollama-compress serve`), "
        "or point ollama.host / --host / OLLAMA_HOST at a running one"
    )


def require_server(host: str | None) -> str:
    """The normalized host of a server that answers; StageFailed (one line) if none does."""
    url = normalize_host(host)
    if not server_running(url):
        raise no_server(url)
    return url


def _client_host(client) -> str:
    inner = getattr(client, "_client", None)
    return str(getattr(inner, "base_url", "")).rstrip("/") or DEFAULT_HOST


# ---------------------------------------------------------------- registering
def create_model(client, name: str, spec: ModelfileSpec) -> str:
    """Upload ``spec.from_path`` and create ``name`` from it with the spec's template, system, params."""
    import httpx
    import ollama

    check_model_name(name)
    verify_gguf_file(spec.from_path)
    host = _client_host(client)
    expected = f"sha256:{file_sha256(spec.from_path)}"
    try:
        digest = client.create_blob(spec.from_path)
        if digest != expected:  # the file changed after it was verified
            raise StageFailed(f"{spec.from_path} changed while it was uploaded (digest {digest}, "
                              f"verified {expected}); run the registration again")
        client.create(
            model=name,
            files={spec.from_path.name: digest},
            template=spec.template,
            system=spec.system,
            parameters=spec.parameters or None,
            stream=False,
        )
        check_registered(client, name, digest)
    except ConnectionError:
        raise no_server(host) from None
    except ollama.ResponseError as exc:
        error = " ".join(str(exc.error).split())
        if exc.status_code == 400:
            raise UserError(f"Ollama refused {name}: {error}") from None
        raise StageFailed(f"Ollama could not create {name}: {error}") from None
    except httpx.HTTPError as exc:
        raise StageFailed(f"talking to Ollama at {host} failed while creating {name}: {exc}") from None
    return name


def check_registered(client, name: str, digest: str) -> None:
    """``name`` exists in the server and its model blob is ``digest``; otherwise it is deleted (nothing
    half-registered stays) and a StageFailed says to register again."""
    import ollama

    try:
        modelfile = client.show(name).modelfile or ""
    except (ollama.ResponseError, ValueError):  # not there, or an answer that is no model
        modelfile = ""
    if f"sha256-{digest.removeprefix('sha256:')}" in modelfile:
        return
    with contextlib.suppress(ollama.ResponseError, ConnectionError):
        client.delete(name)
    raise StageFailed(f"Ollama did not finish creating {name} from {digest[:19]}...; it was removed: "
                      "run the registration again")


def register_gguf(client, name: str, modelfile_path: Path) -> str:
    """Create ``name`` in the Ollama server of ``client`` from our Modelfile; return the name.

    The GGUF named by FROM is verified first: a truncated or foreign file is a UserError and no
    model is created.
    """
    return create_model(client, name, parse_modelfile(modelfile_path))


def _with_overrides(spec: ModelfileSpec, family: str | None, system: str | None) -> ModelfileSpec:
    if family:
        chosen = chat_family(family)
        params = {k: v for k, v in spec.parameters.items() if k != "stop"}
        spec = replace(spec, template=chosen.template, parameters={"stop": chosen.stops, **params})
    if system is not None:
        spec = replace(spec, system=system)
    return spec


def _visible(paths) -> list[Path]:
    """Paths without hidden parts (atomic writes' temporaries start with a dot), sorted."""
    return sorted(p for p in paths if not any(part.startswith(".") for part in p.parts[-2:]))


def _plan_directory(directory: Path, name: str, family: str | None, system: str | None, tmp: Path):
    modelfiles = _visible(directory.glob("Modelfile.*")) + _visible(directory.glob("*/Modelfile.*"))
    if modelfiles:
        for path in modelfiles:
            quant = path.name.split(".", 1)[1]
            yield model_tag(name, quant), _with_overrides(parse_modelfile(path), family, system)
        return
    ggufs = _visible(directory.glob("*.gguf")) or _visible(directory.glob("*/*.gguf"))
    if not ggufs:
        raise UserError(f"{directory} holds no Modelfile.* and no .gguf files; give a run directory or a GGUF file")
    hf_template = read_hf_chat_template(directory)
    for i, gguf in enumerate(ggufs):
        quant = verify_gguf_file(gguf) or quant_from_filename(gguf) or gguf.stem
        modelfile = write_modelfile(gguf, tmp / f"Modelfile.{i}", hf_template, family=family, system=system)
        yield model_tag(name, quant), parse_modelfile(modelfile)


def register_path(
    path: Path, name: str, *, host: str | None = None, family: str | None = None, system: str | None = None
) -> list[str]:
    """Register a GGUF file, a run directory, or a folder of GGUFs and/or ``Modelfile.*``.

    Every input is checked before anything is created, so bad input creates no model.
    Returns the registered names (``NAME:QUANT`` per quant of a directory).
    """
    path = Path(path)
    check_model_name(name)
    if not path.exists():
        raise UserError(f"{path}: no such file or directory")
    with tempfile.TemporaryDirectory(prefix="ollama-compress-register-") as tmp:
        if path.is_dir():
            plan = list(_plan_directory(path, name, family, system, Path(tmp)))
        elif path.suffix.lower() == ".gguf":
            verify_gguf_file(path)
            modelfile = write_modelfile(path, Path(tmp) / "Modelfile", None, family=family, system=system)
            plan = [(name, parse_modelfile(modelfile))]
        else:
            raise UserError(f"{path} is not a .gguf file or a directory; give a GGUF, a run directory or a folder")
        names = [n for n, _ in plan]
        if len(set(names)) != len(names):
            raise UserError(f"--name {name} has a tag but {path} holds {len(names)} models; give a name without ':tag'")
        for _, spec in plan:
            verify_gguf_file(spec.from_path)
        url = require_server(host)
        client = make_client(url)
        return [create_model(client, n, spec) for n, spec in plan]


def chat_hint(name: str, host: str | None = None) -> str:
    """The shell command that chats with ``name`` on ``host``."""
    url = normalize_host(host)
    prefix = "" if url == DEFAULT_HOST else f"OLLAMA_HOST={url.split('://', 1)[1]} "
    return f"{prefix}ollama run {name}"


# ---------------------------------------------------------------- stage
def _name_for(name: str, modelfile: Path) -> str:
    prefix = "Modelfile."
    quant = modelfile.name[len(prefix):] if modelfile.name.startswith(prefix) else None
    return model_tag(name, quant)


@hookimpl(specname="create_ollama_model", trylast=True)
def create_ollama_model_stage(ctx, modelfile, name, host):
    full_name = _name_for(check_model_name(name), Path(modelfile))
    spec = parse_modelfile(modelfile)
    verify_gguf_file(spec.from_path)
    url = require_server(host)
    create_model(make_client(url), full_name, spec)
    ctx.metrics.setdefault("registered", []).append(full_name)
    ctx.metrics["ollama_host"] = url
    ctx.log(f"registered {full_name} in Ollama at {url}; chat: {chat_hint(full_name, url)}")
    return full_name


# ---------------------------------------------------------------- commands
@hookimpl
def register_commands(cli):
    @cli.command("register")
    @click.argument("path", type=click.Path(path_type=Path))
    @click.option("--name", required=True, help="Ollama model name; each quant of a directory becomes NAME:QUANT.")
    @click.option("--host", default=None, help="Ollama server (default: OLLAMA_HOST or 127.0.0.1:11434).")
    @click.option("--template", "family", default=None, help="Chat family (chatml, llama3, ...); default: matched.")
    @click.option("--system", default=None, help="SYSTEM prompt.")
    def register(path: Path, name: str, host: str | None, family: str | None, system: str | None) -> None:
        """Create models in Ollama from a GGUF file, a run directory or a folder of GGUFs."""
        names = register_path(path, name, host=host, family=family, system=system)
        for registered in names:
            click.echo(f"registered {registered}")
        click.echo(f"chat with it: {chat_hint(names[0], host)}")

    @cli.command("serve")
    @click.option("--host", default=None, help="Where to serve (default: OLLAMA_HOST or 127.0.0.1:11434).")
    @click.option("--models", type=click.Path(path_type=Path), default=None,
                  help="Models directory (default: OLLAMA_MODELS or ~/.ollama/models).")
    @click.option("--no-build", is_flag=True, help="Fail instead of building Ollama when no binary is found.")
    def serve(host: str | None, models: Path | None, no_build: bool) -> None:
        """Run an Ollama server in the foreground (building it with Go if needed) until Ctrl-C."""
        with ensure_server(host, models, build=not no_build, log=click.echo) as server:
            if not server.started:
                click.echo(f"an Ollama server already answers at {server.host}")
                return
            click.echo("Ctrl-C stops it")
            try:
                while server_running(server.host):
                    time.sleep(2)
            except KeyboardInterrupt:
                click.echo("stopping Ollama")
                return
            raise StageFailed(f"the Ollama server stopped; see {server.log_path}")
