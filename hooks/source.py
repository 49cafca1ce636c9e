"""Sources: local HF directories, hub ids (offline unless asked), GGUF files, and embedded models.

A GGUF source is imported once into a clean HF directory (safetensors, config without any
quantization_config, tokenizer, chat template, generation config): the weights are de-quantized
by transformers' GGUF loader, so a Q4 GGUF yields float weights equal to what llama.cpp computes with.
"""
from __future__ import annotations

import contextlib
import copy
import os
import re
from pathlib import Path

import click

from ollama_compress.context import StageContext
from ollama_compress.embedded import EMBEDDED_MODELS, cache_dir, content_sha256, smollm2_gguf
from ollama_compress.errors import StageFailed, UserError
from ollama_compress.fsutil import atomic_path, check_free_space, check_output_dir, claim_output_dir
from ollama_compress.gguf_verify import GGUFSummary, verify_gguf
from ollama_compress.hooks.modelfile import read_hf_chat_template
from ollama_compress.hookspecs import LOCATE_SOURCE, hookimpl
from ollama_compress.modelio import check_causal_lm, check_finite, check_model_dir, file_in_model_dir
from ollama_compress.options import RunOptions
from ollama_compress.plugins import capabilities
from ollama_compress.templates import check_chat_template

GGUF_MAGIC = b"GGUF"
PINNED_REVISION = re.compile(r"[0-9a-f]{40}")  # a commit: what it names can't change later
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


# ---------------------------------------------------------------- GGUF import
def check_gguf(path: str | os.PathLike) -> Path:
    """``path`` if it looks like a complete GGUF file, else a UserError naming the problem."""
    path = Path(path)
    checked_gguf(path)
    return path


def checked_gguf(path: str | os.PathLike) -> GGUFSummary:
    """The verified summary of a GGUF whose chat template (if any) passed ``check_chat_template``."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} does not exist; give a .gguf file")
    if not path.is_file():
        raise UserError(f"{path} is not a file; give a .gguf file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic != GGUF_MAGIC:
        raise UserError(f"{path}: not a GGUF file (bad magic); give a .gguf model file")
    summary = verify_gguf(path)
    template = summary.metadata.get("tokenizer.chat_template")
    check_chat_template(template if isinstance(template, str) else None)
    return summary


def _strip_quantization(model) -> None:
    """Forget that weights came from a quantized GGUF: they are de-quantized floats now."""
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


@contextlib.contextmanager
def _gguf_metadata_parsed_once():
    """Within this block, transformers parses each GGUF's metadata once.

    Loading the tokenizer and the model, transformers reads the file's metadata three times
    (config, tokenizer config, config again) and opens it once more for the weights; gguf-py
    takes seconds a time over a 49k-token vocabulary. The file is opened once here, its metadata
    parsed once, and each caller gets its own copy of the parse.
    """
    import gguf
    import transformers.modeling_gguf_pytorch_utils as loader

    open_reader, parse = gguf.GGUFReader, loader.load_gguf_checkpoint
    readers: dict[tuple[str, str], object] = {}
    parsed: dict[str, dict] = {}

    def reader_once(path, mode="r"):
        key = (os.fspath(path), mode)
        if key not in readers:
            readers[key] = open_reader(path, mode)
        return readers[key]

    def parse_once(path, return_tensors=False, *args, **kwargs):
        if return_tensors or args or kwargs:
            return parse(path, return_tensors, *args, **kwargs)
        key = os.fspath(path)
        if key not in parsed:
            parsed[key] = parse(path, return_tensors=False)
        return copy.deepcopy(parsed[key])

    gguf.GGUFReader, loader.load_gguf_checkpoint = reader_once, parse_once
    try:
        yield
    finally:
        gguf.GGUFReader, loader.load_gguf_checkpoint = open_reader, parse


def import_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "float32") -> Path:
    """Write a clean HF directory for ``gguf_path`` into the existing directory ``out_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    summary = checked_gguf(gguf_path)
    check_free_space(out_dir, summary.n_weights * DTYPE_BYTES.get(dtype, 4) + (64 << 20),
                     f"the import of {gguf_path.name}")
    folder, name = str(gguf_path.parent), gguf_path.name
    try:
        with _gguf_metadata_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(
                folder, gguf_file=name, dtype=getattr(torch, dtype), local_files_only=True
            )
    except (ValueError, KeyError, OSError, RuntimeError, TypeError, AttributeError, ArithmeticError) as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"{gguf_path}: transformers cannot load this GGUF ({first[:300]})") from None
    _strip_quantization(model)
    check_finite(model.state_dict().items(), str(gguf_path))
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    model.generation_config.save_pretrained(out_dir)
    return out_dir


def imported_gguf_dir(gguf_path: str | os.PathLike) -> Path:
    """The HF import of a GGUF, made once and cached by the GGUF's content hash."""
    gguf_path = check_gguf(gguf_path)
    digest = content_sha256(gguf_path)
    target = cache_dir() / "imported" / f"{gguf_path.stem}-{digest[:12]}"
    if not (target / "config.json").is_file():
        with atomic_path(target, is_dir=True) as tmp:
            import_gguf(gguf_path, tmp)
    return target


# ---------------------------------------------------------------- resolving a source
def resolve_source(spec: str, options: RunOptions | None = None, revision: str | None = None) -> Path:
    """A local HF directory or GGUF file for a source spec (path, ``scheme:name`` or hub id)."""
    options = options or RunOptions()
    scheme, sep, rest = spec.partition(":")
    schemes = capabilities("sources")
    if sep and scheme in schemes:
        return Path(schemes[scheme].fn(rest, options))
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or spec.endswith(".gguf"):
        if not path.exists():
            raise UserError(f"{spec} does not exist; give an HF model directory, a .gguf file or a hub id")
        return path
    return _hub_snapshot(spec, options, revision)


def _hub_snapshot(repo_id: str, options: RunOptions, revision: str | None) -> Path:
    if repo_id.count("/") != 1:
        raise UserError(f"{repo_id} is neither a local path nor a hub id (org/name)")
    if options.trust_remote_code and not PINNED_REVISION.fullmatch(revision or ""):
        raise UserError(
            f"--trust-remote-code runs {repo_id}'s own Python code, so it needs a pinned revision: set "
            "source.revision to a full 40-character commit hash (a branch or tag can change under you)"
        )
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja", "*.txt"]
    if options.allow_pickle:
        patterns.append("*.bin")
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns,
                                      local_files_only=options.offline))
    except Exception as exc:  # the hub client raises many kinds
        if options.offline:
            raise UserError(f"{repo_id} is not in the local HF cache; download it first or pass --online") from None
        raise StageFailed(f"could not download {repo_id}: {str(exc).splitlines()[0]}") from None


def source_path(source, options: RunOptions) -> Path:
    """The checked local GGUF file or causal-LM HF directory of a recipe's ``source`` section;
    a bad source fails here, before anything is written."""
    path = resolve_source(source.model, options, source.revision)
    if path.is_dir() and source.gguf_file:
        path = file_in_model_dir(path, source.gguf_file, "source.gguf_file")
    if path.is_file():
        return check_gguf(path)
    check_causal_lm(check_model_dir(path, options))
    check_hf_chat_template(path)
    return path


def resolve_model_dir(spec: str, options: RunOptions | None = None, revision: str | None = None) -> Path:
    """A checked local HF causal-LM directory for any source spec (GGUF files are imported once)."""
    options = options or RunOptions()
    path = resolve_source(spec, options, revision)
    if path.is_file():
        path = imported_gguf_dir(path)
    check_model_dir(path, options)
    check_causal_lm(path)
    check_hf_chat_template(path)
    return path


# ---------------------------------------------------------------- hooks
def _embedded(name: str, options: RunOptions) -> Path:
    if name not in EMBEDDED_MODELS:
        raise UserError(f"no embedded model '{name}'; known: {', '.join(EMBEDDED_MODELS)}")
    return smollm2_gguf()


@hookimpl
def register_sources(register):
    register("embedded", _embedded, "models that ship with a PyPI wheel (embedded:smollm2-135m-instruct)")


@hookimpl(trylast=True)
def load_source(ctx: StageContext) -> Path:
    path = source_path(ctx.recipe.source, ctx.options)
    if ctx.inputs.get(LOCATE_SOURCE):
        return path
    if path.is_file():
        ctx.log(f"importing {path.name} into an HF directory")
        ctx.metrics["imported_gguf"] = str(path)
        return import_gguf(path, ctx.out_dir, dtype=ctx.recipe.source.dtype)
    return path


def check_hf_chat_template(model_dir: Path) -> None:
    """The chat template an HF directory ships passes ``check_chat_template`` (UserError otherwise)."""
    check_chat_template(read_hf_chat_template(model_dir))


@hookimpl
def register_commands(cli):
    @cli.command("import-gguf")
    @click.argument("gguf_file", type=click.Path(path_type=Path))
    @click.option("--out", "out_dir", required=True, type=click.Path(path_type=Path), help="HF directory to write.")
    @click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True)
    def import_gguf_command(gguf_file: Path, out_dir: Path, dtype: str):
        """Convert a GGUF file into a clean Hugging Face model directory."""
        check_gguf(gguf_file)
        check_output_dir(out_dir, "--out", inputs=(gguf_file,))
        if out_dir.exists():
            claim_output_dir(out_dir, "--out", inputs=(gguf_file,))
        with atomic_path(out_dir, is_dir=True) as tmp:
            import_gguf(gguf_file, tmp, dtype=dtype)
        click.echo(f"wrote {out_dir}")
